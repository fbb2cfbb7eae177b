//! The control protocol (docs/format.md section 8): one JSON object per line each way over
//! the agent's control socket. A request is a `Request` (`{"cmd": "cut", ...}`); an answer
//! is `{"ok": true, ...}` with the fields of that command's answer type below, or
//! `{"ok": false, "error": "..."}`. The server (`control::handle`), the CLI and `replicate`
//! all use these types: no field is read by name anywhere else.

use std::path::PathBuf;

use ctk::{ChangeId, Consistency, GroupCutId, Since};
use serde::{Deserialize, Serialize};

pub use crate::disk::{Committing, CursorOp, CursorStatus, DiskStatus, FailbackOp, FailbackState};
pub use crate::pipeline::CutAnswer;

/// The commands, as `Request`'s `cmd` names them.
pub const COMMANDS: &[&str] = &[
    "status",
    "cut",
    "changed",
    "unchanged",
    "answerable",
    "export",
    "cursor",
    "resize",
    "failback",
    "group_cut",
    "group_export",
];

/// A request to the running agent. `disk` may be left out when it protects one disk.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// Every protected disk: sizes, cuts, cursors (RPO, backlog), counters.
    Status,
    /// Cut now (`consistency` left out: application if the disk has hooks or freezes).
    Cut {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        disk: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        consistency: Option<Consistency>,
    },
    /// The extents changed since a cut (or all), up to `to` (default: the latest cut).
    Changed {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        disk: Option<String>,
        since: Since,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to: Option<ChangeId>,
    },
    /// Whether a cut now would capture nothing since `since` (only ever true for a crash cut).
    Unchanged {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        disk: Option<String>,
        since: ChangeId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        consistency: Option<Consistency>,
    },
    /// Whether the changes since `since` can be named (else a replication compares digests).
    Answerable {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        disk: Option<String>,
        since: Since,
    },
    /// Cut and export a delta (see `Export`).
    Export(Export),
    /// Register, advance or drop a consumer cursor.
    Cursor {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        disk: Option<String>,
        op: CursorOp,
        name: String,
        /// Default: the latest cut.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        at: Option<ChangeId>,
        /// When the cut `at` names was taken (a replication's mover says: the RPO).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cut_unix_ms: Option<u64>,
        /// The replication's recent rate (the ETA).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rate_bytes_per_s: Option<f64>,
    },
    /// Grow or shrink the disk to `size` bytes.
    Resize {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        disk: Option<String>,
        size: u64,
    },
    /// A step of a failback (`ctk-agent failback` asks them): answered by `FailbackAnswer`.
    Failback {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        disk: Option<String>,
        #[serde(flatten)]
        op: FailbackOp,
    },
    /// Cut every disk of a consistency group at one instant: `GroupCutAnswer`.
    GroupCut {
        group: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        consistency: Option<Consistency>,
    },
    /// Cut a group at one instant and export each member's delta as `members` says (one
    /// `Export` per member, naming its disk; their `consistency` is the group's):
    /// `GroupExportAnswer`.
    GroupExport {
        group: String,
        members: Vec<Export>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        consistency: Option<Consistency>,
    },
}

impl Request {
    /// The disk the request names, if any.
    pub fn disk(&self) -> Option<&str> {
        match self {
            Request::Status | Request::GroupCut { .. } | Request::GroupExport { .. } => None,
            Request::Cut { disk, .. }
            | Request::Changed { disk, .. }
            | Request::Unchanged { disk, .. }
            | Request::Answerable { disk, .. }
            | Request::Cursor { disk, .. }
            | Request::Resize { disk, .. }
            | Request::Failback { disk, .. }
            | Request::Export(Export { disk, .. }) => disk.as_deref(),
        }
    }

    /// Names the disk (the CLI's `--disk`), unless the request already does.
    pub fn for_disk(mut self, name: Option<&str>) -> Request {
        let slot = match &mut self {
            Request::Status | Request::GroupCut { .. } | Request::GroupExport { .. } => {
                return self;
            }
            Request::Cut { disk, .. }
            | Request::Changed { disk, .. }
            | Request::Unchanged { disk, .. }
            | Request::Answerable { disk, .. }
            | Request::Cursor { disk, .. }
            | Request::Resize { disk, .. }
            | Request::Failback { disk, .. }
            | Request::Export(Export { disk, .. }) => disk,
        };
        if slot.is_none() {
            *slot = name.map(str::to_owned);
        }
        self
    }

    /// The consistency asked for, for the commands that cut.
    pub fn consistency(&self) -> Option<Consistency> {
        match self {
            Request::Cut { consistency, .. }
            | Request::GroupCut { consistency, .. }
            | Request::GroupExport { consistency, .. }
            | Request::Unchanged { consistency, .. }
            | Request::Export(Export { consistency, .. }) => *consistency,
            _ => None,
        }
    }
}

/// What an export sends, and where. `since` is a ChangeId or `"all"`, or `"compare"` for a
/// resync (then `base`, `unit` and `digests` say against what); `resume` continues a cut-off
/// push. Paths are absolute (the daemon's working directory is not the caller's); `path` may
/// be a FIFO (a replication streaming the export), `leaves` gets each exported block's leaf.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Export {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
    pub since: ExportSince,
    pub path: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leaves: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistency: Option<Consistency>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<ChangeId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digests: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<Resume>,
}

