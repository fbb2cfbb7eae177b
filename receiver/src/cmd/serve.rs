//! The commands that face agents: `init` (this receiver's identity) and `serve` (QUIC).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;

use ctk_receiver::retention::{self, Retention};
use ctk_receiver::{server, store};

use super::{TierList, parse_tier_list};

#[derive(Args)]
pub struct Init {
    /// Where the identity lives (cert.der, key.der; never overwritten).
    #[arg(long)]
    pub identity: PathBuf,
    /// Print {"fingerprint", "identity", "created"} as one JSON line instead.
    #[arg(long)]
    pub json: bool,
}

pub fn init(args: Init) -> Result<()> {
    let Init { identity, json } = args;
    // Run again, it prints the existing identity's fingerprint: it is never replaced.
    let (id, created) = ctk_net::Identity::init(&identity, "ctk-receiver")?;
    if json {
        println!(
            "{}",
            serde_json::json!({"fingerprint": id.fingerprint().to_string(),
                               "identity": identity.display().to_string(), "created": created})
        );
        return Ok(());
    }
    println!("{}", id.fingerprint());
    eprintln!(
        "identity {} {}; give agents the fingerprint above",
        if created { "written to" } else { "already in" },
        identity.display()
    );
    Ok(())
}

#[derive(Args)]
pub struct Serve {
    /// A TOML file with any of the settings below (docs/config.md); a flag given here wins
    /// over the file, and allowed agents from both add up.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The receiver's identity (`ctk-receiver init`).
    #[arg(long)]
    pub identity: Option<PathBuf>,
    /// The store's root: one directory per agent, one per disk under it.
    #[arg(long)]
    pub store: Option<PathBuf>,
    /// UDP address to listen on. Default: 127.0.0.1:7420.
    #[arg(long)]
    pub listen: Option<std::net::SocketAddr>,
    /// Allowed agents, one `NAME FINGERPRINT` per line (like SSH's known_hosts). Each
    /// agent's disks live under STORE/NAME/.
    #[arg(long)]
    pub agents: Option<PathBuf>,
    /// An allowed agent as NAME=FINGERPRINT (repeatable; adds to --agents).
    #[arg(long = "allow")]
    pub allow: Vec<String>,
    /// Restore points to keep per disk: the newest N, whatever their age. Default: 30.
    #[arg(long)]
    pub keep: Option<usize>,
    /// Also keep points by age: SPAN:EVERY tiers, e.g. `1h:all,24h:1h,30d:1d` keeps every
    /// point of the last hour, the newest of each hour for a day and of each day for 30
    /// days. A point is kept if --keep or any tier keeps it; dropping points between kept
    /// ones folds their pre-images into the next kept point, so every kept point restores
    /// exactly and at the same cost.
    #[arg(long, value_parser = parse_tier_list, value_name = "TIERS")]
    pub tiers: Option<TierList>,
    /// Tiers for one disk (of any agent) instead of --tiers: DISK=TIERS (repeatable).
    #[arg(long, value_name = "DISK=TIERS")]
    pub tiers_for: Vec<String>,
}

pub fn serve(args: Serve) -> Result<()> {
    let Serve {
        config,
        identity,
        store,
        listen,
        agents,
        allow,
        keep,
        tiers,
        tiers_for,
    } = args;
    let file = match &config {
        Some(path) => super::config::load(path)?,
        None => super::config::ServeFile::default(),
    };
    let identity = identity
        .or(file.identity)
        .context("no identity: give --identity or `identity` in --config")?;
    let store = store
        .or(file.store)
        .context("no store: give --store or `store` in --config")?;
    let listen = listen
        .or(file.listen)
        .unwrap_or_else(|| "127.0.0.1:7420".parse().expect("a valid address"));
    let keep = keep.or(file.keep).unwrap_or(store::KEEP_DEFAULT);
    let tiers = tiers.map(|t| t.0).or(file.tiers);
    let agents = agents.or(file.agents_file);
    let mut retention_for = std::collections::HashMap::new();
    for (disk, tiers) in file.tiers_for {
        retention_for.insert(disk, Retention { keep, tiers });
    }
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
        list = server::parse_agents(&text).with_context(|| format!("in {}", path.display()))?;
    }
    for a in allow {
        let (name, fp) = a
            .split_once('=')
            .context("--allow takes NAME=FINGERPRINT")?;
        store::validate_agent_name(name).map_err(anyhow::Error::msg)?;
        list.push((name.to_owned(), fp.parse()?));
    }
    list.extend(file.agents);
    if list.is_empty() {
        bail!(
            "no agent is allowed: give --agents FILE, --allow NAME=FINGERPRINT or [agents] in \
             --config"
        );
    }
    let mut map = std::collections::HashMap::new();
    for (name, fp) in list {
        if map.values().any(|n| *n == name) || map.insert(fp, name.clone()).is_some() {
            bail!("agent {name:?} or its fingerprint is listed twice");
        }
    }
    std::fs::create_dir_all(&store).with_context(|| format!("creating {}", store.display()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(server::run(
        id,
        server::Config {
            retention: Retention {
                keep,
                tiers: tiers.unwrap_or_default(),
            },
            retention_for,
            ..server::Config::new(store, listen, map)
        },
    ))?;
    Ok(())
}
