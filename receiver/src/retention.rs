//! Which restore points a disk keeps: the newest `keep` by count, plus those chosen by
//! tiers such as "every point for an hour, hourly for a day, daily for a month"
//! (`1h:all,24h:1h,30d:1d`). A tier keeps, among the points younger than its span, the
//! newest point of each period (periods are aligned to the Unix epoch, so a point chosen
//! stays chosen while it ages within the tier). The newest point is always kept, and so is
//! the newest point of each consistency level (`keep_newest_of_each`): an application-
//! consistent point taken every 15 minutes is never pushed out by a count of crash-consistent
//! ones taken every second.
//!
//! Pure: the store applies the answer (dropping a point folds its pre-images into the next
//! newer kept point's undo, so every kept point restores exactly, at the same cost).

use std::time::Duration;

/// One tier: keep points younger than `within`, all of them or the newest per `every`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tier {
    pub within: Duration,
    pub every: Option<Duration>,
}

/// A disk's retention.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retention {
    /// The newest `keep` points are kept whatever their age (at least 1).
    pub keep: usize,
    pub tiers: Vec<Tier>,
}

impl From<usize> for Retention {
    fn from(keep: usize) -> Retention {
        Retention {
            keep,
            tiers: Vec::new(),
        }
    }
}

/// Most tiers in one policy.
const TIERS_MAX: usize = 16;

/// Parses `SPAN:EVERY[,SPAN:EVERY...]`, e.g. `1h:all,24h:1h,30d:1d` (spans and periods as
/// humantime durations: 90s, 15m, 1h, 7d; `all` keeps every point within the span).
pub fn parse_tiers(text: &str) -> Result<Vec<Tier>, String> {
    let mut tiers = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (within, every) = part.split_once(':').ok_or_else(|| {
            format!("retention tier {part:?}: use SPAN:EVERY, e.g. 24h:1h or 1h:all")
        })?;
        let span = |t: &str| {
            humantime::parse_duration(t.trim())
                .map_err(|e| format!("retention tier {part:?}: {t:?}: {e}"))
        };
        let within = span(within)?;
        let every = match every.trim() {
            "all" => None,
            t => Some(span(t)?),
        };
        if within.is_zero() || every.is_some_and(|e| e.as_millis() == 0) {
            return Err(format!(
                "retention tier {part:?}: spans and periods must be > 0"
            ));
        }
        tiers.push(Tier { within, every });
    }
    if tiers.len() > TIERS_MAX {
        return Err(format!("at most {TIERS_MAX} retention tiers"));
    }
    Ok(tiers)
}

/// Which of `times` (each point's cut time in unix ms, oldest point first) to keep at
/// `now_ms`. The answer has one entry per point.
pub fn select(times: &[u64], now_ms: u64, policy: &Retention) -> Vec<bool> {
    let n = times.len();
    let keep_count = policy.keep.max(1);
    let mut keep: Vec<bool> = (0..n).map(|i| i + keep_count >= n).collect();
    for tier in &policy.tiers {
        let within = tier.within.as_millis() as u64;
        let mut last_bucket = None;
        // Newest first: the first point seen in a period is that period's newest.
        for i in (0..n).rev() {
            if now_ms.saturating_sub(times[i]) > within {
                break;
            }
            match tier.every {
                None => keep[i] = true,
                Some(every) => {
                    let bucket = times[i] / (every.as_millis() as u64).max(1);
                    if last_bucket != Some(bucket) {
                        keep[i] = true;
                        last_bucket = Some(bucket);
                    }
                }
            }
        }
    }
    keep
}