/// Where an export starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportSince {
    Since(Since),
    /// A resync: every unit whose hash differs from the receiver's.
    Compare,
}

impl Serialize for ExportSince {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            ExportSince::Since(since) => since.serialize(s),
            ExportSince::Compare => s.serialize_str("compare"),
        }
    }
}

impl<'de> Deserialize<'de> for ExportSince {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<ExportSince, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        if text == "compare" {
            return Ok(ExportSince::Compare);
        }
        let since = serde_json::Value::String(text.into_owned());
        Since::deserialize(since)
            .map(ExportSince::Since)
            .map_err(serde::de::Error::custom)
    }
}

/// The cut-off push an export resumes: its cut, and the disk offset below which the
/// receiver holds every record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resume {
    pub prior: ChangeId,
    pub next_offset: u64,
}

// ---- answers (each under `"ok": true`) ----

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExportAnswer {
    #[serde(flatten)]
    pub cut: CutAnswer,
    /// The cut the delta goes up to (the same as `change_id`).
    pub to: ChangeId,
    pub path: PathBuf,
    pub cut_unix_ms: u64,
    /// The disk's size at the cut: the delta's.
    pub disk_size: u64,
    pub changed_bytes: u64,
    pub data_bytes: u64,
    pub zero_bytes: u64,
    pub delta_bytes: u64,
    pub records: u64,
    /// Most memory copy-on-write took while writes raced the export.
    pub cow_peak_bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChangedAnswer {
    pub disk: String,
    pub to: ChangeId,
    pub changed_bytes: u64,
    /// `[offset, length]` pairs, ascending.
    pub extents: Vec<(u64, u64)>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UnchangedAnswer {
    pub disk: String,
    pub since: ChangeId,
    pub unchanged: bool,
    /// When the answer was true of the disk.
    pub as_of_unix_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AnswerableAnswer {
    pub disk: String,
    pub answerable: bool,
    pub why: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CursorAnswer {
    pub disk: String,
    pub op: CursorOp,
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResizeAnswer {
    pub disk: String,
    pub old_size: u64,
    pub new_size: u64,
}

/// The answer to `failback`: where it stands after the step (none once it ended).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FailbackAnswer {
    pub disk: String,
    pub state: Option<FailbackState>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusAnswer {
    pub disks: Vec<DiskStatus>,
    /// The consistency groups, each with its disks in the agent's order.
    #[serde(default)]
    pub groups: Vec<GroupStatus>,
}

/// A consistency group as `status` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupStatus {
    pub name: String,
    pub disks: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_read_as_the_json_the_cli_and_replicate_always_sent() {
        let r: Request = serde_json::from_str(r#"{"cmd": "status"}"#).unwrap();
        assert_eq!(r, Request::Status);
        let r: Request =
            serde_json::from_str(r#"{"cmd": "cut", "consistency": null, "disk": "vm1"}"#).unwrap();
        assert_eq!(r.disk(), Some("vm1"));
        let id = "0123456789abcdef0123456789abcdef/7";
        let line = format!(
            r#"{{"cmd": "export", "since": "compare", "base": "{id}", "unit": 65536, "digests": "/tmp/d", "path": "/tmp/f", "leaves": "/tmp/l"}}"#
        );
        let Request::Export(e) = serde_json::from_str(&line).unwrap() else {
            panic!()
        };
        assert_eq!(e.since, ExportSince::Compare);
        assert_eq!(e.base.unwrap().to_string(), id);
        let line = format!(
            r#"{{"cmd": "export", "since": "all", "path": "/f", "resume": {{"prior": "{id}", "next_offset": 9}}}}"#
        );
        let Request::Export(e) = serde_json::from_str(&line).unwrap() else {
            panic!()
        };
        assert_eq!(e.since, ExportSince::Since(Since::All));
        assert_eq!(e.resume.unwrap().next_offset, 9);
        // What does not parse is an error naming what, not a default.
        for bad in [
            r#"{"cmd": "cut", "consistency": "mostly"}"#,
            r#"{"cmd": "changed", "since": "yesterday"}"#,
            r#"{"cmd": "launch"}"#,
            r#"{"disk": "vm1"}"#,
            r#"{"cmd": "cursor", "op": "rewind", "name": "x"}"#,
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
        // And a request round-trips.
        let r = Request::Cursor {
            disk: Some("vm1".into()),
            op: CursorOp::Advance,
            name: "replica".into(),
            at: Some(id.parse().unwrap()),
            cut_unix_ms: Some(5),
            rate_bytes_per_s: None,
        };
        let back: Request = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
    }
}

/// A consistency group's cut: its identity, carried by every member's cut, and each
/// member's cut (all with the group's consistency).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupCutAnswer {
    pub group: String,
    pub group_cut: GroupCutId,
    pub consistency: Consistency,
    /// How long writes were held, on every member at once.
    pub hold_ms: f64,
    pub members: Vec<CutAnswer>,
}

/// A consistency group's export: the group's cut and each member's delta.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupExportAnswer {
    pub group: String,
    pub group_cut: GroupCutId,
    pub consistency: Consistency,
    pub cut_unix_ms: u64,
    pub members: Vec<ExportAnswer>,
}
