//! The control socket: one JSON object per line each way, `cut`, `export`, `changed`,
//! `unchanged`, `answerable`, `cursor`, `resize` and `status`, answered for the owner only (mode 0600).
//! Bounded: a request line is at most `CONTROL_LINE_MAX` bytes, a connection that sends
//! nothing for `CONTROL_IDLE_TIMEOUT` is closed, and connections over the cap get one line
//! saying so.

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use ctk::{ChangeId, Since};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::OwnedSemaphorePermit;
use tracing::{debug, info};

use crate::disk::{DiskError, ExportPlan};
use crate::limits::CONTROL_IDLE_TIMEOUT;
use crate::pipeline::{self, Consistency};
use crate::server::Agent;

/// Longest control request line.
const CONTROL_LINE_MAX: u64 = 64 * 1024;
/// How long an export waits for one already running on the same disk (a killed
/// replication's export finishes on its own) before it is refused as busy.
const EXPORT_WAIT: std::time::Duration = std::time::Duration::from_secs(300);

/// Serves one accepted control connection on a task of its own: with a permit of the cap,
/// its requests; without one, a line saying why it is refused.
pub(crate) fn spawn(
    agent: Arc<Agent>,
    stream: tokio::net::UnixStream,
    permit: Option<OwnedSemaphorePermit>,
) {
    tokio::spawn(async move {
        let Some(permit) = permit else {
            let cap = agent.limits.control_connections;
            let line = json!({"ok": false, "error": format!(
                "the agent serves at most {cap} control connections at once: try again")});
            let mut stream = stream;
            let _ = stream.write_all(format!("{line}\n").as_bytes()).await;
            return;
        };
        if let Err(e) = serve_control(agent, stream).await {
            debug!(error = %e, "control connection ended");
        }
        drop(permit);
    });
}

