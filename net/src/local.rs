//! Local listeners the daemons share (the agent's NBD front and control socket, the
//! receiver's exports): where to listen, and binding a Unix socket without ever taking one
//! from a live process.

use std::io;
use std::path::{Path, PathBuf};

/// Where a listener listens: `unix:PATH` or `tcp:ADDRESS:PORT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    Unix(PathBuf),
    Tcp(std::net::SocketAddr),
}

impl std::str::FromStr for Listen {
    type Err = String;
    fn from_str(s: &str) -> Result<Listen, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a socket path, e.g. unix:/run/ctk/nbd.sock".into());
            }
            Ok(Listen::Unix(path.into()))
        } else if let Some(addr) = s.strip_prefix("tcp:") {
            addr.parse()
                .map(Listen::Tcp)
                .map_err(|_| format!("{addr:?} is not an address such as 127.0.0.1:10809"))
        } else {
            Err(format!("{s:?}: use unix:PATH or tcp:ADDRESS:PORT"))
        }
    }
}

/// Why a Unix socket could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// A live process answers on the socket path.
    #[error("{} is in use: something answers on it (another ctk process?); stop it or choose another path", path.display())]
    SocketInUse { path: PathBuf },
    /// The path exists and is not a socket: never removed.
    #[error("{} exists and is not a socket: not removed; choose another path", path.display())]
    NotASocket { path: PathBuf },
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

/// Binds a Unix socket at `path`, removing a stale socket file left by a process that died
/// (nothing answers on it) but never one something still answers on.
pub fn bind_unix(path: &Path) -> Result<std::os::unix::net::UnixListener, BindError> {
    use std::os::unix::fs::FileTypeExt;
    let io = |what, source| BindError::Io {
        what,
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| io("creating the socket's directory", e))?;
    }
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("looking at the socket path", e)),
        Ok(m) if !m.file_type().is_socket() => {
            return Err(BindError::NotASocket {
                path: path.to_owned(),
            });
        }
        Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => {
                return Err(BindError::SocketInUse {
                    path: path.to_owned(),
                });
            }
            // Nobody listens: a socket left by a process that died.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                tracing::info!(socket = %path.display(), "removing a stale socket nobody answers on");
                std::fs::remove_file(path).map_err(|e| io("removing a stale socket", e))?;
            }
            Err(e) => return Err(io("checking whether the socket is in use", e)),
        },
    }
    std::os::unix::net::UnixListener::bind(path).map_err(|e| io("listening on", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_socket_is_kept_and_a_stale_one_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let live = bind_unix(&path).unwrap();
        let err = bind_unix(&path).unwrap_err();
        assert!(matches!(err, BindError::SocketInUse { .. }), "{err}");
        // The listener is gone, its file stays: stale, so it is replaced.
        drop(live);
        assert!(path.exists());
        let _again = bind_unix(&path).unwrap();
        // A regular file is never removed.
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(
            bind_unix(&file).unwrap_err(),
            BindError::NotASocket { .. }
        ));
        assert_eq!(std::fs::read(&file).unwrap(), b"x");
    }

    #[test]
    fn listen_forms_parse_and_bad_ones_say_the_form() {
        assert_eq!(
            "unix:/run/x.sock".parse::<Listen>(),
            Ok(Listen::Unix("/run/x.sock".into()))
        );
        assert_eq!(
            "tcp:127.0.0.1:10809".parse::<Listen>(),
            Ok(Listen::Tcp("127.0.0.1:10809".parse().unwrap()))
        );
        for bad in ["unix:", "tcp:nowhere", "/run/x.sock", ""] {
            let e = bad.parse::<Listen>().unwrap_err();
            assert!(e.contains("unix:") || e.contains("address"), "{bad:?}: {e}");
        }
    }
}
