//! The subcommands of `ctk-receiver`, one function each: `ingest` and `adopt` write a store,
//! `points`, `restore` and `verify` read one, `init` and `serve` face agents. What they share
//! (opening a store, finding the disk stores a `--store` names) is here.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use ctk::digest::ImageDigest;
use ctk_receiver::retention::{self, Tier};
use ctk_receiver::store::{self, DiskStore, Pick, Recovery};

mod config;
pub mod drill;
pub mod expose;
pub mod failover;
pub mod files;
pub mod group;
pub mod ingest;
mod materialize;
pub mod mount;
mod progress;
pub mod read;
pub mod serve;

/// Opens a disk's store, waiting for a merge in progress (a running `serve`) to finish.
pub(crate) fn open(store: &Path, disk: &str) -> Result<DiskStore> {
    let (s, recovery) = DiskStore::open_waiting(store, disk)
        .with_context(|| format!("opening the store of {disk:?} in {}", store.display()))?;
    match recovery {
        Recovery::Clean => {}
        Recovery::RolledForward(id) => {
            tracing::warn!(disk, point = %id, "an interrupted merge was finished")
        }
        Recovery::RolledBack(id) => {
            tracing::warn!(disk, point = %id, "an interrupted merge was undone")
        }
    }
    Ok(s)
}

/// `verify` found damage (exit code 3, apart from the other failures).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Damaged(pub String);

/// Whether `dir` is one disk's store: it has a manifest, or (a store whose first merge has
/// not committed yet) the store's own subdirectories.
pub(crate) fn is_disk_store(dir: &Path) -> bool {
    dir.join("manifest.json").is_file()
        || (dir.join("staging").is_dir() && dir.join("undo").is_dir())
}

/// The subdirectories of `dir` for which `pick` holds, sorted.
pub(crate) fn subdirs(dir: &Path, pick: impl Fn(&Path) -> bool) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_dir() && pick(&entry.path()) {
            out.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    out.sort();
    Ok(out)
}

/// Resolves `--store` (and `--agent`) to the directory holding disk stores, and the disks
/// asked for in it: the one named, or all of them. Never an empty answer: a level with no
/// disk store (a receiver's root, a wrong path, a disk that does not exist) is an error that
/// names what is there, so that a nightly `verify` cannot check nothing for ever.
pub(crate) fn disks(
    store: &Path,
    agent: Option<&str>,
    disk: Option<&str>,
) -> Result<(PathBuf, Vec<String>)> {
    if !store.is_dir() {
        bail!(
            "no store at {}: give the --store that `serve` writes to",
            store.display()
        );
    }
    let dir = match agent {
        Some(a) => {
            store::validate_name(a)?;
            let dir = store.join(a);
            if !dir.is_dir() {
                let agents = subdirs(store, |d| {
                    !subdirs(d, is_disk_store).unwrap_or_default().is_empty()
                })?;
                bail!(
                    "no agent {a:?} in {} (agents there: {})",
                    store.display(),
                    list(&agents)
                );
            }
            dir
        }
        None => store.to_owned(),
    };
    let here = subdirs(&dir, is_disk_store)?;
    if here.is_empty() {
        let agents = subdirs(&dir, |d| {
            !subdirs(d, is_disk_store).unwrap_or_default().is_empty()
        })?;
        if !agents.is_empty() {
            bail!(
                "{} is a receiver's root, holding the stores of agents {}: add --agent NAME \
                 (or give --store {}/NAME)",
                dir.display(),
                list(&agents),
                dir.display()
            );
        }
        bail!(
            "no disk store in {} (each disk has a directory with a manifest.json, under \
             STORE/AGENT as `serve` lays them out)",
            dir.display()
        );
    }
    match disk {
        None => Ok((dir, here)),
        Some(d) => {
            store::validate_name(d)?;
            if !here.iter().any(|h| h == d) {
                bail!(
                    "no disk {d:?} in {} (disks there: {})",
                    dir.display(),
                    list(&here)
                );
            }
            Ok((dir, vec![d.to_owned()]))
        }
    }
}

pub(crate) fn list(names: &[String]) -> String {
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

pub(crate) fn parse_digest(s: &str) -> Result<ImageDigest, String> {
    s.parse::<ImageDigest>().map_err(|e| e.to_string())
}

/// One disk of a store, as every command about one disk names it.
#[derive(clap::Args)]
pub(crate) struct DiskSel {
    /// An agent's store (STORE/AGENT, as `serve` lays it out), or the root with --agent.
    #[arg(long)]
    pub store: PathBuf,
    /// The agent, when --store is the receiver's root.
    #[arg(long)]
    pub agent: Option<String>,
    /// The disk, as `points` lists it.
    #[arg(long)]
    pub disk: String,
}

impl DiskSel {
    /// The directory holding the disk's store (checked to hold that disk).
    pub(crate) fn dir(&self) -> Result<PathBuf> {
        Ok(disks(&self.store, self.agent.as_deref(), Some(&self.disk))?.0)
    }
}

/// A point of one disk, as `expose`, `drill start`, `failover start` and `files` name it.
#[derive(clap::Args)]
pub(crate) struct PointSel {
    #[command(flatten)]
    pub sel: DiskSel,
    /// The point's ChangeId (see `points`), or `latest` for the newest.
    #[arg(long, value_parser = parse_point, default_value = "latest")]
    pub point: Pick,
}

impl PointSel {
    /// The directory holding the disk's store (checked to exist), and the point pinned.
    pub(crate) fn expose(&self, doing: &str) -> Result<(PathBuf, store::Exposure)> {
        let store = self.sel.dir()?;
        let disk = &self.sel.disk;
        let exposure = store::Exposure::open(&store, disk, self.point)
            .with_context(|| format!("{doing} {disk:?}"))?;
        // One reader now: a point whose files cannot be opened fails here, not at a client.
        exposure.reader()?;
        Ok((store, exposure))
    }
}

/// A point named on the command line: its ChangeId, or `latest` for the newest.
pub(crate) fn parse_point(s: &str) -> Result<Pick, String> {
    match s {
        "latest" => Ok(Pick::Latest),
        id => id
            .parse()
            .map(Pick::Id)
            .map_err(|e| format!("{e} (a ChangeId as `points` lists it, or latest)")),
    }
}

/// A time for people: RFC 3339 in the local zone (`ctk::units::local_time`).
pub(crate) fn when(unix_ms: u64) -> String {
    ctk::units::local_time(unix_ms)
}

/// How long before `now_ms` a time was, for people: `42 s ago`, `5 min ago`, `3 h ago`.
pub(crate) fn ago(unix_ms: u64, now_ms: u64) -> String {
    let s = now_ms.saturating_sub(unix_ms) / 1000;
    match s {
        0..120 => format!("{s} s ago"),
        120..7_200 => format!("{} min ago", s / 60),
        7_200..172_800 => format!("{} h ago", s / 3600),
        _ => format!("{} d ago", s / 86_400),
    }
}

/// Tiers as one flag value (clap would read a bare `Vec` as a repeated flag).
#[derive(Clone, Debug)]
pub(crate) struct TierList(pub Vec<Tier>);

pub(crate) fn parse_tier_list(text: &str) -> Result<TierList, String> {
    retention::parse_tiers(text).map(TierList)
}
