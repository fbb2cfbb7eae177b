//! `ctk-agent replicate --every` / `--at`: replication that keeps going.
//!
//! Continuous mode cuts crash-consistent every `every` (sub-second allowed) and
//! application-consistent every `app_every`; scheduled mode cuts at fixed local times of day
//! (incremental forever). Each cycle pushes everything written since the receiver's newest
//! point, so when the link is slower than the change rate the next cycle simply starts at
//! once and covers all that piled up: each block goes once, with its newest data, and the
//! agent never falls back to a full because it fell behind (its cursor keeps the receiver's
//! point answerable however long a push takes).
//!
//! A failed cycle (receiver unreachable, refused, agent busy) is logged and retried with a
//! growing pause; the process stays up. The RPO (age of the newest committed cut) is watched
//! on its own thread, so a push that takes too long is reported while it runs.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde_json::{Value, json};

use crate::replicate::{Cut, GroupSession, Replicate, Session};

/// What a long-running replication pushes each cycle.
#[derive(Clone, Copy, Debug)]
pub enum Subject<'a> {
    /// One disk.
    Disk(&'a str),
    /// Every disk of a consistency group, from one group cut (`replicate --group`).
    Group(&'a str),
}

/// One cycle of a long-running replication: one disk's push, or a group's.
trait Cycle {
    fn once(&mut self, cut: Cut) -> Result<Value>;
    fn can_quiesce(&self) -> bool;
}

impl Cycle for Session<'_> {
    fn once(&mut self, cut: Cut) -> Result<Value> {
        Session::once(self, cut, false)
    }

    fn can_quiesce(&self) -> bool {
        Session::can_quiesce(self)
    }
}

impl Cycle for GroupSession<'_> {
    fn once(&mut self, cut: Cut) -> Result<Value> {
        GroupSession::once(self, cut)
    }

    fn can_quiesce(&self) -> bool {
        GroupSession::can_quiesce(self)
    }
}

/// When a long-running replication cuts.
#[derive(Clone, Debug, Default)]
pub struct Schedule {
    /// Crash-consistent cut interval (continuous mode).
    pub every: Option<Duration>,
    /// Application-consistent cut interval (continuous mode; the disk's hooks and freezes).
    pub app_every: Option<Duration>,
    /// Times of day (seconds after local midnight) for scheduled mode; cuts use the disk's
    /// default consistency.
    pub at: Vec<u32>,
    /// Log a warning when the RPO exceeds this, and again when it recovers.
    pub rpo_warn: Option<Duration>,
    /// The kind of cut of a one-shot or scheduled (`at`) run.
    pub cut: Cut,
}

impl Schedule {
    pub fn is_once(&self) -> bool {
        self.every.is_none() && self.at.is_empty()
    }

    pub fn check(&self) -> Result<()> {
        if self.every.is_some() && !self.at.is_empty() {
            bail!("--every and --at are two modes: pick one");
        }
        if self.app_every.is_some() && self.every.is_none() {
            bail!(
                "--app-every adds application-consistent cuts to continuous mode: give --every too"
            );
        }
        if self.every.is_some() && self.cut != Cut::Default {
            bail!(
                "--consistency is for one run or --at: continuous mode cuts crash-consistent \
                 every --every and application-consistent every --app-every"
            );
        }
        for d in [self.every, self.app_every].into_iter().flatten() {
            if d < Duration::from_millis(100) {
                bail!("a cut interval below 100ms is not useful (each cut is a journal fsync)");
            }
        }
        Ok(())
    }
}

/// Parses `HH:MM` (local time of day) into seconds after midnight.
pub fn parse_time_of_day(text: &str) -> Result<u32> {
    let bad = || anyhow::anyhow!("time of day {text:?}: use HH:MM, 24-hour, local time");
    let (h, m) = text.split_once(':').ok_or_else(bad)?;
    let (h, m): (u32, u32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if h > 23 || m > 59 || text.len() > 5 {
        return Err(bad());
    }
    Ok(h * 3600 + m * 60)
}

/// Parses a rate in bytes per second (`ctk::units::parse_rate`): `500K`, `10M`, `0`.
pub fn parse_rate(text: &str) -> Result<u64> {
    ctk::units::parse_rate(text).map_err(anyhow::Error::msg)
}

/// The next instant, strictly after `now` (unix seconds), whose local time of day is one of
/// `times` (seconds after midnight). Daylight-saving changes are handled by asking the
/// system for the offset at each candidate.
pub fn next_daily(now: i64, times: &[u32]) -> Option<i64> {
    let offset_now = utc_offset(now);
    let local_midnight = (now + offset_now) - (now + offset_now).rem_euclid(86_400);
    (0..3)
        .flat_map(|day| {
            times
                .iter()
                .map(move |&t| local_midnight + day * 86_400 + t as i64)
        })
        .map(|local| local - utc_offset(local - offset_now))
        .filter(|&t| t > now)
        .min()
}

/// Seconds east of UTC at `t` in the local time zone (0 if the system cannot say).
fn utc_offset(t: i64) -> i64 {
    // SAFETY: localtime_r writes only into the tm we hand it, from a time_t we own.
    unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        let t = t as libc::time_t;
        if libc::localtime_r(&t, &mut tm).is_null() {
            0
        } else {
            tm.tm_gmtoff
        }
    }
}

