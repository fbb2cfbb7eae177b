//! Telling a service manager (systemd's `Type=notify`, sd_notify(3)) how a daemon stands:
//! READY once it serves, STOPPING when it begins to stop, and the watchdog's keep-alive while
//! its runtime answers. Not started by one (no `NOTIFY_SOCKET`), every call does nothing.

use std::time::Duration;

use sd_notify::NotifyState;

/// The daemon serves: `status` is what `systemctl status` shows beside it.
pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// The daemon begins to stop (it finishes or rolls back what is under way first).
pub fn stopping() {
    notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// Feeds the watchdog at half its interval, if the manager set one (`WatchdogSec=`), from a
/// task of the current tokio runtime: a runtime that stops running its tasks stops feeding
/// it, and the manager restarts the daemon.
pub fn spawn_watchdog() {
    let mut usec = 0;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return;
    }
    let period = Duration::from_micros(usec / 2);
    tokio::spawn(async move {
        loop {
            notify(&[NotifyState::Watchdog]);
            tokio::time::sleep(period).await;
        }
    });
}

fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!(error = %e, "telling the service manager how the daemon stands");
    }
}
