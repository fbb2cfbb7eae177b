//! A point's filesystem mounted read-only on this host, for file-level restore: the point
//! exported on a private Unix socket, nbdfuse turning the export into a file, a read-only
//! loop device over it (over one partition of it, found in its MBR or GPT: `partitions`),
//! and the filesystem mounted read-only, without replaying its journal (the point is never
//! written). Torn down in the reverse order when dropped, whatever state it got to.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ctk_net::local::Listen;

use super::partitions::Partition;
use super::{Served, bind, serve};
use crate::store::Exposure;

/// How long nbdfuse gets to come up.
const NBDFUSE_START: Duration = Duration::from_secs(20);

pub struct MountedPoint {
    /// Where the filesystem is mounted.
    pub dir: PathBuf,
    work: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<std::thread::JoinHandle<Result<()>>>,
    nbdfuse: Option<Child>,
    loopdev: Option<String>,
    mounted: bool,
}

/// Runs a command, its output captured: Ok(stdout) or an error with its stderr.
fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {:?} (is it installed?)", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{:?} failed: {}",
            cmd.get_program(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// What a mount's process leaves for `umount` to tear down if it died without doing so.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Leftovers {
    pub dir: PathBuf,
    pub fuse: PathBuf,
    pub loopdev: Option<String>,
    pub nbdfuse: Option<u32>,
}

impl Leftovers {
    /// Tears down what a dead mount left: the filesystem (lazily), the loop device,
    /// nbdfuse's mount and process.
    pub fn tear_down(&self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        if let Some(dev) = &self.loopdev {
            let _ = Command::new("losetup").args(["-d", dev]).status();
        }
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg("-z")
            .arg(&self.fuse)
            .stderr(Stdio::null())
            .status();
        if let Some(pid) = self.nbdfuse {
            // SAFETY: kill(2) on nbdfuse's process id, which the mount recorded.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
    }
}

impl MountedPoint {
    /// What to tear down should this process die without dropping the mount.
    pub fn leftovers(&self) -> Leftovers {
        Leftovers {
            dir: self.dir.clone(),
            fuse: self.work.join("fuse"),
            loopdev: self.loopdev.clone(),
            nbdfuse: self.nbdfuse.as_ref().map(|c| c.id()),
        }
    }