static STOP: AtomicBool = AtomicBool::new(false);

/// Whether SIGINT or SIGTERM asked to stop (after `stop_on_signals`).
pub fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

extern "C" fn on_signal(_: libc::c_int) {
    // A second signal means "now": leave without finishing the push (the receiver copes
    // with a push cut short; nothing moves on this side before a commit ack).
    if STOP.swap(true, Ordering::SeqCst) {
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(130) };
    }
}

/// SIGINT and SIGTERM ask the loop to stop after the push under way.
pub fn stop_on_signals() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only touches an atomic, and may call _exit.
        unsafe {
            libc::signal(
                sig,
                on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
            )
        };
    }
}

/// Reads the bandwidth limit from `path` once a second when the file changed, so an
/// operator can change it while replication runs (`echo 10M > FILE`).
fn watch_rate_file(path: PathBuf, rate: Arc<AtomicU64>) {
    std::thread::spawn(move || {
        let mut seen = None;
        loop {
            let stamp = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
            if stamp != seen {
                seen = stamp;
                match std::fs::read_to_string(&path)
                    .map_err(anyhow::Error::from)
                    .and_then(|t| parse_rate(&t))
                {
                    Ok(r) => {
                        if rate.swap(r, Ordering::Relaxed) != r {
                            tracing::info!(bytes_per_s = r, file = %path.display(), "bandwidth limit changed");
                        }
                    }
                    Err(e) => tracing::warn!(
                        error = %e, file = %path.display(),
                        "the bandwidth limit file is unreadable: the limit stays as it was"
                    ),
                }
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    });
}

/// Warns when the RPO passes `limit` and says when it recovered. `newest_cut_ms` is the cut
/// time of the newest committed point (0 until the first commit: the RPO then counts from
/// `since_ms`, when replication started, a lower bound of the truth).
fn watch_rpo(limit: Duration, newest_cut_ms: Arc<AtomicU64>, since_ms: u64, disk: String) {
    std::thread::spawn(move || {
        let mut over = false;
        loop {
            let base = match newest_cut_ms.load(Ordering::Relaxed) {
                0 => since_ms,
                ms => ms,
            };
            let rpo = Duration::from_millis(ctk::unix_ms_now().saturating_sub(base));
            if rpo > limit && !over {
                over = true;
                tracing::warn!(%disk, rpo_s = rpo.as_secs_f64(), limit_s = limit.as_secs_f64(), "RPO exceeded");
            } else if rpo <= limit && over {
                over = false;
                tracing::info!(%disk, rpo_s = rpo.as_secs_f64(), limit_s = limit.as_secs_f64(), "RPO recovered");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    });
}

/// Sleeps until `until`, waking to check for a stop; false when asked to stop.
fn sleep_until(until: Instant) -> bool {
    loop {
        if STOP.load(Ordering::SeqCst) {
            return false;
        }
        let now = Instant::now();
        if now >= until {
            return true;
        }
        std::thread::sleep((until - now).min(Duration::from_millis(100)));
    }
}

/// Options of a long-running replication beyond its schedule.
pub struct Options {
    pub bwlimit: u64,
    pub bwlimit_file: Option<PathBuf>,
}

/// Replicates `subject` on `schedule` until SIGINT or SIGTERM (after the push under way).
/// `report` gets each cycle's outcome (a commit, or an error that
/// will be retried).
pub fn run(
    r: &Replicate,
    subject: Subject,
    control: crate::control::Control,
    schedule: &Schedule,
    options: &Options,
    report: &mut dyn FnMut(&Value),
) -> Result<()> {
    schedule.check()?;
    let rate = Arc::new(AtomicU64::new(options.bwlimit));
    if let Some(path) = &options.bwlimit_file {
        watch_rate_file(path.clone(), rate.clone());
    }
    let (disk, mut session): (&str, Box<dyn Cycle>) = match subject {
        Subject::Disk(d) => (d, Box::new(Session::open(r, d, control, rate)?)),
        Subject::Group(g) => (g, Box::new(GroupSession::open(r, g, control, rate)?)),
    };
    if schedule.app_every.is_some() && !session.can_quiesce() {
        bail!(
            "--app-every: {subject:?} has no pre_freeze hook and no freeze target, so no cut \
             of it can be application-consistent; configure [disk.cut] for it or leave out \
             --app-every"
        );
    }
    stop_on_signals();
    let newest_cut_ms = Arc::new(AtomicU64::new(0));
    if let Some(limit) = schedule.rpo_warn {
        watch_rpo(
            limit,
            newest_cut_ms.clone(),
            ctk::unix_ms_now(),
            disk.to_owned(),
        );
    }
    let mut next = match schedule.every {
        Some(_) => Instant::now(),
        None => next_scheduled(&schedule.at),
    };
    let mut next_app = schedule.app_every.map(|_| Instant::now());
    let mut pause = Duration::ZERO;
    while sleep_until(next) {
        let started = Instant::now();
        let cut = match (schedule.every, next_app) {
            (Some(_), Some(at)) if started >= at => Cut::Application,
            (Some(_), _) => Cut::Crash,
            (None, _) => schedule.cut,
        };
        match session.once(cut) {
            Ok(mut answer) => {
                pause = Duration::ZERO;
                let cut_ms = answer["cut_unix_ms"].as_u64().unwrap_or(0);
                newest_cut_ms.store(cut_ms, Ordering::Relaxed);
                answer["rpo_s"] = json!(ctk::unix_ms_now().saturating_sub(cut_ms) as f64 / 1000.0);
                tracing::info!(
                    %disk,
                    committed = %answer["committed"].as_str().unwrap_or(""),
                    changed_bytes = answer["changed_bytes"].as_u64().unwrap_or(0),
                    sent_bytes = answer["delta_bytes"].as_u64().unwrap_or(0),
                    rpo_s = answer["rpo_s"].as_f64().unwrap_or(0.0),
                    "replicated"
                );
                if cut == Cut::Application {
                    next_app = schedule.app_every.map(|d| started + d);
                }
                report(&answer);
            }
            Err(e) => {
                // Doubling pauses, from 1 s up to a minute, so a receiver that is down is
                // not hammered and one that comes back is found soon.
                pause = (pause * 2).clamp(Duration::from_secs(1), Duration::from_secs(60));
                tracing::warn!(%disk, error = %format!("{e:#}"), retry_in_s = pause.as_secs_f64(), "replication failed; retrying");
                report(
                    &json!({"disk": disk, "error": format!("{e:#}"), "retry_in_s": pause.as_secs_f64()}),
                );
                next = Instant::now() + pause;
                continue;
            }
        }
        next = match schedule.every {
            // Behind schedule (the push took longer than the interval): go again at once,
            // and that push carries everything that piled up.
            Some(every) => (started + every).max(Instant::now()),
            None => next_scheduled(&schedule.at),
        };
    }
    tracing::info!(%disk, "replication stopped");
    Ok(())
}

fn next_scheduled(at: &[u32]) -> Instant {
    let now = ctk::unix_ms_now() as i64 / 1000;
    let when = next_daily(now, at).unwrap_or(now + 86_400);
    Instant::now() + Duration::from_secs((when - now).max(0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_with_binary_units_and_refuse_nonsense() {
        assert_eq!(parse_rate("0").unwrap(), 0);
        assert_eq!(parse_rate("none").unwrap(), 0);
        assert_eq!(parse_rate("1500").unwrap(), 1500);
        assert_eq!(parse_rate("500K").unwrap(), 500 << 10);
        assert_eq!(parse_rate("10M\n").unwrap(), 10 << 20);
        assert_eq!(parse_rate("2GiB/s").unwrap(), 2 << 30);
        for bad in ["", "ten", "10X", "-1", "99999999999999999999G", "1.5M"] {
            assert!(parse_rate(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn times_of_day_parse_and_refuse_nonsense() {
        assert_eq!(parse_time_of_day("02:00").unwrap(), 7200);
        assert_eq!(parse_time_of_day("23:59").unwrap(), 86_340);
        for bad in ["24:00", "2", "12:60", "ab:cd", "1:2:3", "-1:00"] {
            assert!(parse_time_of_day(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn the_next_daily_time_is_the_first_one_strictly_later_in_local_time() {
        // Checked against the local offset of the system, whatever zone CI runs in.
        let now = 1_800_000_000i64;
        let off = utc_offset(now);
        let local_tod = (now + off).rem_euclid(86_400) as u32;
        let later = (local_tod + 3600) % 86_400;
        let earlier = (local_tod + 86_400 - 3600) % 86_400;
        let next = next_daily(now, &[earlier, later]).unwrap();
        assert_eq!(next - now, 3600, "an hour later today");
        let next = next_daily(now, &[earlier]).unwrap();
        assert_eq!(next - now, 23 * 3600, "an hour earlier, tomorrow");
        let next = next_daily(now, &[local_tod]).unwrap();
        assert_eq!(next - now, 86_400, "now exactly is not later: tomorrow");
        assert_eq!(next_daily(now, &[]), None);
    }

    #[test]
    fn schedules_that_make_no_sense_are_refused() {
        let s = Schedule {
            every: Some(Duration::from_secs(1)),
            at: vec![0],
            ..Default::default()
        };
        assert!(s.check().is_err());
        let s = Schedule {
            app_every: Some(Duration::from_secs(60)),
            ..Default::default()
        };
        assert!(s.check().is_err());
        let s = Schedule {
            every: Some(Duration::from_millis(10)),
            ..Default::default()
        };
        assert!(s.check().is_err());
        let s = Schedule {
            every: Some(Duration::from_millis(500)),
            app_every: Some(Duration::from_secs(60)),
            ..Default::default()
        };
        assert!(s.check().is_ok() && !s.is_once());
    }
}
