//! `failover start`, `status` and `rollback`: the replica brought up for real at the DR site.
//!
//! `start` fences the disk (the store refuses every push for it, `store::fence`), pins its
//! point and serves it writable through a tracked, durable overlay (`export::Tracked`) in
//! `<disk>/failover/`, in the foreground like `expose`. Run again after a stop or a crash, it
//! takes up the same failover: same point, same overlay, every acknowledged write there.
//! `status` says where a failover stands from the manifest and `failover/state.json`, which
//! the running `start` rewrites after every FLUSH and each second the overlay changed (it
//! never opens the overlay itself, so it can run beside `start`). `rollback` ends a failover without failback: the overlay's
//! writes are thrown away (only with `--discard-writes` if there are any) and pushes commit
//! again.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use ctk::{ChangeId, OpenOutcome};
use ctk_net::local::Listen;
use serde::{Deserialize, Serialize};
use serde_json::json;

use ctk_receiver::export::{self, Changes, Tracked};
use ctk_receiver::store::{self, Exposure, FailedOver, Pick};

use super::expose::run_export;
use super::group::Target;
use super::{disks, open};

#[derive(Subcommand)]
pub enum Failover {
    /// Fence the disk (pushes for it are refused) and serve its point writable, every write
    /// tracked and kept, until Ctrl-C or SIGTERM. Run again to take the same failover up.
    Start(Start),
    /// Where a disk's failover stands: its point, since when, whether it is served, and
    /// how much the recovered VM has written.
    Status(Status),
    /// End a failover without failback: lift the fence and delete the overlay. Refused
    /// while it is served, and (unless --discard-writes) if the VM wrote anything.
    Rollback(Rollback),
}

