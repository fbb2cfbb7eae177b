//! The agent daemon's bounds, in one place, with their relations checked at compile time.
//! (The change map's and the formats' bounds are in `ctk::limits`; the NBD codec's sizes in
//! `nbd`.) What any client can make the agent hold is bounded by these:
//!
//! - NBD connections: at most `Limits::nbd_connections` at once (a client over it gets an
//!   `NBD_REP_ERR_POLICY` reply saying so, at most `REFUSALS_MAX` such replies in progress,
//!   each at most `REFUSAL_TIMEOUT`); a connection must finish its handshake within
//!   `Limits::nbd_handshake_timeout`.
//! - NBD payload memory (WRITE data before it is written, a READ's reply until it is sent):
//!   at most `NBD_CONNECTION_KIB_MAX` per connection, and all connections together at most
//!   `Limits::nbd_memory` plus `NBD_RESERVE_KIB` each. The reserve is each connection's own,
//!   so a client with small requests keeps its pace however much of the shared pool clients
//!   that do not read their replies hold. Worst case:
//!   `nbd_memory + nbd_connections * NBD_RESERVE_KIB` KiB = 256 MiB + 128 MiB by default.
//! - Control connections: at most `Limits::control_connections`; one that sends no request
//!   for `CONTROL_IDLE_TIMEOUT` is closed.
//! - File descriptors: the soft limit is raised to the hard one at start; the default
//!   connection caps shrink to fit what the limit leaves after `FD_RESERVE`.

use std::time::Duration;

use crate::nbd::PAYLOAD_MAX;

/// Requests of one NBD connection handled at once.
pub const NBD_INFLIGHT_MAX: usize = 16;

/// Payload one NBD connection's requests in flight may hold, in KiB: the reader waits for
/// room before it reads a payload or passes on a READ.
pub const NBD_CONNECTION_KIB_MAX: u32 = 64 << 10;

/// Payload each NBD connection may hold outside the shared pool, in KiB: sixteen 64 KiB
/// requests in flight.
pub const NBD_RESERVE_KIB: u32 = 1 << 10;

/// Default bound of the shared pool of NBD payload memory, in bytes.
pub const NBD_MEMORY_DEFAULT: u64 = 256 << 20;

/// Default most NBD connections at once (a host's VMs and tools; each costs a descriptor).
pub const NBD_CONNECTIONS_DEFAULT: usize = 128;

/// Default most control connections at once (each `ctk-agent` command opens one).
pub const CONTROL_CONNECTIONS_DEFAULT: usize = 16;

/// Default time an NBD client has to finish its handshake.
pub const NBD_HANDSHAKE_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);

/// A control connection that sends no request for this long is closed.
pub const CONTROL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Polite refusals (an NBD error reply to a client over the connection cap) in progress at
/// once; past it, a connection over the cap is closed at once.
pub const REFUSALS_MAX: usize = 16;

/// How long a polite refusal waits for the client's first option.
pub const REFUSAL_TIMEOUT: Duration = Duration::from_secs(2);

/// Descriptors kept for the agent's own files (disks, journals, logs, exports, hooks) when
/// the default connection caps are fitted to the process's limit.
pub const FD_RESERVE: u64 = 64;

/// The pause after a failed accept (out of descriptors, say) doubles from this...
pub const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// ...up to this: a listener never spins, and resumes within a second once it can.
pub const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

// One request of the largest size fits a connection's bound, and the shared pool.
const _: () = assert!(PAYLOAD_MAX / 1024 <= NBD_CONNECTION_KIB_MAX);
const _: () = assert!(NBD_MEMORY_DEFAULT >= PAYLOAD_MAX as u64);
const _: () = assert!(NBD_RESERVE_KIB <= NBD_CONNECTION_KIB_MAX);

/// The bounds a running agent applies: the defaults above, or the configuration's
/// (`nbd_connections_max`, `control_connections_max`, `nbd_memory_max`,
/// `nbd_handshake_timeout_ms`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub nbd_connections: usize,
    pub control_connections: usize,
    /// Bytes; at least `PAYLOAD_MAX`, so any one request can be served.
    pub nbd_memory: u64,
    pub nbd_handshake_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            nbd_connections: NBD_CONNECTIONS_DEFAULT,
            control_connections: CONTROL_CONNECTIONS_DEFAULT,
            nbd_memory: NBD_MEMORY_DEFAULT,
            nbd_handshake_timeout: NBD_HANDSHAKE_TIMEOUT_DEFAULT,
        }
    }
}

impl Limits {
    /// Fits connection caps that were not set explicitly to `fds`, the descriptors this
    /// process may open: three quarters of what `FD_RESERVE` leaves for NBD, an eighth for
    /// control, at least a few of each. Returns a warning for an explicit cap past the
    /// descriptors (accepting then pauses on EMFILE instead of refusing politely).
    pub fn fit_to_descriptors(
        &mut self,
        fds: u64,
        nbd_explicit: bool,
        control_explicit: bool,
    ) -> Option<String> {
        let budget = fds.saturating_sub(FD_RESERVE);
        if !nbd_explicit {
            self.nbd_connections = self.nbd_connections.min((budget * 3 / 4).max(4) as usize);
        }
        if !control_explicit {
            self.control_connections = self.control_connections.min((budget / 8).max(2) as usize);
        }
        let wanted = (self.nbd_connections + self.control_connections) as u64;
        (wanted > budget).then(|| {
            format!(
                "{} NBD and {} control connections may need more descriptors than the {fds} \
                 this process may open (less {FD_RESERVE} for its own files): past them, \
                 accepting pauses instead of refusing politely; raise LimitNOFILE or lower the caps",
                self.nbd_connections, self.control_connections
            )
        })
    }
}

/// Raises the soft limit on open descriptors to the hard one (systemd's default soft limit
/// is 1,024) and returns the limit now in force.
pub fn raise_descriptor_limit() -> u64 {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write or read only the struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) != 0 {
            return 1024;
        }
        if rl.rlim_cur < rl.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: rl.rlim_max,
                rlim_max: rl.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                rl.rlim_cur = rl.rlim_max;
            }
        }
    }
    rl.rlim_cur
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_caps_fit_the_descriptors_and_explicit_ones_warn() {
        let mut l = Limits::default();
        assert!(l.fit_to_descriptors(1 << 20, false, false).is_none());
        assert_eq!(l, Limits::default());
        let mut l = Limits::default();
        assert!(l.fit_to_descriptors(256, false, false).is_none());
        assert_eq!((l.nbd_connections, l.control_connections), (128, 16));
        let mut l = Limits::default();
        assert!(l.fit_to_descriptors(128, false, false).is_none());
        assert_eq!((l.nbd_connections, l.control_connections), (48, 8));
        let mut l = Limits {
            nbd_connections: 1000,
            ..Limits::default()
        };
        assert!(l.fit_to_descriptors(256, true, false).is_some());
        assert_eq!(l.nbd_connections, 1000);
    }
}
