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
//! ```

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Deserialize;

use crate::pipeline::CutPolicy;

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
        assert_eq!(config.disks.len(), 1);
        assert_eq!(config.disks[0].cut.freeze, vec![PathBuf::from("/mnt/db1")]);
        assert_eq!(config.disks[0].cut.destage.len(), 1);
        let typo = example.replace("freeze_timeout_ms", "freeze_timout_ms");
        let err = toml::from_str::<Config>(&typo).unwrap_err().to_string();
        assert!(err.contains("freeze_timout_ms"), "{err}");
        assert!(toml::from_str::<Config>("on_failure = 3").is_err());
    }
}
