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

pub use commit::{Committed, commit};
pub use pass::{Known, Pass, pass};
pub use view::DrView;

use std::path::{Path, PathBuf};

/// The failover's directory of disk `disk` under the agent's store `root`.
pub fn failover_dir(root: &Path, disk: &str) -> PathBuf {
    root.join(disk).join("failover")
}
