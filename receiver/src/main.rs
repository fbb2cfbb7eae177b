//! `ctk-receiver`: the offsite half of ctk. It keeps, per disk, a synthetic full and restore
//! points (reverse increments), merged crash-atomically from ctk deltas pushed by agents
//! over QUIC (`serve`) or given as files (`ingest`).

use std::io::{BufReader, IsTerminal};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use serde_json::json;

use ctk_receiver::retention::{self, Retention, Tier};
use ctk_receiver::store::{DiskStore, Ingested, Recovery};
use ctk_receiver::{server, store};

#[derive(Parser)]
#[command(
    name = "ctk-receiver",
    version,
    about = "Keeps offsite replicas of ctk-protected disks: a synthetic full per disk with restore points",
    long_about = "Keeps offsite replicas of ctk-protected disks. Per disk, a store directory holds \
a synthetic full (a sparse raw image of the newest point) and restore points kept as reverse \
increments (the blocks each merge overwrote). Every delta is staged and verified whole before it \
touches the full, and the merge is crash-atomic: killed at any moment, the store reopens at its \
newest committed point, with a half-done merge finished or undone.\n\n\
`serve --store /srv/ctk` keeps each agent's disks under /srv/ctk/AGENT/DISK; the commands \
that read a store take the agent's directory (or the root and --agent):\n  \
ctk-receiver points --store /srv/ctk/host1 --disk vm1\n  \
ctk-receiver restore --store /srv/ctk/host1 --disk vm1 --point <ChangeId> -o vm1-restored.img\n  \
ctk-receiver verify --store /srv/ctk --all-agents       # exit 3 if anything is damaged\n  \
ctk-receiver ingest --store /srv/ctk/host1 --disk vm1 full.ctkd inc1.ctkd   # deltas from `ctk-agent export`\n\n\
Receiving from agents over QUIC:\n  \
ctk-receiver init --identity /etc/ctk-receiver      # prints this receiver's fingerprint\n  \
ctk-receiver serve --identity /etc/ctk-receiver --store /srv/ctk --allow host1=sha256:..."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Merge delta files (oldest first; `-` reads standard input) into a disk's store.
    Ingest {
        /// The store's root directory (one subdirectory per disk).
        #[arg(long)]
        store: PathBuf,
        /// The disk's name: 1-128 of A-Z a-z 0-9 . _ - (it must match the deltas' disk id).
        #[arg(long)]
        disk: String,
        /// Restore points to keep; older ones are dropped after each merge.
        #[arg(long, default_value_t = store::KEEP_DEFAULT)]
        keep: usize,
        /// Also keep points by age tiers (see `serve --help`).
        #[arg(long, value_parser = parse_tier_list, value_name = "TIERS")]
        tiers: Option<TierList>,
        /// When the (single) delta's cut was taken (unix ms), for the point's record and
        /// the age tiers; default: when it is merged.
        #[arg(long, value_name = "MS")]
        cut_unix_ms: Option<u64>,
        /// The digest of the whole image after the (single) delta, as the sender computed it
        /// (64 hex digits, see docs/format.md): the merge is refused if the merged image
        /// differs. Pushes over QUIC carry it; this is for deltas that travelled otherwise.
        #[arg(long, value_parser = parse_digest)]
        image_digest: Option<String>,
        /// Print one JSON object per delta.
        #[arg(long)]
        json: bool,
        #[arg(required = true)]
        deltas: Vec<PathBuf>,
    },
    /// Seed a disk's replica from an image already here (a copy shipped to this site): it
    /// becomes the disk's first point, and the agent's next `replicate` compares digests
    /// with it and sends only the units that differ, instead of the whole disk. The disk's
    /// store must be empty.
    Adopt {
        /// The agent's store directory (STORE/AGENT, as `serve` lays it out).
        #[arg(long)]
        store: PathBuf,
        #[arg(long)]
        disk: String,
        /// The raw image to adopt (read, never changed).
        #[arg(long)]
        image: PathBuf,
        /// The agent's block size for this disk (its `--block-size`).
        #[arg(long, default_value_t = ctk::limits::BLOCK_SIZE_DEFAULT)]
        block_size: u32,
        #[arg(long)]
        json: bool,
    },
    /// List the restore points of one disk, or of every disk of an agent.
    Points {
        /// An agent's store (STORE/AGENT, as `serve` lays it out), or the root with --agent.
        #[arg(long)]
        store: PathBuf,
        /// The agent whose disks to list, when --store is the receiver's root.
        #[arg(long)]
        agent: Option<String>,
        /// One disk (default: every disk of the agent).
        #[arg(long)]
        disk: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Write a restore point out as a raw image (sparse), with progress on stderr.
    Restore {
        /// An agent's store (STORE/AGENT), or the root with --agent.
        #[arg(long)]
        store: PathBuf,
        /// The agent, when --store is the receiver's root.
        #[arg(long)]
        agent: Option<String>,
        #[arg(long)]
        disk: String,
        /// The point's ChangeId (see `points`); `latest` for the newest.
        #[arg(long)]
        point: String,
        #[arg(short = 'o', long)]
        output: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Re-read every stored increment and check every checksum, and full.img against the
    /// newest point's image digest. Exits 3 when it finds damage; a store, agent or disk that
    /// does not exist is an error (exit 1), never a silent pass.
    Verify {
        /// An agent's store (STORE/AGENT), or the root with --agent (or --all-agents).
        #[arg(long)]
        store: PathBuf,
        /// The agent, when --store is the receiver's root.
        #[arg(long, conflicts_with = "all_agents")]
        agent: Option<String>,
        /// Every agent's disks, when --store is the receiver's root.
        #[arg(long)]
        all_agents: bool,
        /// One disk (default: every disk of the agent).
        #[arg(long)]
        disk: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Create this receiver's identity (key and self-signed certificate) and print its
    /// fingerprint: give it to each agent (`ctk-agent replicate --receiver-fingerprint`).
    /// Run again, it prints the existing identity's fingerprint (never replaced).
    Init {
        /// Where the identity lives (cert.der, key.der; never overwritten).
        #[arg(long)]
        identity: PathBuf,
    },
    /// Serve agents over QUIC: merge the deltas they push, answer where each disk stands.
    Serve {
        #[arg(long)]
        identity: PathBuf,
        #[arg(long)]
        store: PathBuf,
        /// UDP address to listen on.
        #[arg(long, default_value = "127.0.0.1:7420")]
        listen: std::net::SocketAddr,
        /// Allowed agents, one `NAME FINGERPRINT` per line (like SSH's known_hosts). Each
        /// agent's disks live under STORE/NAME/.
        #[arg(long)]
        agents: Option<PathBuf>,
        /// An allowed agent as NAME=FINGERPRINT (repeatable; adds to --agents).
        #[arg(long = "allow")]
        allow: Vec<String>,
        /// Restore points to keep per disk: the newest N, whatever their age.
        #[arg(long, default_value_t = store::KEEP_DEFAULT)]
        keep: usize,
        /// Also keep points by age: SPAN:EVERY tiers, e.g. `1h:all,24h:1h,30d:1d` keeps every
        /// point of the last hour, the newest of each hour for a day and of each day for 30
        /// days. A point is kept if --keep or any tier keeps it; dropping points between kept
        /// ones folds their pre-images into the next kept point, so every kept point restores
        /// exactly and at the same cost.
        #[arg(long, value_parser = parse_tier_list, value_name = "TIERS")]
        tiers: Option<TierList>,
        /// Tiers for one disk (of any agent) instead of --tiers: DISK=TIERS (repeatable).
        #[arg(long, value_name = "DISK=TIERS")]
        tiers_for: Vec<String>,
    },
}

/// Opens a disk's store, waiting for a merge in progress (a running `serve`) to finish.
fn open(store: &Path, disk: &str) -> Result<DiskStore> {
    let (s, recovery) = DiskStore::open_waiting(store, disk)
        .with_context(|| format!("opening the store of {disk:?} in {}", store.display()))?;
    match recovery {
        Recovery::Clean => {}
        Recovery::RolledForward(id) => {
            tracing::warn!(disk, point = %id, "an interrupted merge was finished")
        }
        Recovery::RolledBack(id) => {
            tracing::warn!(disk, point = %id, "an interrupted merge was undone")
        }
    }
    Ok(s)
}

/// `verify` found damage (exit code 3, apart from the other failures).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Damaged(String);

/// Whether `dir` is one disk's store: it has a manifest, or (a store whose first merge has
/// not committed yet) the store's own subdirectories.
fn is_disk_store(dir: &Path) -> bool {
    dir.join("manifest.json").is_file()
        || (dir.join("staging").is_dir() && dir.join("undo").is_dir())
}

/// The subdirectories of `dir` for which `pick` holds, sorted.
fn subdirs(dir: &Path, pick: impl Fn(&Path) -> bool) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_dir() && pick(&entry.path()) {
            out.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    out.sort();
    Ok(out)
}

/// Resolves `--store` (and `--agent`) to the directory holding disk stores, and the disks
/// asked for in it: the one named, or all of them. Never an empty answer: a level with no
/// disk store (a receiver's root, a wrong path, a disk that does not exist) is an error that
/// names what is there, so that a nightly `verify` cannot check nothing for ever.
fn disks(store: &Path, agent: Option<&str>, disk: Option<&str>) -> Result<(PathBuf, Vec<String>)> {
    if !store.is_dir() {
        bail!(
            "no store at {}: give the --store that `serve` writes to",
            store.display()
        );
    }
    let dir = match agent {
        Some(a) => {
            store::validate_name(a)?;
            let dir = store.join(a);
            if !dir.is_dir() {
                let agents = subdirs(store, |d| {
                    !subdirs(d, is_disk_store).unwrap_or_default().is_empty()
                })?;
                bail!(
                    "no agent {a:?} in {} (agents there: {})",
                    store.display(),
                    list(&agents)
                );
            }
            dir
        }
        None => store.to_owned(),
    };
    let here = subdirs(&dir, is_disk_store)?;
    if here.is_empty() {
        let agents = subdirs(&dir, |d| {
            !subdirs(d, is_disk_store).unwrap_or_default().is_empty()
        })?;
        if !agents.is_empty() {
            bail!(
                "{} is a receiver's root, holding the stores of agents {}: add --agent NAME \
                 (or give --store {}/NAME)",
                dir.display(),
                list(&agents),
                dir.display()
            );
        }
        bail!(
            "no disk store in {} (each disk has a directory with a manifest.json, under \
             STORE/AGENT as `serve` lays them out)",
            dir.display()
        );
    }
    match disk {
        None => Ok((dir, here)),
        Some(d) => {
            store::validate_name(d)?;
            if !here.iter().any(|h| h == d) {
                bail!(
                    "no disk {d:?} in {} (disks there: {})",
                    dir.display(),
                    list(&here)
                );
            }
            Ok((dir, vec![d.to_owned()]))
        }
    }
}

fn list(names: &[String]) -> String {
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

fn parse_digest(s: &str) -> Result<String, String> {
    s.parse::<ctk::digest::ImageDigest>()
        .map(|d| d.to_string())
        .map_err(|e| e.to_string())
}

/// Tiers as one flag value (clap would read a bare `Vec` as a repeated flag).
#[derive(Clone, Debug)]
struct TierList(Vec<Tier>);

fn parse_tier_list(text: &str) -> Result<TierList, String> {
    retention::parse_tiers(text).map(TierList)
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Ingest {
            store,
            disk,
            keep,
            tiers,
            cut_unix_ms,
            image_digest,
            json,
            deltas,
        } => {
            if cut_unix_ms.is_some() && deltas.len() != 1 {
                anyhow::bail!("--cut-unix-ms describes one delta's cut: give one");
            }
            let retention = Retention {
                keep,
                tiers: tiers.map(|t| t.0).unwrap_or_default(),
            };
            if image_digest.is_some() && deltas.len() != 1 {
                anyhow::bail!("--image-digest describes the image after one delta: give one");
            }
            let mut s = open(&store, &disk)?;
            for path in deltas {
                let input: Box<dyn std::io::Read> = if path.as_os_str() == "-" {
                    Box::new(std::io::stdin().lock())
                } else {
                    Box::new(BufReader::new(
                        std::fs::File::open(&path)
                            .with_context(|| format!("opening {}", path.display()))?,
                    ))
                };
                let done = s
                    .ingest(input, retention.clone(), |_| {
                        Ok(store::PointMeta {
                            image_digest: image_digest.clone(),
                            cut_unix_ms,
                            ..store::PointMeta::default()
                        })
                    })
                    .with_context(|| format!("merging {}", path.display()))?;
                let answer = match &done {
                    Ingested::Committed { point, dropped } => json!({
                        "disk": disk, "delta": path.display().to_string(), "committed": point.change_id,
                        "from": point.from, "disk_size": point.disk_size, "dropped_points": dropped,
                        "image_digest": point.image_digest, "digest_checked": point.digest_checked,
                    }),
                    Ingested::AlreadyCommitted { change_id } => json!({
                        "disk": disk, "delta": path.display().to_string(), "committed": change_id,
                        "already_committed": true,
                    }),
                };
                if json {
                    println!("{answer}");
                } else {
                    match done {
                        Ingested::Committed { point, dropped } => println!(
                            "{disk}: committed {} ({} bytes){}",
                            point.change_id,
                            point.disk_size,
                            if dropped > 0 {
                                format!("; dropped {dropped} old point(s)")
                            } else {
                                String::new()
                            }
                        ),
                        Ingested::AlreadyCommitted { change_id } => {
                            println!("{disk}: {change_id} was committed already; nothing applied")
                        }
                    }
                }
            }
        }
        Command::Adopt {
            store,
            disk,
            image,
            block_size,
            json,
        } => {
            let mut s = open(&store, &disk)?;
            if let Some(p) = s.points().last() {
                bail!(
                    "disk {disk:?} already has points (newest {}): adopt seeds an empty store",
                    p.change_id
                );
            }
            let file = std::fs::File::open(&image)
                .with_context(|| format!("opening {}", image.display()))?;
            let size = file.metadata()?.len();
            // The image's own digest goes with it, so the copy written into the store is
            // checked like any pushed point.
            let digest = ctk::digest::Leaves::of_image(&file, size, block_size)
                .map(|l| l.digest().to_string())
                .ok();
            let header = ctk::delta::DeltaHeader {
                disk_id: disk.clone(),
                disk_size: size,
                block_size,
                from: None,
                // A generation of its own: no agent can name changes since it, so the
                // agent's next replication compares digests.
                to: ctk::ChangeId::new(ctk::Generation::random(), 1),
            };
            let (reader, writer) = std::io::pipe()?;
            let producer = std::thread::spawn(move || {
                let extents = [ctk::Extent {
                    offset: 0,
                    length: size,
                }];
                let extents = if size == 0 {
                    &extents[..0]
                } else {
                    &extents[..]
                };
                let options = ctk::delta::WriteOptions { zstd_level: None };
                ctk::delta::export(&file, extents, &header, options, writer).map(|_| ())
            });
            let done = s.ingest(BufReader::with_capacity(1 << 20, reader), 1, |_| {
                Ok(store::PointMeta {
                    image_digest: digest,
                    ..store::PointMeta::default()
                })
            });
            let produced = producer
                .join()
                .map_err(|_| anyhow::anyhow!("the image reader panicked"))?;
            let done = done.with_context(|| format!("adopting {}", image.display()))?;
            produced.with_context(|| format!("reading {}", image.display()))?;
            let Ingested::Committed { point, .. } = done else {
                bail!("the store already had this point");
            };
            if json {
                println!(
                    "{}",
                    json!({"disk": disk, "adopted": image.display().to_string(),
                           "point": point.change_id, "disk_size": point.disk_size,
                           "digest_checked": point.digest_checked})
                );
            } else {
                println!(
                    "{disk}: adopted {} as point {} ({} bytes); the agent's next replicate \
                     sends only what differs",
                    image.display(),
                    point.change_id,
                    point.disk_size
                );
            }
        }
        Command::Points {
            store,
            agent,
            disk,
            json,
        } => {
            let mut all = Vec::new();
            let (store, names) = disks(&store, agent.as_deref(), disk.as_deref())?;
            // Read without the store's lock, so a running receiver's merge does not block it.
            for d in names {
                let points = store::committed_points(&store, &d)?;
                // The RPO as this side sees it: the age of the newest committed cut.
                let now_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|t| t.as_millis() as u64)
                    .unwrap_or(0);
                let rpo_s = points
                    .last()
                    .and_then(|p| p.cut_unix_ms)
                    .map(|ms| now_ms.saturating_sub(ms) as f64 / 1000.0);
                all.push(json!({"disk": d, "rpo_s": rpo_s, "points": points}));
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
                    for p in d["points"].as_array().into_iter().flatten() {
                        println!(
                            "  {}  {} bytes  {}  committed at unix ms {}  {}",
                            p["change_id"].as_str().unwrap_or(""),
                            p["disk_size"],
                            p["consistency"].as_str().unwrap_or("consistency unknown"),
                            p["committed_unix_ms"],
                            if p["digest_checked"] == true {
                                "digest checked"
                            } else {
                                "digest NOT checked (the sender sent none)"
                            }
                        );
                    }
                }
            }
        }
        Command::Restore {
            store,
            agent,
            disk,
            point,
            output,
            json,
        } => {
            let (store, _) = disks(&store, agent.as_deref(), Some(&disk))?;
            let s = open(&store, &disk)?;
            let point = if point == "latest" {
                s.points()
                    .last()
                    .map(|p| p.change_id.clone())
                    .context("the store holds no point yet")?
            } else {
                point
            };
            let tty = std::io::stderr().is_terminal();
            let mut last_pct = u64::MAX;
            let p = s.restore(&point, &output, |done, total| {
                let pct = (done * 100).checked_div(total).unwrap_or(100);
                if pct != last_pct && (tty || pct % 25 == 0) {
                    eprint!(
                        "{}restoring: {pct}%{}",
                        if tty { "\r" } else { "" },
                        if tty { "" } else { "\n" }
                    );
                    last_pct = pct;
                }
            })?;
            if tty {
                eprintln!();
            }
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
        }
        Command::Verify {
            store,
            agent,
            all_agents,
            disk,
            json,
        } => {
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
                return Err(
                    Damaged(format!("{bad} of {checked} disk(s) failed verification")).into(),
                );
            }
        }
        Command::Init { identity } => {
            // Run again, it prints the existing identity's fingerprint: it is never replaced.
            let (id, created) = ctk_net::Identity::init(&identity, "ctk-receiver")?;
            println!("{}", id.fingerprint());
            eprintln!(
                "identity {} {}; give agents the fingerprint above",
                if created { "written to" } else { "already in" },
                identity.display()
            );
        }
        Command::Serve {
            identity,
            store,
            listen,
            agents,
            allow,
            keep,
            tiers,
            tiers_for,
        } => {
            let mut retention_for = std::collections::HashMap::new();
            for spec in tiers_for {
                let (disk, t) = spec
                    .split_once('=')
                    .context("--tiers-for takes DISK=TIERS")?;
                store::validate_name(disk)?;
                let tiers = retention::parse_tiers(t).map_err(anyhow::Error::msg)?;
                retention_for.insert(disk.to_owned(), Retention { keep, tiers });
            }
            let id = ctk_net::Identity::load(&identity)?;
            let mut list = Vec::new();
            if let Some(path) = agents {
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("reading {}", path.display()))?;
                list = server::parse_agents(&text)
                    .with_context(|| format!("in {}", path.display()))?;
            }
            for a in allow {
                let (name, fp) = a
                    .split_once('=')
                    .context("--allow takes NAME=FINGERPRINT")?;
                store::validate_agent_name(name).map_err(anyhow::Error::msg)?;
                list.push((name.to_owned(), fp.parse()?));
            }
            if list.is_empty() {
                bail!("no agent is allowed: give --agents FILE or --allow NAME=FINGERPRINT");
            }
            let mut map = std::collections::HashMap::new();
            for (name, fp) in list {
                if map.values().any(|n| *n == name) || map.insert(fp, name.clone()).is_some() {
                    bail!("agent {name:?} or its fingerprint is listed twice");
                }
            }
            std::fs::create_dir_all(&store)
                .with_context(|| format!("creating {}", store.display()))?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(server::run(
                id,
                server::Config {
                    retention: Retention {
                        keep,
                        tiers: tiers.map(|t| t.0).unwrap_or_default(),
                    },
                    retention_for,
                    ..server::Config::new(store, listen, map)
                },
            ))?;
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, not in a log file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            // 3: verify found damage; 1: anything else that failed.
            ExitCode::from(if e.is::<Damaged>() { 3 } else { 1 })
        }
    }
}