async fn serve_control(agent: Arc<Agent>, stream: tokio::net::UnixStream) -> Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read.take(u64::MAX));
    loop {
        let mut line = String::new();
        let mut limited = (&mut lines).take(CONTROL_LINE_MAX);
        let read = limited.read_line(&mut line);
        let Ok(n) = tokio::time::timeout(CONTROL_IDLE_TIMEOUT, read).await else {
            debug!("control connection idle: closed");
            return Ok(());
        };
        let n = n?;
        if n == 0 {
            return Ok(());
        }
        let response = if !line.ends_with('\n') && n as u64 >= CONTROL_LINE_MAX {
            json!({"ok": false, "error": "request line too long"})
        } else {
            let agent = agent.clone();
            tokio::task::block_in_place(|| match control_request(&agent, &line) {
                Ok(v) => v,
                Err(e) => json!({"ok": false, "error": format!("{e:#}")}),
            })
        };
        let mut out = serde_json::to_vec(&response)?;
        out.push(b'\n');
        write.write_all(&out).await?;
        if response["error"] == "request line too long" {
            return Ok(());
        }
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn parse_since(v: &Value) -> Result<Since> {
    match v.as_str() {
        Some("all") => Ok(Since::All),
        Some(text) => Ok(Since::Id(text.parse::<ChangeId>()?)),
        None => bail!("\"since\" must be a ChangeId or \"all\""),
    }
}

fn control_request(agent: &Agent, line: &str) -> Result<Value> {
    let request: Value = serde_json::from_str(line).context("request is not JSON")?;
    let cmd = request["cmd"].as_str().context("request has no \"cmd\"")?;
    if cmd == "status" {
        return Ok(
            json!({"ok": true, "disks": agent.disks.iter().map(|d| d.status()).collect::<Vec<_>>()}),
        );
    }
    let name = request["disk"].as_str().unwrap_or("");
    let disk = match (name, agent.disks.len()) {
        ("", 1) => &agent.disks[0],
        ("", _) => bail!("several disks are protected: name one with \"disk\""),
        (n, _) => agent
            .disk(n)
            .with_context(|| format!("no disk named {n:?}"))?,
    };
    let want = match request["consistency"].as_str() {
        None if !disk.policy.can_quiesce() => Consistency::Crash,
        None => Consistency::Application,
        Some("application") if !disk.policy.can_quiesce() => bail!(
            "disk {:?} has no pre_freeze hook and no freeze target, so no cut of it can be \
             application-consistent: configure [disk.cut] for it, or ask for a crash-consistent \
             cut",
            disk.name
        ),
        Some("application") => Consistency::Application,
        Some("crash") => Consistency::Crash,
        Some(other) => bail!("consistency {other:?}: use \"crash\" or \"application\""),
    };
    match cmd {
        "unchanged" => {
            // Would a cut now capture nothing since `since`? Only asked for crash cuts: an
            // application cut may write as it quiesces, and its label is itself news.
            let since = parse_since(&request["since"])?;
            let Since::Id(since) = since else {
                bail!("\"unchanged\" needs a ChangeId in \"since\"")
            };
            let unchanged = want == Consistency::Crash && disk.unchanged_since(since)?;
            Ok(json!({
                "ok": true, "disk": disk.name, "since": since.to_string(),
                "unchanged": unchanged, "as_of_unix_ms": unix_ms(),
            }))
        }
        "resize" => {
            let size = request["size"]
                .as_u64()
                .context("resize needs the new \"size\" in bytes")?;
            let r = disk.resize(size)?;
            Ok(json!({
                "ok": true, "disk": disk.name, "old_size": r.old_size, "new_size": r.new_size,
            }))
        }
        "cut" => {
            let report = pipeline::cut(disk, &disk.policy, want, |_| Ok(Value::Null))?;
            let mut answer = report.to_json();
            answer["ok"] = json!(true);
            answer["disk"] = json!(disk.name);
            Ok(answer)
        }
        "changed" => {
            let since = parse_since(&request["since"])?;
            let upto = match request["to"].as_str() {
                Some(t) => Some(t.parse::<ChangeId>()?),
                None => None,
            };
            let (upto, extents) = disk.changed(since, upto)?;
            let bytes: u64 = extents.iter().map(|e| e.length).sum();
            Ok(json!({
                "ok": true, "disk": disk.name, "to": upto.to_string(), "changed_bytes": bytes,
                "extents": extents.iter().map(|e| json!([e.offset, e.length])).collect::<Vec<_>>(),
            }))
        }
        "answerable" => {
            // Can this agent export the changes since that point? If not (another generation
            // after a journal loss, compacted away, unknown), a replication resyncs.
            let since = parse_since(&request["since"])?;
            let (answerable, why) = match disk.changed(since, None) {
                Ok(_) => (true, None),
                Err(DiskError::Tracker(ctk::TrackerError::Query(e))) => {
                    (false, Some(e.to_string()))
                }
                Err(e) => return Err(e.into()),
            };
            Ok(json!({"ok": true, "disk": disk.name, "answerable": answerable, "why": why}))
        }
        "export" => {
            let plan = match request["since"].as_str() {
                Some("compare") => {
                    let base = request["base"]
                        .as_str()
                        .context("a compare export needs the receiver's point as \"base\"")?
                        .parse::<ChangeId>()?;
                    let unit = request["unit"]
                        .as_u64()
                        .and_then(|u| u32::try_from(u).ok())
                        .context("a compare export needs a \"unit\" in bytes")?;
                    ctk::digest::unit_count(disk.size(), unit).map_err(anyhow::Error::msg)?;
                    let theirs = request["digests"]
                        .as_str()
                        .map(std::path::PathBuf::from)
                        .filter(|p| p.is_absolute())
                        .context("a compare export needs an absolute \"digests\" path")?;
                    ExportPlan::Compare { base, unit, theirs }
                }
                _ if request["resume"].is_object() => {
                    let r = &request["resume"];
                    let prior = r["prior"]
                        .as_str()
                        .context("a resumed export needs \"resume\".\"prior\", a ChangeId")?
                        .parse::<ChangeId>()?;
                    let next_offset = r["next_offset"]
                        .as_u64()
                        .context("a resumed export needs \"resume\".\"next_offset\"")?;
                    // The cut-off push's cut must be one this journal can still answer.
                    disk.changed(Since::Id(prior), None)?;
                    ExportPlan::Resume {
                        since: parse_since(&request["since"])?,
                        prior,
                        next_offset,
                    }
                }
                _ => ExportPlan::Changed(parse_since(&request["since"])?),
            };
            let path = request["path"]
                .as_str()
                .context("export needs an absolute \"path\"")?;
            let path = std::path::Path::new(path);
            if !path.is_absolute() {
                bail!(
                    "export path {path:?} must be absolute (the daemon's working directory is not yours)"
                );
            }
            let leaves = match request["leaves"].as_str() {
                Some(p) if std::path::Path::new(p).is_absolute() => Some(std::path::Path::new(p)),
                Some(p) => bail!("export leaves path {p:?} must be absolute"),
                None => None,
            };
            // Refuse a bad `since` before cutting, so it leaves no empty cut behind.
            if let ExportPlan::Changed(since) | ExportPlan::Resume { since, .. } = plan {
                disk.changed(since, None)?;
            }
            // A path that cannot be written fails here, before a cut is taken for nothing.
            let to_file = !std::fs::metadata(path)
                .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_fifo(&m.file_type()));
            if to_file {
                std::fs::File::create(path)
                    .with_context(|| format!("cannot create the export file {}", path.display()))?;
            }
            disk.wait_export_idle(EXPORT_WAIT)?;
            let cut_unix_ms = unix_ms();
            // The snapshot is taken inside the hold; NBD writes and the filesystems are
            // released before the data is read, and copy-on-write keeps it as of the cut.
            let mut began = false;
            let mut size_at_cut = 0;
            let report = pipeline::cut(disk, &disk.policy, want, |to| {
                disk.begin_snapshot(&plan, to)?;
                began = true;
                // The size cannot change while the snapshot lives (resize waits for it).
                size_at_cut = disk.size();
                Ok(Value::Null)
            });
            // A cut that failed after this export's snapshot began leaves it behind; one
            // refused as busy must not touch the running export's snapshot.
            let report = report.inspect_err(|_| {
                if began {
                    disk.abort_snapshot()
                }
                if to_file {
                    let _ = std::fs::remove_file(path);
                }
            })?;
            let exported =
                disk.export_snapshot(&plan, report.change_id, path, leaves, agent.zstd_level);
            let (changed, s, peak) = exported.map_err(|e| {
                // Nothing half-written is left to be taken for a delta.
                let removed = to_file && std::fs::remove_file(path).is_ok();
                if let Some(l) = leaves {
                    let _ = std::fs::remove_file(l);
                }
                anyhow::Error::new(e).context(format!(
                    "the export of disk {:?} to {} failed{}",
                    disk.name,
                    path.display(),
                    if removed {
                        " (its partial file was removed)"
                    } else {
                        ""
                    }
                ))
            })?;
            let mut report = report;
            report.inside = json!({
                "changed_bytes": changed, "data_bytes": s.data_bytes, "zero_bytes": s.zero_bytes,
                "delta_bytes": s.stream_bytes, "records": s.records, "cow_peak_bytes": peak,
            });
            info!(disk = %disk.name, to = %report.change_id, "exported");
            let mut answer = report.to_json();
            for (k, v) in report.inside.as_object().into_iter().flatten() {
                answer[k] = v.clone();
            }
            answer["ok"] = json!(true);
            answer["disk"] = json!(disk.name);
            answer["to"] = json!(report.change_id.to_string());
            answer["path"] = json!(path.display().to_string());
            answer["cut_unix_ms"] = json!(cut_unix_ms);
            answer["disk_size"] = json!(size_at_cut);
            Ok(answer)
        }
        "cursor" => {
            let op = request["op"].as_str().unwrap_or("");
            if !["register", "advance", "drop"].contains(&op) {
                bail!("cursor \"op\" must be register, advance or drop");
            }
            let name = request["name"]
                .as_str()
                .context("cursor needs a \"name\"")?;
            let at = match request["at"].as_str() {
                Some(t) => Some(t.parse::<ChangeId>()?),
                None => None,
            };
            // A replication that moves its cursor says when that point was cut and how
            // fast it went, for the RPO and ETA in `status`.
            let meta = crate::disk::CursorMeta {
                cut_unix_ms: request["cut_unix_ms"].as_u64(),
                rate_bps: request["rate_bytes_per_s"].as_f64(),
                ..Default::default()
            };
            disk.cursor(op, name, at, meta)?;
            Ok(json!({"ok": true, "disk": disk.name, "op": op, "name": name}))
        }
        other => bail!(
            "unknown command {other:?}: use status, cut, changed, unchanged, answerable, export, \
             cursor or resize"
        ),
    }
}
