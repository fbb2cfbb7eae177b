//! The commands that read a store: `points`, `restore` and `verify`. They take an agent's
//! store (or the root and `--agent`) and never pass silently over a level with nothing in it.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::json;

use ctk_receiver::store;

use super::{Damaged, ago, disks, is_disk_store, open, parse_point, subdirs, when};

#[derive(Args)]
pub struct Points {
    /// An agent's store (STORE/AGENT, as `serve` lays it out), or the root with --agent.
    #[arg(long)]
    pub store: PathBuf,
    /// The agent whose disks to list, when --store is the receiver's root.
    #[arg(long)]
    pub agent: Option<String>,
    /// One disk (default: every disk of the agent).
    #[arg(long)]
    pub disk: Option<String>,
    /// A consistency group's points instead (`replicate --group`): one line per group
    /// point, with each member's point.
    #[arg(long, conflicts_with = "disk")]
    pub group: Option<String>,
    /// One JSON array, per disk: {"disk", "rpo_s", "exposed", "failed_over", "points"}, each
    /// point its manifest fields (docs/format.md section 5) plus "committed" and "cut" as
    /// RFC 3339 in the local zone. With --group: {"group", "points"}, each point its catalog
    /// fields (docs/format.md) plus "cut" and "committed" as RFC 3339.
    #[arg(long)]
    pub json: bool,
}

pub fn points(args: Points) -> Result<()> {
    let Points {
        store,
        agent,
        disk,
        group,
        json,
    } = args;
    if let Some(group) = group {
        return super::group::points(&store, agent.as_deref(), &group, json);
    }
    let mut all = Vec::new();
    let (store, names) = disks(&store, agent.as_deref(), disk.as_deref())?;
    // Read without the store's lock, so a running receiver's merge does not block it.
    for d in names {
        let points = store::committed_points(&store, &d)?;
        // The RPO as this side sees it: the age of the newest committed cut.
        let now_ms = ctk::unix_ms_now();
        let rpo_s = points
            .last()
            .and_then(|p| p.cut_unix_ms)
            .map(|ms| now_ms.saturating_sub(ms) as f64 / 1000.0);
        // A point an exposure, drill or mount holds: retention keeps it meanwhile.
        let exposed = store::exposed_point(&store, &d)?.map(|id| id.to_string());
        // A failed-over disk takes no pushes: its RPO stands still on purpose.
        let failed_over = store::failed_over(&store, &d)?.map(|f| {
            json!({"point": f.point.to_string(), "since": f.since_rfc3339(),
                   "since_unix_ms": f.since_unix_ms})
        });
        // Each time also as RFC 3339 in the local zone, beside its unix milliseconds.
        let points: Vec<serde_json::Value> = points
            .iter()
            .map(|p| {
                let mut v = json!(p);
                v["committed"] = json!(when(p.committed_unix_ms));
                v["cut"] = json!(p.cut_unix_ms.map(when));
                v
            })
            .collect();
        all.push(json!({"disk": d, "rpo_s": rpo_s, "exposed": exposed,
                        "failed_over": failed_over, "points": points}));
    }
    if json {
        println!("{}", serde_json::Value::Array(all));
    } else {
        for d in &all {
            match d["rpo_s"].as_f64() {
                Some(rpo) => println!(
                    "{}: newest cut {rpo:.1}s ago",
                    d["disk"].as_str().unwrap_or("")
                ),
                None => println!("{}:", d["disk"].as_str().unwrap_or("")),
            }
            if let Some(f) = d["failed_over"].as_object() {
                println!(
                    "  FAILED OVER at {} since {}: pushes are refused until failback \
                     (`failover status`)",
                    f["point"].as_str().unwrap_or(""),
                    f["since"].as_str().unwrap_or("")
                );
            }
            if let Some(id) = d["exposed"].as_str() {
                println!("  {id} is exposed (expose, drill or mount): kept until that ends");
            }
            let now_ms = ctk::unix_ms_now();
            for p in d["points"].as_array().into_iter().flatten() {
                // The cut is the point's moment; the commit, when it reached this site.
                let at = match (p["cut_unix_ms"].as_u64(), p["committed_unix_ms"].as_u64()) {
                    (Some(cut), _) => format!("cut {} ({})", when(cut), ago(cut, now_ms)),
                    (None, Some(c)) => format!("committed {} ({})", when(c), ago(c, now_ms)),
                    (None, None) => "time unknown".into(),
                };
                println!(
                    "  {}  {} bytes  {}  {at}  {}",
                    p["change_id"].as_str().unwrap_or(""),
                    p["disk_size"],
                    p["consistency"].as_str().unwrap_or("consistency unknown"),
                    if p["digest_checked"] == true {
                        "digest checked"
                    } else {
                        "digest NOT checked (the sender sent none)"
                    }
                );
                if let Some(t) = p.get("tested").filter(|t| !t.is_null()) {
                    let at = t["stopped_unix_ms"].as_u64().map(when);
                    println!(
                        "    drill {} at {}{}",
                        t["result"].as_str().unwrap_or("?"),
                        at.unwrap_or_default(),
                        t["note"]
                            .as_str()
                            .map(|n| format!(": {n}"))
                            .unwrap_or_default()
                    );
                }
            }
        }
    }
    Ok(())
}

