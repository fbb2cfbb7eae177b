//! The agent's configuration file (TOML). Flags cover the quick cases; the file covers
//! several disks, hooks, freeze targets and destage steps. Unknown keys are errors, so a
//! misspelt option is never silently ignored.
//!
//! ```toml
//! control = "/run/ctk-agent/control.sock"
//! listen = ["unix:/run/ctk-agent/nbd.sock"]
//! zstd_level = 1
//! # Bounds on what clients can make the agent hold (defaults shown; agent/src/limits.rs).
//! nbd_connections_max = 128
//! control_connections_max = 16
//! nbd_memory_max = "256M"
//! nbd_handshake_timeout_ms = 10000
//!
//! [[disk]]
//! name = "db1"
//! path = "/var/lib/images/db1.img"
//! block_size = "4K"
//!
//! [disk.cut]
//! pre_freeze = [{ command = "psql -c CHECKPOINT", timeout_ms = 10000 }]
//! freeze = ["/mnt/db1"]
//! freeze_timeout_ms = 10000
//! destage = [{ command = "echo 0 > /sys/block/bcache0/bcache/writeback_percent",
//!              clean_check = "grep -qx '0.0k' /sys/block/bcache0/bcache/dirty_data" }]
//! post_thaw = [{ command = "logger ctk cut done" }]
//! on_failure = "abort"            # or "crash-consistent"
//!
//! [[disk]]
//! name = "db1-wal"
//! path = "/var/lib/images/db1-wal.img"
//!
//! # Disks cut at one instant, always together (`cut --group db1`).
//! [[group]]
//! name = "db1"
//! disks = ["db1", "db1-wal"]
//! ```

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub control: Option<PathBuf>,
    #[serde(default)]
    pub listen: Vec<String>,
    pub zstd_level: Option<i32>,
    pub journal_dir: Option<PathBuf>,
    /// Most NBD connections at once (over it, a client is told so and closed).
    pub nbd_connections_max: Option<usize>,
    /// Most control connections at once.
    pub control_connections_max: Option<usize>,
    /// Payload memory all NBD connections share, as a size ("256M"; at least 32M).
    pub nbd_memory_max: Option<String>,
    /// How long an NBD client has to finish its handshake.
    pub nbd_handshake_timeout_ms: Option<u64>,
    #[serde(default, rename = "disk")]
    pub disks: Vec<DiskConfig>,
    /// Consistency groups: disks always cut at one instant.
    #[serde(default, rename = "group")]
    pub groups: Vec<GroupConfig>,
}

/// A consistency group (`[[group]]`): its name and its disks' names.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupConfig {
    pub name: String,
    pub disks: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    pub name: String,
    pub path: PathBuf,
    pub block_size: Option<String>,
    pub journal: Option<PathBuf>,
    #[serde(default)]
    pub cut: CutPolicy,
}

/// Longest configuration file read.
const CONFIG_LEN_MAX: u64 = 1 << 20;

pub fn load(path: &Path) -> Result<Config> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)
        .with_context(|| format!("opening the configuration {}", path.display()))?
        .take(CONFIG_LEN_MAX + 1)
        .read_to_string(&mut text)
        .with_context(|| format!("reading {} (it must be UTF-8 TOML)", path.display()))?;
    parse(&text)
        .with_context(|| format!("{} is not a valid ctk-agent configuration", path.display()))
}

/// Parses a configuration's text (at most 1 MiB; unknown keys are errors).
pub fn parse(text: &str) -> Result<Config> {
    anyhow::ensure!(
        text.len() as u64 <= CONFIG_LEN_MAX,
        "the configuration is larger than 1 MiB"
    );
    Ok(toml::from_str(text)?)
}

// ---- the cut pipeline of a disk (`[disk.cut]`; run by `pipeline`) ----

/// A command run with `sh -c`, killed (with its whole process group) at its timeout.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hook {
    pub command: String,
    #[serde(default = "default_hook_timeout_ms")]
    pub timeout_ms: u64,
}

/// Flushing a write-back cache below the tracking point: run `command` (if any), then poll
/// `clean_check` until it exits 0, within `timeout_ms`. Real cases: bcache (`echo 0 >
/// .../bcache/writeback_percent`, check `.../bcache/dirty_data` is 0), dm-writecache
/// (`dmsetup message DEV 0 flush`, check the status line's dirty count), lvmcache (switch to
/// the cleaner policy, check `lvs -o cache_dirty_blocks` is 0).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Destage {
    #[serde(default)]
    pub command: Option<String>,
    pub clean_check: String,
    #[serde(default = "default_destage_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default = "default_poll_ms")]
    pub poll_ms: u64,
}

/// What to do when a hook or the freeze fails.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum OnFailure {
    /// Abort the cut: everything thawed, the epoch still open, an error returned.
    #[default]
    Abort,
    /// Go on without the application's cooperation; the cut is recorded as crash-consistent.
    CrashConsistent,
}

/// The cut pipeline of one disk.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CutPolicy {
    #[serde(default)]
    pub pre_freeze: Vec<Hook>,
    /// Mount points to freeze (filesystems that live on this disk).
    #[serde(default)]
    pub freeze: Vec<PathBuf>,
    /// The watchdog thaws after this long, whatever happens to the agent.
    #[serde(default = "default_freeze_timeout_ms")]
    pub freeze_timeout_ms: u64,
    #[serde(default)]
    pub destage: Vec<Destage>,
    #[serde(default)]
    pub post_thaw: Vec<Hook>,
    #[serde(default)]
    pub on_failure: OnFailure,
}

impl CutPolicy {
    /// Whether a cut of this disk can be application-consistent: only one with at least one
    /// quiesce step (a pre-freeze hook or a freeze target) can. Post-thaw hooks and destage
    /// steps quiesce nothing.
    pub fn can_quiesce(&self) -> bool {
        !self.pre_freeze.is_empty() || !self.freeze.is_empty()
    }
}

fn default_hook_timeout_ms() -> u64 {
    30_000
}
fn default_destage_timeout_ms() -> u64 {
    60_000
}
fn default_poll_ms() -> u64 {
    100
}
fn default_freeze_timeout_ms() -> u64 {
    10_000
}

/// Parses sizes such as `4096`, `64K`, `256M`, `2G`, `1T` (binary units).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (digits, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("unknown size unit {c:?}: use K, M, G or T")),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a size such as 256M"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_example_parses_and_typos_are_errors() {
        let example: String = include_str!("config.rs")
            .lines()
            .skip_while(|l| !l.starts_with("//! ```toml"))
            .skip(1)
            .take_while(|l| !l.starts_with("//! ```"))
            .map(|l| format!("{}\n", l.trim_start_matches("//!").trim_start_matches(' ')))
            .collect();
        let config: Config = toml::from_str(&example).unwrap();
        assert_eq!(config.disks.len(), 2);
        assert_eq!(config.groups[0].disks, ["db1", "db1-wal"]);
        assert_eq!(config.disks[0].cut.freeze, vec![PathBuf::from("/mnt/db1")]);
        assert_eq!(config.disks[0].cut.destage.len(), 1);
        let typo = example.replace("freeze_timeout_ms", "freeze_timout_ms");
        let err = toml::from_str::<Config>(&typo).unwrap_err().to_string();
        assert!(err.contains("freeze_timout_ms"), "{err}");
        assert!(toml::from_str::<Config>("on_failure = 3").is_err());
    }

    #[test]
    fn sizes_parse_with_binary_units_and_refuse_garbage() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
