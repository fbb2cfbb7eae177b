//! Failback: the DR disk (a failover's overlay over its point) sent back to the original
//! site, only what either side changed, and then committed as a new restore point so that
//! replication resumes with an increment.
//!
//! The agent asks for passes (`Request::FailbackPull`). A pass is a delta read from the DR
//! disk (`view`) of every block the original disk may hold otherwise (`pass`):
//! - the first pass: every block the overlay wrote (D), every block where the failover's
//!   point differs from the newest point (it may be older), and the blocks the agent names
//!   as written since the newest point (S); or, when the agent cannot name them, every unit
//!   whose hash differs from the agent's;
//! - later passes: what the overlay wrote since the previous pass's overlay cut.
//!
//! While the recovered VM runs, a pass reads the overlay's files beside the process that
//! serves it (`export::Peek`); the last pass stops that process and holds the overlay
//! itself, so that nothing writes after its cut. The cutover (`commit`) merges the DR disk
//! into the store as the agent's cut of the original disk, lifts the fence and removes the
//! overlay, in that order: the overlay is never discarded before the point is committed.

mod commit;
mod pass;
mod view;

pub use commit::{Committed, commit, merge};
pub use pass::{Known, Pass, pass, plan, write_blocks};
pub use view::DrView;

use std::path::{Path, PathBuf};

use ctk::ChangeId;
use roaring::RoaringBitmap;

use crate::store::StoreError;

/// The DR disk as failback reads it: the failover's point with its overlay's writes over it.
/// `DrView` is the one on disk; the simulation (`ctk-sim`) has one in memory, so that the
/// passes and the commit it checks are these.
pub trait DrDisk {
    /// The point the failover started from.
    fn point(&self) -> ChangeId;
    /// The disk's size in bytes.
    fn size(&self) -> u64;
    /// The overlay's cut a pass is complete as of, and the 4 KiB blocks written after
    /// `since` (`None`: since the point) up to it.
    fn changes(&mut self, since: Option<ChangeId>)
    -> Result<(ChangeId, RoaringBitmap), StoreError>;
    /// Every 4 KiB block the overlay wrote since the point.
    fn written(&mut self) -> Result<RoaringBitmap, StoreError>;
    /// Byte ranges where the failover's point may differ from the newest point.
    fn not_in_newest(&mut self) -> Result<Vec<(u64, u64)>, StoreError>;
    /// Reads the DR disk's bytes at `offset`.
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), StoreError>;
}
use serde::{Deserialize, Serialize};

/// Where failback stands, as the receiver saw it (`failover/failback.json`, for `failover
/// status`): rewritten after each pass is built; never synced (a status, not a record).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub passes: u64,
    pub last_unix_ms: u64,
    /// The overlay cut the last pass was complete as of.
    pub upto: Option<ChangeId>,
    pub last_blocks: u64,
    pub bytes_sent: u64,
    /// The last pass was the final one (the export stopped).
    pub last_final: bool,
    /// Blocks the overlay wrote after `upto` (filled in by `progress`, not stored).
    #[serde(default, skip_serializing)]
    pub blocks_left: Option<u64>,
}

const PROGRESS: &str = "failback.json";

/// Records a pass in the failover's `failback.json` (best effort: a status).
fn record(dir: &Path, pass: &Pass, bytes: u64, last: bool) {
    let mut p: Progress = std::fs::read(dir.join(PROGRESS))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    p.passes += 1;
    p.last_unix_ms = ctk::unix_ms_now();
    p.upto = Some(pass.upto);
    p.last_blocks = pass.blocks;
    p.bytes_sent += bytes;
    p.last_final = last;
    let tmp = dir.join("failback.json.tmp");
    let written = serde_json::to_vec_pretty(&p)
        .map_err(std::io::Error::other)
        .and_then(|b| std::fs::write(&tmp, b))
        .and_then(|()| std::fs::rename(&tmp, dir.join(PROGRESS)));
    if let Err(e) = written {
        tracing::warn!(error = %e, "recording the failback's progress");
    }
}

/// Where failback of `disk` stands, if it began: with the blocks the DR disk's overlay wrote
/// since the last pass (what the next one sends), read beside a running failover.
pub fn progress(root: &Path, disk: &str) -> Option<Progress> {
    let dir = failover_dir(root, disk);
    let mut p: Progress = serde_json::from_slice(&std::fs::read(dir.join(PROGRESS)).ok()?).ok()?;
    p.blocks_left = DrView::peek(root, disk)
        .and_then(|mut v| v.changes(p.upto))
        .ok()
        .map(|(_, blocks)| blocks.len());
    Some(p)
}

/// The failover's directory of disk `disk` under the agent's store `root`.
pub fn failover_dir(root: &Path, disk: &str) -> PathBuf {
    root.join(disk).join("failover")
}