#[derive(Args)]
pub struct Restore {
    /// An agent's store (STORE/AGENT), or the root with --agent.
    #[arg(long)]
    pub store: PathBuf,
    /// The agent, when --store is the receiver's root.
    #[arg(long)]
    pub agent: Option<String>,
    #[arg(long, required_unless_present = "group")]
    pub disk: Option<String>,
    /// Restore a consistency group's point instead: one image per member, DISK.img in the
    /// directory -o names (created).
    #[arg(long, conflicts_with = "disk")]
    pub group: Option<String>,
    /// The point's ChangeId (see `points`); `latest` for the newest. With --group, the
    /// group cut (32 hex digits, see `points --group`) or `latest`.
    #[arg(long)]
    pub point: String,
    /// The image file to write. It is written beside its final name and renamed into place
    /// once whole and checked, so a failed restore never leaves a partial image there.
    /// `-` writes the image to stdout (read through an exposure, the point pinned meanwhile;
    /// its digest is checked as it streams, and a mismatch found after the last byte exits
    /// with 3). A block device (an LV, a /dev/nbdX) is written in place, never resized,
    /// and only with --force; it must hold at least the point's size, and what lies past it
    /// is left alone. With --group, the directory.
    #[arg(short = 'o', long)]
    pub output: PathBuf,
    /// Replace OUTPUT if it exists (never done without it).
    #[arg(long)]
    pub force: bool,
    #[arg(long)]
    pub json: bool,
}

/// `restore -o -`: point `p` of `disk` on stdout, read through an exposure (the point pinned
/// meanwhile), the image's digest computed as it streams and compared at the end (the bytes
/// are gone by then: a mismatch is reported as damage, exit 3).
fn restore_to_stdout(
    store: &std::path::Path,
    disk: &str,
    p: &store::Point,
    block: Option<u32>,
) -> Result<()> {
    use std::io::Write;
    let exposure = store::Exposure::open(store, disk, store::Pick::Id(p.change_id))?;
    let mut reader = exposure.reader()?;
    let size = reader.size();
    let mut leaves = match (p.image_digest, block) {
        (Some(_), Some(bs)) => Some(ctk::digest::Leaves::zeroed(size, bs)?),
        _ => None,
    };
    let mut out = std::io::stdout().lock();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    let mut progress = super::progress::Progress::new("restoring");
    while at < size {
        progress.update(at, size);
        let n = (size - at).min(buf.len() as u64) as usize;
        reader.read_at(&mut buf[..n], at)?;
        if let Some(l) = leaves.as_mut() {
            l.set_data(at, &buf[..n])?;
        }
        out.write_all(&buf[..n])
            .context("writing the image to stdout")?;
        at += n as u64;
    }
    out.flush().context("writing the image to stdout")?;
    progress.update(size, size);
    if let (Some(l), Some(expected)) = (leaves, p.image_digest)
        && l.digest() != expected
    {
        return Err(Damaged(format!(
            "point {} of {disk} was written to stdout but its digest is {}, not {expected}: \
             the store is damaged (run `ctk-receiver verify`)",
            p.change_id,
            l.digest()
        ))
        .into());
    }
    Ok(())
}

