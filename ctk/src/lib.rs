//! ctk: changed-block tracking for offsite replication.
//!
//! The library holds everything that decides what must be replicated, and nothing that
//! talks to a network: the change map ([`map`]), its durable journal ([`journal`]), the
//! tracker that makes the intent-before-write order impossible to get wrong ([`tracker`]),
//! the delta format ([`delta`]), the whole-image digest of a point ([`digest`]), the agent's push decisions ([`push`]), and the
//! filesystem door the receiver's store goes through, real or simulated ([`vfs`]). No
//! async, no sockets.

pub mod delta;
pub mod digest;
pub mod geometry;
pub mod id;
pub mod journal;
pub mod limits;
pub mod map;
pub mod push;
pub mod seeded;
pub mod tracker;
pub mod units;
pub mod vfs;
pub mod wire;

pub use geometry::{Extent, Geometry, GeometryError};
pub use id::{ChangeId, Generation, GroupCutId, ParseChangeIdError, unix_ms_now};
pub use journal::storage::{CrashMode, FileStorage, JournalStorage, MemStorage, Syncer};
pub use map::{ChangeMap, CursorError, MapOptions, QueryError, Since};
pub use tracker::{
    Intend, OpenOutcome, PendingCut, PendingIntent, Tracker, TrackerConfig, TrackerError,
    WriteIntent,
};
pub use wire::Consistency;