/// Keeps the newest point of each level in `levels` (each point's consistency, oldest
/// point first; points whose level is unknown are left to the other rules): count-only
/// retention under frequent crash-consistent cuts must not drop the one application-
/// consistent point it has.
pub fn keep_newest_of_each<T: PartialEq>(levels: &[Option<T>], keep: &mut [bool]) {
    debug_assert_eq!(levels.len(), keep.len());
    for i in (0..levels.len()).rev() {
        if levels[i].is_some() && !levels[i + 1..].contains(&levels[i]) {
            keep[i] = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: u64 = 3_600_000;
    const D: u64 = 24 * H;

    #[test]
    fn the_newest_point_of_each_consistency_level_is_kept() {
        // One application point among crash points every second: count-only retention of 3.
        let levels: Vec<Option<&str>> = [None]
            .into_iter()
            .chain((0..20).map(|i| Some(if i == 5 { "application" } else { "crash" })))
            .collect();
        let times: Vec<u64> = (0..21).map(|i| i * 1000).collect();
        let mut keep = select(&times, 21_000, &3.into());
        keep_newest_of_each(&levels, &mut keep);
        let kept: Vec<usize> = (0..21).filter(|&i| keep[i]).collect();
        // The application point (index 6) stays; the unlabelled oldest one goes.
        assert_eq!(kept, vec![6, 18, 19, 20]);
    }

    #[test]
    fn tiers_parse_and_nonsense_is_refused() {
        let t = parse_tiers("1h:all, 24h:1h,30d:1d").unwrap();
        assert_eq!(t.len(), 3);
        assert_eq!(t[0].every, None);
        assert_eq!(t[2].within, Duration::from_secs(30 * 86_400));
        for bad in ["1h", "x:all", "1h:y", "0s:all", "1h:0s", "1h:all:2"] {
            assert!(parse_tiers(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(parse_tiers(&vec!["1h:all"; 17].join(",")).is_err());
    }

    #[test]
    fn count_alone_keeps_the_newest_and_never_none() {
        let times: Vec<u64> = (0..10).map(|i| i * H).collect();
        let k = select(&times, 10 * H, &3.into());
        assert_eq!(k.iter().filter(|&&k| k).count(), 3);
        assert!(k[7] && k[8] && k[9]);
        let k = select(&times, 10 * H, &0.into());
        assert_eq!(k, (0..10).map(|i| i == 9).collect::<Vec<_>>());
    }

    #[test]
    fn tiers_keep_everything_recent_then_one_per_period() {
        // A point every 10 minutes for 3 days.
        let now = 100 * D;
        let times: Vec<u64> = (0..(3 * 24 * 6)).rev().map(|i| now - i * H / 6).collect();
        let policy = Retention {
            keep: 1,
            tiers: parse_tiers("1h:all,24h:1h,30d:1d").unwrap(),
        };
        let k = select(&times, now, &policy);
        let kept: Vec<u64> = times
            .iter()
            .zip(&k)
            .filter(|(_, k)| **k)
            .map(|(t, _)| *t)
            .collect();
        // The last hour whole (7 points: 0, 10, ..., 60 minutes old).
        assert_eq!(kept.iter().filter(|&&t| now - t <= H).count(), 7);
        // One per clock hour over the last day (the newest of each): about 24 more.
        let hourly = kept
            .iter()
            .filter(|&&t| now - t > H && now - t <= D)
            .count();
        assert!((22..=24).contains(&hourly), "{hourly} hourly points");
        // One per day beyond: the newest point of each older calendar day.
        let daily: Vec<u64> = kept.iter().filter(|&&t| now - t > D).copied().collect();
        assert!((2..=3).contains(&daily.len()), "{daily:?}");
        for t in &daily {
            let newest_of_day = times.iter().filter(|&&u| u / D == t / D).max().unwrap();
            assert!(t == newest_of_day || now - newest_of_day <= D);
        }
        // Nothing else: far fewer than all 432.
        assert!(kept.len() < 40, "{}", kept.len());
        assert!(k[times.len() - 1], "the newest is kept");
    }

    #[test]
    fn a_point_chosen_for_its_period_stays_chosen_as_it_ages_within_the_tier() {
        let times: Vec<u64> = (0..200).map(|i| i * H / 4).collect();
        let policy = Retention {
            keep: 1,
            tiers: parse_tiers("10d:1h").unwrap(),
        };
        let before = select(&times, 50 * H, &policy);
        let later = select(&times, 60 * H, &policy);
        for i in 0..times.len() {
            // Periods that were complete at the first look keep the same point.
            if before[i] && times[i] / H < 49 {
                assert!(later[i], "point {i} was dropped as it aged");
            }
        }
    }
}
