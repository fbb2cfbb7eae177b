//! Consumer cursors, and what their movers said as they moved (cut time, rate): the RPO,
//! backlog and ETA of `status`, kept in `<journal>.cursors` across restarts.

use std::io;
use std::path::{Path, PathBuf};

use ctk::{ChangeId, FileStorage, Since, Tracker};

use super::{DiskError, ProtectedDisk};

/// What a cursor's mover told the agent along with the move (see `ProtectedDisk::cursor`).
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct CursorMeta {
    /// When the cursor was last set (unix ms).
    pub set_unix_ms: u64,
    /// When the cut the cursor names was taken (unix ms): the RPO is the age of this.
    pub cut_unix_ms: Option<u64>,
    /// The replication's recent rate (changed bytes per second): the ETA is backlog / rate.
    pub rate_bps: Option<f64>,
}

/// One cursor in `status`: where it is, and for a replication cursor the RPO (age of the cut
/// it names), the backlog (bytes written since that cut, cut or not yet) and the ETA to
/// replicate it at the last reported rate.
pub(super) fn cursor_status(
    t: &Tracker<FileStorage>,
    name: &str,
    at: ChangeId,
    meta: Option<CursorMeta>,
) -> CursorStatus {
    let now = ctk::unix_ms_now();
    let secs = |ms: u64| now.saturating_sub(ms) as f64 / 1000.0;
    let block_size = t.geometry().block_size() as u64;
    let backlog = t
        .changed_blocks(Since::Id(at), t.latest())
        .ok()
        .map(|mut blocks| {
            blocks |= t.map().open_blocks();
            // The last block may be partial; a block-granular figure is close enough here.
            (blocks.len() * block_size).min(t.geometry().disk_size())
        });
    let rate = meta.and_then(|m| m.rate_bps).filter(|r| *r > 0.0);
    CursorStatus {
        name: name.to_owned(),
        at,
        set_unix_ms: meta.map(|m| m.set_unix_ms),
        age_s: meta.map(|m| secs(m.set_unix_ms)),
        cut_unix_ms: meta.and_then(|m| m.cut_unix_ms),
        rpo_s: meta.and_then(|m| m.cut_unix_ms).map(secs),
        backlog_bytes: backlog,
        rate_bytes_per_s: rate,
        eta_s: match (backlog, rate) {
            (Some(0), _) => Some(0.0),
            (Some(b), Some(r)) => Some(b as f64 / r),
            _ => None,
        },
    }
}

/// Where the cursors' meta is kept: `<journal>.cursors`, a JSON object of
/// `name -> {"at": ChangeId, ...CursorMeta}`.
fn cursor_meta_path(journal: &Path) -> PathBuf {
    let mut path = journal.as_os_str().to_owned();
    path.push(".cursors");
    PathBuf::from(path)
}

/// Longest `<journal>.cursors` read back (a few hundred bytes a cursor).
const CURSOR_META_MAX: u64 = 1 << 20;

#[derive(serde::Serialize, serde::Deserialize)]
struct SavedMeta {
    at: String,
    #[serde(flatten)]
    meta: CursorMeta,
}

/// The cursors' meta as saved, for the cursors the journal still holds at the same point
/// (a cursor moved since, say by a run whose save was lost, gets nothing: its RPO is
/// unknown until it moves again, never the age of another cut). A missing, oversized or
/// unreadable file gives nothing, with a warning for the last two: it only informs.
pub(super) fn load_cursor_meta(
    journal: &Path,
    tracker: &Tracker<FileStorage>,
) -> std::collections::HashMap<String, (ChangeId, CursorMeta)> {
    let path = cursor_meta_path(journal);
    let mut known = std::collections::HashMap::new();
    let text = match std::fs::metadata(&path) {
        Err(_) => return known,
        Ok(m) if m.len() > CURSOR_META_MAX => {
            tracing::warn!(file = %path.display(), "cursor meta file too large: ignored");
            return known;
        }
        Ok(_) => std::fs::read_to_string(&path),
    };
    let saved: std::collections::HashMap<String, SavedMeta> = match text
        .map_err(|e| e.to_string())
        .and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()))
    {
        Ok(saved) => saved,
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "cursor meta file unreadable: ignored");
            return known;
        }
    };
    for (name, at) in tracker.map().cursors() {
        if let Some(s) = saved.get(name)
            && s.at == at.to_string()
        {
            known.insert(name.to_owned(), (at, s.meta));
        }
    }
    known
}