pub fn restore(args: Restore) -> Result<()> {
    let Restore {
        store,
        agent,
        disk,
        group,
        point,
        output,
        force,
        json,
    } = args;
    if let Some(group) = group {
        return super::group::restore(
            &store,
            agent.as_deref(),
            &group,
            &point,
            &output,
            force,
            json,
        );
    }
    let disk = disk.context("name the disk to restore with --disk (or a group with --group)")?;
    let point = parse_point(&point).map_err(anyhow::Error::msg)?;
    if output.as_os_str() == "-" {
        if json {
            bail!("--json prints to stdout, where -o - writes the image: use one of them");
        }
        let (store, _) = disks(&store, agent.as_deref(), Some(&disk))?;
        let s = open(&store, &disk)?;
        let p = match point {
            store::Pick::Latest => s.points().last(),
            store::Pick::Id(id) => s.points().iter().find(|p| p.change_id == id),
        }
        .cloned()
        .with_context(|| format!("no such point of {disk}: see `ctk-receiver points`"))?;
        let block = s.block_size();
        drop(s);
        return restore_to_stdout(&store, &disk, &p, block);
    }
    let (store, _) = disks(&store, agent.as_deref(), Some(&disk))?;
    let p = restore_file(&store, &disk, point, &output, force)?;
    if json {
        println!(
            "{}",
            json!({"disk": disk, "point": p.change_id, "output": output.display().to_string(), "disk_size": p.disk_size, "image_digest": p.image_digest, "digest_verified": p.image_digest.is_some()})
        );
    } else {
        println!(
            "{disk}: point {} written to {}{}",
            p.change_id,
            output.display(),
            if p.image_digest.is_some() {
                " (read back: equal to the point's image digest)"
            } else {
                " (the point has no image digest to check against)"
            }
        );
    }
    Ok(())
}

/// Restores point `point` of `disk` in the agent's store `store` into the image file
/// `output`: written beside it, checked, then renamed into place; an existing file is
/// replaced only with `force`. The point restored.
pub(crate) fn restore_file(
    store: &std::path::Path,
    disk: &str,
    point: store::Pick,
    output: &std::path::Path,
    force: bool,
) -> Result<store::Point> {
    if let Ok(m) = std::fs::metadata(output)
        && std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type())
    {
        return restore_device(store, disk, point, output, force);
    }
    // Anything else but a file would be replaced by the rename below.
    if let Ok(m) = std::fs::metadata(output)
        && !m.is_file()
    {
        bail!(
            "{} is neither a regular file nor a block device: restore writes an image file \
             or onto a device",
            output.display()
        );
    }
    if !force && std::fs::symlink_metadata(output).is_ok() {
        bail!(
            "{} exists: restore does not overwrite it (add --force to replace it)",
            output.display()
        );
    }
    let name = output
        .file_name()
        .with_context(|| format!("{} names no file", output.display()))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(".ctk-restore");
    let tmp = output.with_file_name(tmp_name);
    let s = open(store, disk)?;
    let point = resolve(&s, point)?;
    let mut progress = super::progress::Progress::new("restoring");
    let restored = s.restore(point, &tmp, |done, total| progress.update(done, total));
    drop(progress);
    let p = match restored {
        Ok(p) => p,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e.into());
        }
    };
    std::fs::rename(&tmp, output)
        .with_context(|| format!("renaming {} to {}", tmp.display(), output.display()))?;
    Ok(p)
}

