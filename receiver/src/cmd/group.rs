//! `points --group` and `restore --group`: a consistency group's points, each one cut of
//! every member (`replicate --group`), listed and restored whole.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde_json::json;

use ctk::GroupCutId;
use std::sync::Arc;

use ctk_receiver::export;
use ctk_receiver::store;
use ctk_receiver::store::groups::{self, GroupPoint};

use super::{ago, disks, when};

/// A disk of a store, or a consistency group (whose group points name one point of each
/// member), as `expose`, `drill start` and `drill stop` take them.
#[derive(clap::Args)]
pub(crate) struct Subject {
    /// An agent's store (STORE/AGENT, as `serve` lays it out), or the root with --agent.
    #[arg(long)]
    pub store: PathBuf,
    /// The agent, when --store is the receiver's root.
    #[arg(long)]
    pub agent: Option<String>,
    /// The disk, as `points` lists it.
    #[arg(long, required_unless_present = "group", conflicts_with = "group")]
    pub disk: Option<String>,
    /// A consistency group instead: every member of a group point (see `points --group`).
    #[arg(long)]
    pub group: Option<String>,
}

impl Subject {
    /// The one disk and its store directory (a group is the caller's other branch).
    pub(crate) fn disk_sel(self) -> Result<super::DiskSel> {
        let disk = self
            .disk
            .context("name the disk (--disk) or the group (--group)")?;
        Ok(super::DiskSel {
            store: self.store,
            agent: self.agent,
            disk,
        })
    }
}

/// A point served over NBD and where (`expose`, `drill start`).
#[derive(clap::Args)]
pub(crate) struct ServeSel {
    #[command(flatten)]
    pub subject: Subject,
    /// The point's ChangeId (see `points`), or `latest` for the newest; with --group, the
    /// group cut (see `points --group`) or `latest`.
    #[arg(long, default_value = "latest")]
    pub point: String,
    /// Where NBD clients connect: unix:PATH or tcp:ADDRESS:PORT (10809 is NBD's port).
    #[arg(long, required_unless_present = "group", conflicts_with = "group")]
    pub listen: Option<ctk_net::local::Listen>,
    /// With --group: the directory of the members' sockets (DISK.sock each; created).
    #[arg(long, conflicts_with = "disk")]
    pub listen_dir: Option<PathBuf>,
}

/// What `ServeSel` names: one disk's point and its listener, or a group's and the directory
/// of its members' sockets.
pub(crate) enum Target {
    Disk(super::PointSel, ctk_net::local::Listen),
    Group(GroupTarget),
}

/// A group point to serve: the store, the group, the point (a group cut or `latest`), and
/// the directory of the members' sockets.
pub(crate) struct GroupTarget {
    pub store: PathBuf,
    pub agent: Option<String>,
    pub group: String,
    pub point: String,
    pub dir: PathBuf,
}

impl ServeSel {
    pub(crate) fn target(self) -> Result<Target> {
        let ServeSel {
            subject,
            point,
            listen,
            listen_dir,
        } = self;
        if let Some(group) = subject.group {
            let dir = listen_dir.context("--group serves each member on --listen-dir DIR")?;
            return Ok(Target::Group(GroupTarget {
                store: subject.store,
                agent: subject.agent,
                group,
                point,
                dir,
            }));
        }
        let listen = listen.context("name where to listen (--listen)")?;
        let sel = super::PointSel {
            sel: subject.disk_sel()?,
            point: super::parse_point(&point).map_err(anyhow::Error::msg)?,
        };
        Ok(Target::Disk(sel, listen))
    }
}

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
pub(crate) fn expose(t: &GroupTarget, json: bool) -> Result<()> {
    let (_, gp, pinned) = pin_members(t)?;
    let served = pinned
        .into_iter()
        .map(|(disk, exposure)| {
            let served = export::Served {
                exposure: Arc::new(exposure),
                overlay: None,
            };
            (disk, served)
        })
        .collect();
    serve_members(&t.group, &gp, served, &t.dir, json)
}

/// The agent's store, a group point, and every member's exposure of it.
pub(crate) type Pinned = (PathBuf, GroupPoint, Vec<(String, store::Exposure)>);

/// Every member of group point `point` of `group` pinned (an exposure each), before any is
/// served: all or none. The agent's store, the group point, and the pins.
pub(crate) fn pin_members(t: &GroupTarget) -> Result<Pinned> {
    let (group, which) = (&t.group, parse_group_point(&t.point)?);
    let root = agent_dir(&t.store, t.agent.as_deref())?;
    let gp = groups::find(&ctk::vfs::RealFs, &root, group, which)?;
    let mut pinned = Vec::new();
    for (disk, id) in &gp.members {
        let exposure = store::Exposure::open(&root, disk, store::Pick::Id(*id))
            .with_context(|| format!("pinning {disk} (point {id} of group {group:?})"))?;
        exposure.reader()?;
        pinned.push((disk.clone(), exposure));
    }
    Ok((root, gp, pinned))
}

/// Serves each member's export on `dir/<disk>.sock` until SIGINT or SIGTERM, after one
/// ready line naming them all.
pub(crate) fn serve_members(
    group: &str,
    gp: &GroupPoint,
    served: Vec<(String, export::Served)>,
    dir: &Path,
    json: bool,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let writable = served.iter().any(|(_, s)| s.overlay.is_some());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut exports = Vec::new();
        let mut uris = Vec::new();
        for (disk, served) in served {
            let listen = ctk_net::local::Listen::Unix(dir.join(format!("{disk}.sock")));
            let listener = export::bind(&listen).await?;
            let p = served.exposure.point();
            uris.push(json!({"disk": disk, "point": p.change_id.to_string(),
                "size": p.disk_size, "uri": listener.uri(&disk)?}));
            exports.push((served, listener));
        }
        if json {
            println!(
                "{}",
                json!({"ready": true, "group": group, "group_cut": gp.group_cut,
                       "cut": when(gp.cut_unix_ms), "consistency": gp.consistency,
                       "writable": writable, "members": uris})
            );
        } else {
            println!(
                "ready: group {group} as of {} (cut {}), {}:",
                gp.group_cut,
                when(gp.cut_unix_ms),
                if writable {
                    "writable through throwaway overlays"
                } else {
                    "read-only"
                }
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
