//! Exports through the control socket: a delta of the changes since a point (or a resync's
//! differing units, or the rest of a cut-off push) written as of a cut while writes go on.
//! One export (`export`), or one per member of a group cut (`control::group`): both check
//! their request and make their output first (`prepare`), start the copy-on-write snapshot
//! inside the cut's hold (`Prepared::begin`), and write after the release (`Prepared::write`).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use ctk::{ChangeId, Consistency, Since};
use serde_json::Value;
use tracing::info;

use super::proto::*;
use crate::disk::{DiskError, ExportPlan, ProtectedDisk};
use crate::pipeline;
use crate::server::Agent;

/// How long an export waits for one already running on the same disk (a killed
/// replication's export finishes on its own) before it is refused as busy.
const EXPORT_WAIT: std::time::Duration = std::time::Duration::from_secs(300);

/// What an export request asks for, checked against the disk.
fn plan(disk: &ProtectedDisk, e: &Export) -> Result<ExportPlan> {
    Ok(match (e.since, e.resume) {
        (ExportSince::Compare, _) => {
            let base = e
                .base
                .context("a compare export needs the receiver's point as \"base\"")?;
            let unit = e
                .unit
                .context("a compare export needs a \"unit\" in bytes")?;
            ctk::digest::unit_count(disk.size(), unit).map_err(anyhow::Error::msg)?;
            let theirs = e
                .digests
                .clone()
                .filter(|p| p.is_absolute())
                .context("a compare export needs an absolute \"digests\" path")?;
            ExportPlan::Compare { base, unit, theirs }
        }
        (ExportSince::Since(since), Some(r)) => {
            // The cut-off push's cut must be one this journal can still answer.
            disk.changed(Since::Id(r.prior), None)?;
            ExportPlan::Resume {
                since,
                prior: r.prior,
                next_offset: r.next_offset,
            }
        }
        (ExportSince::Since(since), None) => ExportPlan::Changed(since),
    })
}

/// An export checked and its output made, ready for its cut.
pub(super) struct Prepared<'a> {
    disk: &'a ProtectedDisk,
    plan: ExportPlan,
    path: PathBuf,
    leaves: Option<PathBuf>,
    /// The output is a file this export made (not a FIFO someone reads).
    to_file: bool,
    /// The snapshot began (inside the cut's hold).
    began: bool,
    size_at_cut: u64,
}

/// Checks export request `e` against `disk` and makes its output, before any cut: a bad
/// `since` or a path that cannot be written leaves no cut behind. Waits for an export of the
/// disk still running (a killed replication's finishes on its own).
pub(super) fn prepare<'a>(disk: &'a ProtectedDisk, e: &Export) -> Result<Prepared<'a>> {
    let plan = plan(disk, e)?;
    let path = e.path.clone();
    if !path.is_absolute() {
        bail!(
            "export path {path:?} must be absolute (the daemon's working directory is not yours)"
        );
    }
    let leaves = match &e.leaves {
        Some(p) if p.is_absolute() => Some(p.clone()),
        Some(p) => bail!("export leaves path {p:?} must be absolute"),
        None => None,
    };
    if let ExportPlan::Changed(since) | ExportPlan::Resume { since, .. } = plan {
        disk.changed(since, None)?;
    }
    let to_file = !std::fs::metadata(&path)
        .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_fifo(&m.file_type()));
    if to_file {
        std::fs::File::create(&path)
            .with_context(|| format!("cannot create the export file {}", path.display()))?;
    }
    let prepared = Prepared {
        disk,
        plan,
        path,
        leaves,
        to_file,
        began: false,
        size_at_cut: 0,
    };
    disk.wait_export_idle(EXPORT_WAIT)
        .inspect_err(|_| prepared.abandon())?;
    Ok(prepared)
}

impl Prepared<'_> {
    /// Inside the cut's hold: the snapshot as of cut `to` (NBD writes and the filesystems
    /// are released before the data is read, and copy-on-write keeps it as of the cut).
    pub(super) fn begin(&mut self, to: ChangeId) -> Result<Value> {
        self.disk.begin_snapshot(&self.plan, to)?;
        self.began = true;
        // The size cannot change while the snapshot lives (resize waits for it).
        self.size_at_cut = self.disk.size();
        Ok(Value::Null)
    }

    /// The cut failed: the snapshot this export began goes (one refused as busy must not
    /// touch the running export's), and so does the file it made.
    pub(super) fn abandon(&self) {
        if self.began {
            self.disk.abort_snapshot();
        }
        if self.to_file {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    /// Writes the delta as of the cut `report` describes; a failure leaves nothing
    /// half-written to be taken for a delta, and says which path.
    pub(super) fn write(
        &self,
        report: &pipeline::CutReport,
        cut_unix_ms: u64,
        zstd_level: i32,
    ) -> Result<ExportAnswer> {
        let (disk, path, leaves) = (self.disk, &self.path, self.leaves.as_deref());
        let exported = disk.export_snapshot(&self.plan, report.change_id, path, leaves, zstd_level);
        let (changed, s, peak) = exported.map_err(|err| self.failed(err))?;
        info!(disk = %disk.name, to = %report.change_id, "exported");
        Ok(ExportAnswer {
            cut: report.answer(&disk.name),
            to: report.change_id,
            path: path.clone(),
            cut_unix_ms,
            disk_size: self.size_at_cut,
            changed_bytes: changed,
            data_bytes: s.data_bytes,
            zero_bytes: s.zero_bytes,
            delta_bytes: s.stream_bytes,
            records: s.records,
            cow_peak_bytes: peak,
        })
    }

    /// Removes what a written export left (its file, if it made one, and its leaves).
    pub(super) fn discard(&self) {
        if self.to_file {
            let _ = std::fs::remove_file(&self.path);
        }
        if let Some(l) = &self.leaves {
            let _ = std::fs::remove_file(l);
        }
    }

    /// A failed export: nothing half-written is left to be taken for a delta, and the error
    /// names the path.
    fn failed(&self, err: DiskError) -> anyhow::Error {
        let removed = self.to_file && std::fs::remove_file(&self.path).is_ok();
        if let Some(l) = &self.leaves {
            let _ = std::fs::remove_file(l);
        }
        anyhow::Error::new(err).context(format!(
            "the export of disk {:?} to {} failed{}",
            self.disk.name,
            self.path.display(),
            if removed {
                " (its partial file was removed)"
            } else {
                ""
            }
        ))
    }
}

/// Cuts, and writes the delta the request asks for while writes go on (copy-on-write).
pub(super) fn export(
    agent: &Agent,
    disk: &ProtectedDisk,
    e: Export,
    want: Consistency,
) -> Result<ExportAnswer> {
    let mut prepared = prepare(disk, &e)?;
    let cut_unix_ms = ctk::unix_ms_now();
    let report = pipeline::cut(disk, want, |to| prepared.begin(to));
    let report = report.inspect_err(|_| prepared.abandon())?;
    prepared.write(&report, cut_unix_ms, agent.zstd_level)
}