/// The point `point` picks in `s`.
fn resolve(s: &store::DiskStore, point: store::Pick) -> Result<ctk::ChangeId> {
    Ok(match point {
        store::Pick::Latest => s
            .points()
            .last()
            .map(|p| p.change_id)
            .context("the store holds no point yet")?,
        store::Pick::Id(id) => id,
    })
}

/// `restore` onto the block device `device` (an LV, a `/dev/nbdX`): written in place, never
/// resized, only with `force` (whatever it held is overwritten).
fn restore_device(
    store: &std::path::Path,
    disk: &str,
    point: store::Pick,
    device: &std::path::Path,
    force: bool,
) -> Result<store::Point> {
    use std::io::{Seek, SeekFrom};
    if !force {
        bail!(
            "{} is a block device: restore overwrites what it holds only with --force",
            device.display()
        );
    }
    let size = std::fs::File::open(device)
        .and_then(|mut f| f.seek(SeekFrom::End(0)))
        .with_context(|| format!("reading the size of {}", device.display()))?;
    let s = open(store, disk)?;
    let point = resolve(&s, point)?;
    let mut progress = super::progress::Progress::new("restoring");
    let p = s.restore_to_device(point, device, size, |done, total| {
        progress.update(done, total)
    })?;
    drop(progress);
    Ok(p)
}

#[derive(Args)]
pub struct Verify {
    /// An agent's store (STORE/AGENT), or the root with --agent (or --all-agents).
    #[arg(long)]
    pub store: PathBuf,
    /// The agent, when --store is the receiver's root.
    #[arg(long, conflicts_with = "all_agents")]
    pub agent: Option<String>,
    /// Every agent's disks, when --store is the receiver's root.
    #[arg(long)]
    pub all_agents: bool,
    /// One disk (default: every disk of the agent).
    #[arg(long)]
    pub disk: Option<String>,
    #[arg(long)]
    pub json: bool,
}

pub fn verify(args: Verify) -> Result<()> {
    let Verify {
        store,
        agent,
        all_agents,
        disk,
        json,
    } = args;
    let stores = if all_agents {
        let found = subdirs(&store, |d| {
            !subdirs(d, is_disk_store).unwrap_or_default().is_empty()
        })?;
        if found.is_empty() {
            bail!("no agent's store in {}", store.display());
        }
        found
            .iter()
            .map(|a| disks(&store, Some(a), disk.as_deref()))
            .collect::<Result<Vec<_>>>()?
    } else {
        vec![disks(&store, agent.as_deref(), disk.as_deref())?]
    };
    let mut bad = 0;
    let mut checked = 0;
    for (dir, names) in stores {
        for d in names {
            let result = open(&dir, &d).and_then(|s| Ok(s.verify()?));
            checked += 1;
            let at = dir.display().to_string();
            match (&result, json) {
                (Ok(v), true) => println!(
                    "{}",
                    json!({"store": at, "disk": d, "ok": true, "points": v.points,
                           "files_checked": v.files, "bytes_checked": v.bytes,
                           "full_image_checked": v.full_checked})
                ),
                (Ok(v), false) => println!(
                    "{at}/{d}: ok: {} point(s), {} file(s), {} bytes read (undo files by \
                     CRC{})",
                    v.points,
                    v.files,
                    v.bytes,
                    if v.full_checked {
                        ", full.img by the newest point's image digest"
                    } else {
                        "; full.img NOT checked: the newest point has no image digest"
                    }
                ),
                (Err(e), true) => println!(
                    "{}",
                    json!({"store": at, "disk": d, "ok": false, "error": format!("{e:#}")})
                ),
                (Err(e), false) => println!("{at}/{d}: DAMAGED: {e:#}"),
            }
            bad += result.is_err() as usize;
        }
    }
    if bad > 0 {
        return Err(Damaged(format!("{bad} of {checked} disk(s) failed verification")).into());
    }
    Ok(())
}