/// Replaces `<journal>.cursors` with `known` (written beside and renamed, so a crash leaves
/// the old or the new file). Not fsynced: losing it only loses the RPO until the next move.
fn save_cursor_meta(
    journal: &Path,
    known: &std::collections::HashMap<String, (ChangeId, CursorMeta)>,
) {
    let saved: std::collections::BTreeMap<&str, SavedMeta> = known
        .iter()
        .map(|(name, (at, meta))| {
            (
                name.as_str(),
                SavedMeta {
                    at: at.to_string(),
                    meta: *meta,
                },
            )
        })
        .collect();
    let path = cursor_meta_path(journal);
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let written = serde_json::to_vec(&saved)
        .map_err(io::Error::other)
        .and_then(|bytes| std::fs::write(&tmp, bytes))
        .and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = written {
        tracing::warn!(file = %path.display(), error = %e, "could not save the cursor meta");
    }
}

impl ProtectedDisk {
    /// Registers, advances or drops a consumer cursor (durable when it returns). `meta`'s
    /// cut time and rate, when given, feed `status` (RPO, ETA).
    pub fn cursor(
        &self,
        op: CursorOp,
        name: &str,
        at: Option<ChangeId>,
        meta: CursorMeta,
    ) -> Result<(), DiskError> {
        let at = self.with_tracker(|t| {
            let at = at.unwrap_or(t.latest());
            match op {
                CursorOp::Register => t.register_cursor(name, at)?,
                CursorOp::Advance => t.advance_cursor(name, at)?,
                CursorOp::Drop => t.drop_cursor(name)?,
            }
            Ok(at)
        })?;
        if let Ok(mut known) = self.cursor_meta.lock() {
            if op == CursorOp::Drop {
                known.remove(name);
            } else {
                // A move that says nothing of the rate (a push too small to measure the link)
                // keeps the last one known.
                let before = known.get(name).map(|(_, m)| *m).unwrap_or_default();
                let meta = CursorMeta {
                    set_unix_ms: ctk::unix_ms_now(),
                    rate_bps: meta.rate_bps.or(before.rate_bps),
                    ..meta
                };
                known.insert(name.to_owned(), (at, meta));
            }
            save_cursor_meta(&self.journal, &known);
        }
        Ok(())
    }
}

/// What to do with a consumer cursor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CursorOp {
    Register,
    Advance,
    Drop,
}

impl std::str::FromStr for CursorOp {
    type Err = String;
    fn from_str(s: &str) -> Result<CursorOp, String> {
        match s {
            "register" => Ok(CursorOp::Register),
            "advance" => Ok(CursorOp::Advance),
            "drop" => Ok(CursorOp::Drop),
            _ => Err(format!("{s:?}: use register, advance or drop")),
        }
    }
}

/// One cursor in `status`: where it is, and for a replication cursor the RPO (age of the cut
/// it names, or of the moment the replica was last found in sync), the backlog and the ETA.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CursorStatus {
    pub name: String,
    pub at: ChangeId,
    pub set_unix_ms: Option<u64>,
    pub age_s: Option<f64>,
    pub cut_unix_ms: Option<u64>,
    pub rpo_s: Option<f64>,
    pub backlog_bytes: Option<u64>,
    pub rate_bytes_per_s: Option<f64>,
    pub eta_s: Option<f64>,
}