    /// Mounts the filesystem of `exposure`'s point at `dir` (created), using `work` (created)
    /// for the socket and nbdfuse's mount point. `partition` picks one (1-based) of a
    /// partitioned disk; without it the first that mounts is used.
    pub fn mount(
        exposure: Arc<Exposure>,
        dir: &Path,
        work: &Path,
        partition: Option<u32>,
    ) -> Result<MountedPoint> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let fuse = work.join("fuse");
        std::fs::create_dir_all(&fuse).with_context(|| format!("creating {}", fuse.display()))?;
        let socket = work.join("nbd.sock");
        let mut m = MountedPoint {
            dir: dir.to_owned(),
            work: work.to_owned(),
            stop: None,
            server: None,
            nbdfuse: None,
            loopdev: None,
            mounted: false,
        };
        let (stop, server, uri) = start_export(exposure, &socket)?;
        m.stop = Some(stop);
        m.server = Some(server);
        let pidfile = work.join("nbdfuse.pid");
        let _ = std::fs::remove_file(&pidfile);
        let child = Command::new("nbdfuse")
            .arg("-r")
            .arg("-P")
            .arg(&pidfile)
            .arg(&fuse)
            .arg(&uri)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("starting nbdfuse (apt-get install libnbd-bin fuse3)")?;
        m.nbdfuse = Some(child);
        let started = Instant::now();
        while !pidfile.exists() {
            if started.elapsed() > NBDFUSE_START {
                bail!("nbdfuse did not come up within {NBDFUSE_START:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let image = fuse.join("nbd");
        let candidates = candidates(&image, partition)?;
        let mut why = Vec::new();
        for part in candidates {
            let mut losetup = Command::new("losetup");
            losetup.args(["-f", "--show", "-r"]);
            if let Some(p) = part {
                losetup.arg(format!("--offset={}", p.start));
                losetup.arg(format!("--sizelimit={}", p.length));
            }
            let dev = run(losetup.arg(&image))?;
            let shown = match part {
                Some(p) => format!("partition {}", p.number),
                None => "the whole disk".to_owned(),
            };
            match mount_ro(&dev, dir) {
                Ok(()) => {
                    m.loopdev = Some(dev);
                    m.mounted = true;
                    return Ok(m);
                }
                Err(e) => {
                    let _ = Command::new("losetup").args(["-d", &dev]).status();
                    why.push(format!("{shown}: {e:#}"));
                }
            }
        }
        bail!(
            "no filesystem of the point mounts read-only: {}",
            why.join("; ")
        )
    }
}

/// The export of `exposure` on `socket`, on a thread of its own for as long as the mount
/// lives: the sender that stops it, the thread, and the URI clients connect with.
#[allow(clippy::type_complexity)] // three plain handles
fn start_export(
    exposure: Arc<Exposure>,
    socket: &Path,
) -> Result<(
    tokio::sync::oneshot::Sender<()>,
    std::thread::JoinHandle<Result<()>>,
    String,
)> {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (ready, is_ready) = std::sync::mpsc::channel::<Result<String>>();
    let disk = exposure.disk().to_owned();
    let listen = Listen::Unix(socket.to_owned());
    let server = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        runtime.block_on(async {
            let listener = match bind(&listen).await {
                Ok(l) => l,
                Err(e) => {
                    let _ = ready.send(Err(anyhow::anyhow!("{e:#}")));
                    return Err(e);
                }
            };
            let _ = ready.send(listener.uri(&disk));
            let served = Served {
                exposure,
                overlay: None,
            };
            serve(served, listener, async {
                let _ = stopped.await;
            })
            .await
        })
    });
    let uri = is_ready
        .recv()
        .context("the export thread ended before it listened")??;
    Ok((stop, server, uri))
}

/// What to try mounting on `image`: the partition asked for, else every partition its
/// table lists, else (no table) the whole disk.
fn candidates(image: &Path, partition: Option<u32>) -> Result<Vec<Option<Partition>>> {
    let size = std::fs::metadata(image)?.len();
    let file =
        std::fs::File::open(image).with_context(|| format!("opening {}", image.display()))?;
    let parts = super::partitions::partitions(size, |offset, buf| {
        std::os::unix::fs::FileExt::read_exact_at(&file, buf, offset)
    })
    .context("reading the disk's partition table")?;
    Ok(match partition {
        Some(n) => vec![Some(*parts.iter().find(|p| p.number == n).with_context(
            || {
                let have: Vec<String> = parts.iter().map(|p| p.number.to_string()).collect();
                format!(
                    "no partition {n}: the disk has {}",
                    if have.is_empty() {
                        "none".to_owned()
                    } else {
                        have.join(", ")
                    }
                )
            },
        )?)],
        None if parts.is_empty() => vec![None],
        None => parts.into_iter().map(Some).collect(),
    })
}

/// Mounts `device` read-only at `dir`, without journal replay where the filesystem has one
/// (ext4 `noload`, XFS `norecovery`): the point is never written.
fn mount_ro(device: &str, dir: &Path) -> Result<()> {
    let mut last = None;
    for options in ["ro,noload", "ro,norecovery", "ro"] {
        match run(Command::new("mount").args(["-o", options, device]).arg(dir)) {
            Ok(_) => return Ok(()),
            Err(e) => last = Some(e),
        }
    }
    Err(last.expect("tried at least once"))
}

impl Drop for MountedPoint {
    fn drop(&mut self) {
        if self.mounted {
            // Busy (a shell inside it): detached lazily, so nothing is left pointing at the
            // export that goes next.
            let done = Command::new("umount")
                .arg(&self.dir)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !done {
                let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
            }
        }
        if let Some(dev) = &self.loopdev {
            let _ = Command::new("losetup").args(["-d", dev]).status();
        }
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg("-z")
            .arg(self.work.join("fuse"))
            .stderr(Stdio::null())
            .status();
        if let Some(mut p) = self.nbdfuse.take() {
            let _ = p.kill();
            let _ = p.wait();
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            let _ = server.join();
        }
    }
}