#[derive(Args)]
#[command(after_help = "Example:\n  \
ctk-receiver failover start --store /srv/ctk/host1 --disk vm1 --listen unix:/run/ctk/vm1.sock &\n  \
qemu-system-x86_64 -m 2G -drive file=nbd+unix:///vm1?socket=/run/ctk/vm1.sock,format=raw,cache=none ...\n\n\
The point defaults to the newest (for a failover already started: its own point). The \
overlay lives in the disk's directory (DISK/failover/); its filesystem takes every block the \
VM writes. From the first command on, the agent's pushes for this disk are refused with an \
error naming the failover, and nothing they send is committed.")]
pub struct Start {
    #[command(flatten)]
    pub served: super::group::ServeSel,
    /// Also copy the point into a standalone image at PATH in the background, while the VM
    /// runs (the overlay becomes that image; progress in the log and in `status`). A restart
    /// goes on where it stopped.
    #[arg(long, value_name = "PATH", conflicts_with = "group")]
    pub materialize: Option<PathBuf>,
    /// At most this many bytes per second for --materialize (e.g. 200M; 0: no limit), so
    /// that the recovered VM's own I/O keeps its share of the disks.
    #[arg(long, value_name = "RATE", value_parser = ctk::units::parse_rate, default_value = "0")]
    pub materialize_rate: u64,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct Status {
    #[arg(long)]
    pub store: PathBuf,
    #[arg(long)]
    pub agent: Option<String>,
    /// The disk (default: every disk of the store that is failed over).
    #[arg(long)]
    pub disk: Option<String>,
    /// One JSON array: per disk {"disk", "failed_over", "point", "since", "since_unix_ms",
    /// "served", "pid", "uri", "changed_blocks", "changed_bytes", "updated", "image",
    /// "materialized_percent", "failback"} ("failback", once a pass was made: {"passes",
    /// "last", "last_unix_ms", "upto", "last_blocks", "bytes_sent", "final", "blocks_left"}).
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct Rollback {
    #[command(flatten)]
    pub subject: super::group::Subject,
    /// Throw away what the recovered VM wrote (required if it wrote anything).
    #[arg(long)]
    pub discard_writes: bool,
    #[arg(long)]
    pub json: bool,
}

/// What the running `start` leaves in `failover/state.json` for `status`.
#[derive(Serialize, Deserialize)]
struct State {
    pid: u32,
    point: ChangeId,
    uri: Option<String>,
    changed_blocks: u64,
    updated_unix_ms: u64,
    /// Where the disk is materialized, and how far (regions of 1 MiB).
    #[serde(default)]
    image: Option<PathBuf>,
    #[serde(default)]
    materialized_regions: u64,
    #[serde(default)]
    regions: u64,
}

fn failover_dir(store: &Path, disk: &str) -> PathBuf {
    store.join(disk).join("failover")
}

pub fn failover(cmd: Failover) -> Result<()> {
    match cmd {
        Failover::Start(args) => start(args),
        Failover::Status(args) => status(args),
        Failover::Rollback(args) => rollback(args),
    }
}

fn start(args: Start) -> Result<()> {
    let Start {
        served,
        materialize,
        materialize_rate,
        json,
    } = args;
    let (sel, listen) = match served.target()? {
        Target::Disk(sel, listen) => (sel, listen),
        Target::Group(g) => return start_group(&g, json),
    };
    let store = sel.sel.dir()?;
    let disk = sel.sel.disk.clone();
    let (exposure, fence, _) = fence_disk(&store, &disk, sel.point)?;
    if let Some(image) = &materialize {
        super::materialize::prepare(&failover_dir(&store, &disk), image)?;
    }
    let uri = listen_uri(&listen, &disk);
    let running = run_member(&store, &disk, exposure, fence, uri, materialize_rate)?;
    let result = run_export(&disk, running.served(), &listen, json);
    running.stop()?;
    result
}

/// `failover start --group`: every member of the group point fenced (all or none: a member
/// that cannot be fails the start, and the fences this run set are lifted again, nothing
/// having been served), then each served writable on DIR/DISK.sock in this one process.
/// Failback and rollback stay per disk (`rollback --group` rolls back each member).
fn start_group(g: &super::group::GroupTarget, json: bool) -> Result<()> {
    let (root, gp, pinned) = super::group::pin_members(g)?;
    let mut fenced = Vec::new();
    for (disk, exposure) in pinned {
        let point = exposure.point().change_id;
        // The pin goes before the fence takes its own (the same point).
        drop(exposure);
        match fence_disk(&root, &disk, Pick::Id(point)) {
            Ok((exposure, fence, new)) => fenced.push((disk, exposure, fence, new)),
            Err(e) => {
                for (d, exposure, _, new) in fenced {
                    drop(exposure);
                    if new && let Err(e) = open(&root, &d).and_then(|mut s| Ok(s.unfence()?)) {
                        tracing::warn!(disk = %d, error = %format!("{e:#}"), "lifting a fence");
                    }
                }
                return Err(e.context(format!("failing over {disk:?} of group {:?}", g.group)));
            }
        }
    }
    let mut running = Vec::new();
    for (disk, exposure, fence, _) in fenced {
        let socket = g.dir.join(format!("{disk}.sock"));
        let uri = Some(format!("nbd+unix:///{disk}?socket={}", socket.display()));
        running.push(run_member(&root, &disk, exposure, fence, uri, 0)?);
    }
    let served = running
        .iter()
        .map(|r| (r.disk.clone(), r.served()))
        .collect();
    let result = super::group::serve_members(&g.group, &gp, served, &g.dir, json);
    for r in running {
        r.stop()?;
    }
    result
}

/// Fences `disk` at the point `pick` names (a failover already started keeps its own point)
/// and pins that point. Whether this call set the fence (`false`: it was there).
fn fence_disk(store: &Path, disk: &str, pick: Pick) -> Result<(Exposure, FailedOver, bool)> {
    // Under the store's lock from here to the fence: a merge in progress finishes first, and
    // none commits between choosing "latest" and fencing it.
    let mut held = open(store, disk)?;
    let pick = match (held.failed_over(), pick) {
        (Some(f), Pick::Latest) => Pick::Id(f.point),
        (Some(f), Pick::Id(id)) if id != f.point => bail!(
            "{disk:?} is already failed over at {} (since {}): start it again without --point, \
             or end it first (failback, or `failover rollback`)",
            f.point,
            f.since_rfc3339()
        ),
        (_, pick) => pick,
    };
    let exposure =
        Exposure::open(store, disk, pick).with_context(|| format!("failing over {disk:?}"))?;
    exposure.reader()?;
    let point = exposure.point().clone();
    let new = held.failed_over().is_none();
    if new {
        remove_stale(&failover_dir(store, disk))?;
    }
    // The fence is durable before the first write can be acknowledged.
    let fence = held
        .fence(point.change_id)
        .with_context(|| format!("fencing {disk:?}"))?;
    Ok((exposure, fence, new))
}

/// A disk's failover running in this process: its overlay, the state file kept for
/// `status`, and the background copy of `--materialize`.
struct Running {
    disk: String,
    dir: PathBuf,
    fence: FailedOver,
    tracked: Arc<Tracked>,
    /// Held to the end: the exposure's lock says the overlay is this process's, and
    /// failback takes it (to hold the overlay itself) only once the journal is closed.
    exposure: Arc<Exposure>,
    done: Arc<AtomicBool>,
    updater: std::thread::JoinHandle<()>,
    copier: Option<std::thread::JoinHandle<()>>,
}

/// Opens (or recovers) the fenced disk's overlay and starts keeping its state; the copy
/// into a materialized image too, if one was prepared.
fn run_member(
    store: &Path,
    disk: &str,
    exposure: Exposure,
    fence: FailedOver,
    uri: Option<String>,
    materialize_rate: u64,
) -> Result<Running> {
    let dir = failover_dir(store, disk);
    let point = exposure.point().clone();
    let image = super::materialize::target(&dir);
    let (tracked, outcome) = Tracked::open(&dir, point.disk_size, &point.change_id.to_string())
        .context("opening the failover's overlay")?;
    if let OpenOutcome::Recovered {
        recovered_blocks, ..
    } = outcome
    {
        tracing::warn!(
            disk,
            recovered_blocks,
            "the failover was not stopped cleanly: its overlay was recovered (every \
             acknowledged write is kept; the change set is exact to the 1 MiB region where \
             writes were recent)"
        );
    }
    let tracked = Arc::new(tracked);
    eprintln!(
        "{disk}: failed over at {} since {}: pushes for it are refused until failback",
        fence.point,
        fence.since_rfc3339()
    );
    write_state(&dir, &tracked.changes()?, &fence, uri.clone())?;
    tracked.on_flush({
        let (dir, fence, uri) = (dir.clone(), fence.clone(), uri.clone());
        Box::new(move |changes| {
            if let Err(e) = write_state(&dir, changes, &fence, uri.clone()) {
                tracing::warn!(error = %format!("{e:#}"), "writing the failover's state");
            }
        })
    });
    let done = Arc::new(AtomicBool::new(false));
    let updater = {
        let (dir, weak, fence, done) = (
            dir.clone(),
            Arc::downgrade(&tracked),
            fence.clone(),
            done.clone(),
        );
        std::thread::spawn(move || keep_state(&dir, &weak, &fence, uri, &done))
    };
    let exposure = Arc::new(exposure);
    let copier = image.map(|image| {
        let (disk, weak, exposure, done) = (
            disk.to_owned(),
            Arc::downgrade(&tracked),
            exposure.clone(),
            done.clone(),
        );
        let job = super::materialize::Job {
            disk,
            image,
            rate: materialize_rate,
        };
        std::thread::spawn(move || super::materialize::run(job, weak, exposure, done))
    });
    Ok(Running {
        disk: disk.to_owned(),
        dir,
        fence,
        tracked,
        exposure,
        done,
        updater,
        copier,
    })
}

impl Running {
    fn served(&self) -> export::Served {
        export::Served {
            exposure: self.exposure.clone(),
            overlay: Some(export::Writes::Failover(self.tracked.clone())),
        }
    }

    /// After the export ended: the background work stopped, the state's last word written
    /// (not served), then the overlay synced and its journal closed cleanly as the last
    /// reference goes, and the pin with it.
    fn stop(self) -> Result<()> {
        self.done.store(true, Ordering::Release);
        let _ = self.updater.join();
        if let Some(c) = self.copier {
            let _ = c.join();
        }
        write_state(&self.dir, &self.tracked.changes()?, &self.fence, None)?;
        drop(self.tracked);
        drop(self.exposure);
        Ok(())
    }
}

/// Before a new failover: whatever an earlier one left in its directory (a failback whose
/// removal of it was cut short) is not this one's. Removed before the fence, under the
/// exposure: a crash between leaves an unfenced disk and no stale overlay.
fn remove_stale(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing the stale {}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// The URI `status` shows (the listener's own, for a TCP port chosen by the kernel, is
/// printed by `start`'s ready line).
fn listen_uri(listen: &Listen, disk: &str) -> Option<String> {
    match listen {
        Listen::Unix(path) => Some(format!("nbd+unix:///{disk}?socket={}", path.display())),
        Listen::Tcp(addr) if addr.port() != 0 => Some(format!("nbd://{addr}/{disk}")),
        Listen::Tcp(_) => None,
    }
}

/// Rewrites the state every second while the overlay changes, until `done`.
fn keep_state(
    dir: &Path,
    tracked: &Weak<Tracked>,
    fence: &FailedOver,
    uri: Option<String>,
    done: &AtomicBool,
) {
    let mut last = None;
    // Sleeps in short steps: a stop (failback's last pass waits for it) is seen at once.
    let nap = |ms: u64| {
        for _ in 0..ms / 50 {
            if done.load(Ordering::Acquire) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        !done.load(Ordering::Acquire)
    };
    while nap(200) {
        let Some(t) = tracked.upgrade() else { return };
        if let Err(e) = t.cut_if_written() {
            tracing::warn!(error = %e, "cutting the failover's overlay");
        }
        let now = t.changes().ok();
        if let Some(changes) = now.as_ref().filter(|_| now != last) {
            if let Err(e) = write_state(dir, changes, fence, uri.clone()) {
                tracing::warn!(error = %format!("{e:#}"), "writing the failover's state");
            }
            last = now;
        }
        drop(t);
        nap(800);
    }
}

fn write_state(
    dir: &Path,
    changes: &Changes,
    fence: &FailedOver,
    uri: Option<String>,
) -> Result<()> {
    // The flush callback and the updater both write it: one at a time, through one tmp.
    static WRITING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = WRITING.lock().unwrap_or_else(|p| p.into_inner());
    let state = State {
        pid: std::process::id(),
        point: fence.point,
        uri,
        changed_blocks: changes.blocks,
        updated_unix_ms: ctk::unix_ms_now(),
        image: super::materialize::target(dir),
        materialized_regions: changes.materialized_regions,
        regions: changes.total_regions,
    };
    let tmp = dir.join("state.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&state)?)
        .and_then(|()| std::fs::rename(&tmp, dir.join("state.json")))
        .with_context(|| format!("writing {}", dir.join("state.json").display()))
}

fn read_state(dir: &Path) -> Option<State> {
    serde_json::from_slice(&std::fs::read(dir.join("state.json")).ok()?).ok()
}

fn status(args: Status) -> Result<()> {
    let Status {
        store,
        agent,
        disk,
        json,
    } = args;
    let (store, names) = disks(&store, agent.as_deref(), disk.as_deref())?;
    let mut all = Vec::new();
    for d in names {
        let Some(fence) = store::failed_over(&store, &d)? else {
            if disk.is_some() {
                all.push(json!({"disk": d, "failed_over": false}));
            }
            continue;
        };
        // Served: a process holds the disk's exposure (the start that fenced it).
        let served = store::exposed(&store, &d)?;
        let state = read_state(&failover_dir(&store, &d));
        let blocks = state.as_ref().map(|s| s.changed_blocks);
        all.push(json!({
            "disk": d,
            "failed_over": true,
            "point": fence.point.to_string(),
            "since": super::when(fence.since_unix_ms),
            "since_unix_ms": fence.since_unix_ms,
            "served": served,
            "pid": state.as_ref().filter(|_| served).map(|s| s.pid),
            "uri": state.as_ref().filter(|_| served).and_then(|s| s.uri.clone()),
            "changed_blocks": blocks,
            "changed_bytes": blocks.map(|b| b * export::TRACKED_BLOCK),
            "updated": state.as_ref().map(|s| super::when(s.updated_unix_ms)),
            "image": state.as_ref().and_then(|s| s.image.clone()),
            "materialized_percent": state.as_ref().filter(|s| s.image.is_some() && s.regions > 0)
                .map(|s| 100.0 * s.materialized_regions as f64 / s.regions as f64),
            "failback": ctk_receiver::failback::progress(&store, &d).map(|p| json!({
                "passes": p.passes,
                "last": super::when(p.last_unix_ms),
                "last_unix_ms": p.last_unix_ms,
                "upto": p.upto.map(|u| u.to_string()),
                "last_blocks": p.last_blocks,
                "bytes_sent": p.bytes_sent,
                "final": p.last_final,
                "blocks_left": p.blocks_left,
            })),
        }));
    }
    if json {
        println!("{}", serde_json::Value::Array(all));
        return Ok(());
    }
    if all.is_empty() {
        println!("no disk of {} is failed over", store.display());
    }
    for d in &all {
        let name = d["disk"].as_str().unwrap_or("");
        if d["failed_over"] == false {
            println!("{name}: not failed over (pushes commit as usual)");
            continue;
        }
        println!(
            "{name}: FAILED OVER at {} since {}; pushes for it are refused until failback",
            d["point"].as_str().unwrap_or(""),
            d["since"].as_str().unwrap_or("")
        );
        match (d["served"].as_bool(), d["uri"].as_str()) {
            (Some(true), Some(uri)) => println!("  served by process {} at {uri}", d["pid"]),
            (Some(true), None) => println!("  served by process {}", d["pid"]),
            _ => println!(
                "  NOT served: run `ctk-receiver failover start --disk {name} --listen ...` \
                 to take it up again"
            ),
        }
        if let (Some(image), Some(pct)) = (d["image"].as_str(), d["materialized_percent"].as_f64())
        {
            if pct >= 100.0 {
                println!("  materialized: {image} is a standalone image of the disk");
            } else {
                println!("  materializing into {image}: {pct:.1}% (see the log for rate and ETA)");
            }
        }
        let f = &d["failback"];
        if f.is_object() {
            println!(
                "  FAILING BACK: {} passes, {} bytes sent, the last at {} ({}); {} blocks of 4 KiB \
                 written since it (the next pass)",
                f["passes"],
                f["bytes_sent"],
                f["last"].as_str().unwrap_or("?"),
                if f["final"] == true {
                    "the final one: the export is stopped"
                } else {
                    "the VM runs"
                },
                f["blocks_left"]
            );
        }
        if let Some(bytes) = d["changed_bytes"].as_u64() {
            println!(
                "  the recovered VM has written {} ({} blocks of 4 KiB) since the point, as of {}",
                human_bytes(bytes),
                d["changed_blocks"],
                d["updated"].as_str().unwrap_or("?")
            );
        }
    }
    Ok(())
}

fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n => format!("{} KiB", n / 1024),
    }
}

fn rollback(args: Rollback) -> Result<()> {
    let Rollback {
        subject,
        discard_writes,
        json,
    } = args;
    if let Some(group) = &subject.group {
        let dir = disks(&subject.store, subject.agent.as_deref(), None)?.0;
        let mut rolled = 0;
        for disk in store::groups::member_disks(&ctk::vfs::RealFs, &dir, group)? {
            if store::failed_over(&dir, &disk)?.is_some() {
                rollback_disk(&dir, disk, discard_writes, json)?;
                rolled += 1;
            }
        }
        if rolled == 0 {
            bail!("no member of group {group:?} is failed over: nothing to roll back");
        }
        return Ok(());
    }
    let sel = subject.disk_sel()?;
    rollback_disk(&sel.dir()?, sel.disk, discard_writes, json)
}

/// Rolls back the failover of `disk` in the agent's store `store`.
fn rollback_disk(store: &Path, disk: String, discard_writes: bool, json: bool) -> Result<()> {
    let Some(fence) = store::failed_over(store, &disk)? else {
        bail!("{disk:?} is not failed over: nothing to roll back");
    };
    // Holding the exposure keeps a `start` out while the overlay goes.
    let exposure = Exposure::open(store, &disk, Pick::Id(fence.point)).map_err(|e| match e {
        store::StoreError::Exposed { .. } => anyhow::anyhow!(
            "the failover of {disk:?} is being served (see `failover status`): stop it (Ctrl-C \
             or SIGTERM to its process) before rolling it back"
        ),
        e => anyhow::Error::new(e).context(format!("rolling back the failover of {disk:?}")),
    })?;
    let dir = failover_dir(store, &disk);
    let written = if dir.join("journal").exists() {
        let opened = Tracked::open(&dir, exposure.point().disk_size, &fence.point.to_string())
            .and_then(|(t, _)| t.changes());
        match opened {
            Ok(c) => c.blocks,
            // An overlay that cannot be read can still be thrown away, when asked to.
            Err(e) if discard_writes => {
                tracing::warn!(error = %e, "the failover's overlay cannot be read: discarding it");
                0
            }
            Err(e) => {
                return Err(anyhow::Error::new(e).context(
                    "the failover's overlay cannot be read to see what it holds (add \
                     --discard-writes to throw it away anyway)",
                ));
            }
        }
    } else {
        0
    };
    if written > 0 && !discard_writes {
        bail!(
            "the recovered VM wrote {} ({written} blocks) since {}: rolling back throws that \
             away. Failback keeps it; to throw it away, add --discard-writes",
            human_bytes(written * export::TRACKED_BLOCK),
            fence.point
        );
    }
    // The overlay goes before the fence is lifted: a rollback cut short leaves a fenced disk
    // (`failover start` then begins a new, empty overlay), never pushes merging beside a
    // stale one. A materialized image is the overlay itself: it goes too.
    if let Some(image) = super::materialize::target(&dir) {
        let _ = std::fs::remove_file(&image);
    }
    match std::fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing {}", dir.display()));
        }
        _ => {}
    }
    open(store, &disk)?
        .unfence()
        .with_context(|| format!("lifting the fence of {disk:?}"))?;
    drop(exposure);
    if json {
        println!(
            "{}",
            json!({"disk": disk, "point": fence.point.to_string(), "discarded_blocks": written})
        );
    } else {
        println!(
            "{disk}: failover at {} rolled back ({} discarded); pushes commit again",
            fence.point,
            human_bytes(written * export::TRACKED_BLOCK)
        );
    }
    Ok(())
}
