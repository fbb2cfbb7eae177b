//! `points --group` and `restore --group`: a consistency group's points, each one cut of
//! every member (`replicate --group`), listed and restored whole.

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde_json::json;

use ctk::GroupCutId;
use ctk_receiver::store::{self, groups};

use super::{ago, disks, when};

/// The agent's store directory that `store` and `agent` name.
fn agent_dir(store: &Path, agent: Option<&str>) -> Result<std::path::PathBuf> {
    Ok(disks(store, agent, None)?.0)
}

/// Lists the group points of `group`, oldest first.
pub fn points(store: &Path, agent: Option<&str>, group: &str, json: bool) -> Result<()> {
    let dir = agent_dir(store, agent)?;
    let catalog = groups::load(&ctk::vfs::RealFs, &dir, group)?;
    if catalog.points.is_empty() {
        let known = groups::groups(&ctk::vfs::RealFs, &dir)?;
        bail!(
            "group {group:?} has no group point in {} (groups with points: {})",
            dir.display(),
            if known.is_empty() {
                "none: `ctk-agent replicate --group` records them".to_owned()
            } else {
                known.join(", ")
            }
        );
    }
    if json {
        let points: Vec<serde_json::Value> = catalog
            .points
            .iter()
            .map(|p| {
                let mut v = json!(p);
                v["cut"] = json!(when(p.cut_unix_ms));
                v["committed"] = json!(when(p.committed_unix_ms));
                v
            })
            .collect();
        println!("{}", json!({"group": group, "points": points}));
        return Ok(());
    }
    let now_ms = ctk::unix_ms_now();
    println!("group {group}: {} group points", catalog.points.len());
    for p in &catalog.points {
        println!(
            "  {}  {}  cut {} ({})",
            p.group_cut,
            p.consistency.as_str(),
            when(p.cut_unix_ms),
            ago(p.cut_unix_ms, now_ms)
        );
        for (disk, id) in &p.members {
            println!("    {disk} {id}");
        }
    }
    Ok(())
}

/// Restores group point `point` (a group cut or `latest`) of `group` into the directory
/// `out`: one image per member, `<disk>.img`, each checked against its point's digest.
pub fn restore(
    store: &Path,
    agent: Option<&str>,
    group: &str,
    point: &str,
    out: &Path,
    force: bool,
    json: bool,
) -> Result<()> {
    let which = parse_group_point(point)?;
    let dir = agent_dir(store, agent)?;
    let gp = groups::find(&ctk::vfs::RealFs, &dir, group, which)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut members = Vec::new();
    for (disk, id) in &gp.members {
        let image = out.join(format!("{disk}.img"));
        let p = super::read::restore_file(&dir, disk, store::Pick::Id(*id), &image, force)
            .with_context(|| format!("restoring {disk} (point {id} of group {group:?})"))?;
        if !json {
            println!(
                "{disk}: point {id} written to {}{}",
                image.display(),
                if p.image_digest.is_some() {
                    " (read back: equal to the point's image digest)"
                } else {
                    " (the point has no image digest to check against)"
                }
            );
        }
        members.push(
            json!({"disk": disk, "point": id, "output": image.display().to_string(),
            "disk_size": p.disk_size, "image_digest": p.image_digest,
            "digest_verified": p.image_digest.is_some()}),
        );
    }
    if json {
        println!(
            "{}",
            json!({"group": group, "group_cut": gp.group_cut, "cut": when(gp.cut_unix_ms),
                   "cut_unix_ms": gp.cut_unix_ms, "consistency": gp.consistency,
                   "members": members})
        );
    } else {
        println!(
            "group {group}: group point {} (cut {}) restored into {}",
            gp.group_cut,
            when(gp.cut_unix_ms),
            out.display()
        );
    }
    Ok(())
}

/// Serves group point `point` (a group cut or `latest`) of `group` over NBD until SIGINT or
/// SIGTERM: every member's point pinned and served read-only on `dir/<disk>.sock` (export
/// named after the disk), all ready before the ready line, all stopped together.
pub fn expose(
    store: &Path,
    agent: Option<&str>,
    group: &str,
    point: &str,
    dir: &Path,
    json: bool,
) -> Result<()> {
    use ctk_receiver::export;
    use std::sync::Arc;
    let which = parse_group_point(point)?;
    let root = agent_dir(store, agent)?;
    let gp = groups::find(&ctk::vfs::RealFs, &root, group, which)?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // Every member pinned before any is served: all or none.
    let mut served = Vec::new();
    for (disk, id) in &gp.members {
        let exposure = store::Exposure::open(&root, disk, store::Pick::Id(*id))
            .with_context(|| format!("exposing {disk} (point {id} of group {group:?})"))?;
        exposure.reader()?;
        served.push((disk.clone(), exposure));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut exports = Vec::new();
        let mut uris = Vec::new();
        for (disk, exposure) in served {
            let listen = ctk_net::local::Listen::Unix(dir.join(format!("{disk}.sock")));
            let listener = export::bind(&listen).await?;
            uris.push(
                json!({"disk": disk, "point": exposure.point().change_id.to_string(),
                "size": exposure.point().disk_size, "uri": listener.uri(&disk)?}),
            );
            let served = export::Served {
                exposure: Arc::new(exposure),
                overlay: None,
            };
            exports.push((served, listener));
        }
        if json {
            println!(
                "{}",
                json!({"ready": true, "group": group, "group_cut": gp.group_cut,
                       "cut": when(gp.cut_unix_ms), "consistency": gp.consistency,
                       "writable": false, "members": uris})
            );
        } else {
            println!(
                "ready: group {group} as of {} (cut {}), read-only:",
                gp.group_cut,
                when(gp.cut_unix_ms)
            );
            for u in &uris {
                println!("  {}", u["uri"].as_str().unwrap_or(""));
            }
            println!("stop with Ctrl-C");
        }
        use std::io::Write;
        std::io::stdout().flush()?;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut tasks = tokio::task::JoinSet::new();
        for (served, listener) in exports {
            let mut rx = stop_rx.clone();
            tasks.spawn(async move {
                export::serve(served, listener, async move {
                    let _ = rx.wait_for(|stop| *stop).await;
                })
                .await
            });
        }
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        let _ = stop_tx.send(true);
        while let Some(done) = tasks.join_next().await {
            done??;
        }
        Ok::<_, anyhow::Error>(())
    })?;
    // Connections still open end with the runtime; then the pins go.
    drop(runtime);
    Ok(())
}

/// A group point named on the command line: a group cut, or `latest` (`None`).
fn parse_group_point(point: &str) -> Result<Option<GroupCutId>> {
    match point {
        "latest" => Ok(None),
        text => text.parse::<GroupCutId>().map(Some).map_err(|_| {
            anyhow::anyhow!(
                "--point {text:?}: with --group, a group cut (32 hex digits, see `points \
                 --group`) or latest"
            )
        }),
    }
}
