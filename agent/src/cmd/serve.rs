//! `serve`: the daemon. Flags and the configuration file resolved into open disks and
//! bounds, then the listeners run until SIGINT/SIGTERM.

use std::path::PathBuf;

use anyhow::{Context, Result};

use ctk_agent::config::parse_size;
use ctk_agent::{config, disk, limits, server};

use super::{DEFAULT_CONTROL, parse_disk};

/// `serve`'s flags.
#[derive(clap::Args)]
pub struct Serve {
    /// A disk to protect, as NAME=PATH (a raw image file or a block device). Repeatable.
    /// The change journal is PATH.ctk unless --journal-dir is given.
    #[arg(long = "disk", value_parser = parse_disk, required_unless_present = "config")]
    pub disks: Vec<(String, PathBuf)>,
    /// A consistency group, as NAME=DISK,DISK,...: its disks are always cut at one
    /// instant (`cut --group NAME`), so they restore together. Repeatable; a disk is in
    /// one group at most.
    #[arg(long = "group", value_parser = ctk_agent::group::parse_flag, value_name = "NAME=DISKS")]
    pub groups: Vec<(String, Vec<String>)>,
    /// A TOML configuration: disks, hooks, freeze targets, destage steps, listeners
    /// (an example is at the top of agent/src/config.rs).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Where journals live (as NAME.ctk); default: beside each disk.
    #[arg(long)]
    pub journal_dir: Option<PathBuf>,
    /// Where the NBD front listens: unix:PATH or tcp:ADDRESS:PORT (loopback unless you
    /// mean it: NBD has no authentication). Repeatable. Default: unix:/run/ctk-agent/nbd.sock.
    #[arg(long = "listen")]
    pub listens: Vec<server::Listen>,
    /// The control socket (mode 0600). Default: /run/ctk-agent/control.sock.
    #[arg(long)]
    pub control: Option<PathBuf>,
    /// Tracking granularity, a power of two from 4K to 1M.
    #[arg(long, default_value = "4K", value_parser = parse_size)]
    pub block_size: u64,
    /// zstd level for exported deltas (default 1).
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..=19))]
    pub zstd_level: Option<i32>,
}

/// Resolves flags and the configuration file into open disks, then runs the daemon.
pub fn serve(args: Serve) -> Result<()> {
    let Serve {
        disks,
        groups,
        config,
        journal_dir,
        mut listens,
        control,
        block_size,
        zstd_level,
    } = args;
    let mut file = match &config {
        Some(path) => config::load(path)?,
        None => config::Config::default(),
    };
    let journal_dir = journal_dir.or(file.journal_dir.clone());
    let mut wanted: Vec<(String, PathBuf, u64, Option<PathBuf>, config::CutPolicy)> = disks
        .into_iter()
        .map(|(name, path)| (name, path, block_size, None, config::CutPolicy::default()))
        .collect();
    for d in std::mem::take(&mut file.disks) {
        parse_disk(&format!("{}={}", d.name, d.path.display())).map_err(anyhow::Error::msg)?;
        let bs = match &d.block_size {
            Some(text) => parse_size(text).map_err(anyhow::Error::msg)?,
            None => block_size,
        };
        wanted.push((d.name, d.path, bs, d.journal, d.cut));
    }
    let mut opened: Vec<std::sync::Arc<disk::ProtectedDisk>> = Vec::new();
    for (name, path, bs, journal, policy) in wanted {
        if opened.iter().any(|d| d.name == name) {
            anyhow::bail!("disk name {name:?} is given twice");
        }
        let journal = match (journal, &journal_dir) {
            (Some(j), _) => j,
            (None, Some(dir)) => dir.join(format!("{name}.ctk")),
            (None, None) => {
                let mut j = path.clone().into_os_string();
                j.push(".ctk");
                PathBuf::from(j)
            }
        };
        let (d, outcome) = disk::ProtectedDisk::open(&name, &path, &journal, bs, policy)?;
        for target in &d.policy.freeze {
            ctk_agent::mounts::check_target_at_load(target, d.image_id())
                .with_context(|| format!("disk {name:?}"))?;
        }
        tracing::info!(disk = %name, ?outcome, size = d.size(), "protecting");
        opened.push(std::sync::Arc::new(d));
    }
    for l in &file.listen {
        listens.push(l.parse().map_err(anyhow::Error::msg)?);
    }
    if listens.is_empty() {
        listens.push(
            "unix:/run/ctk-agent/nbd.sock"
                .parse()
                .map_err(anyhow::Error::msg)?,
        );
    }
    let control = control
        .or(file.control.clone())
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONTROL));
    let zstd_level = zstd_level.or(file.zstd_level).unwrap_or(1);
    anyhow::ensure!((1..=19).contains(&zstd_level), "zstd_level must be 1 to 19");
    let limits = resolve_limits(&file)?;
    let mut wanted_groups: Vec<_> = std::mem::take(&mut file.groups)
        .into_iter()
        .map(|g| (g.name, g.disks))
        .collect();
    wanted_groups.extend(groups);
    let names: Vec<&str> = opened.iter().map(|d| d.name.as_str()).collect();
    let groups = ctk_agent::group::resolve(wanted_groups, &names)?;
    let agent = server::Agent::new(opened, zstd_level, limits).with_groups(groups);
    let agent = std::sync::Arc::new(agent);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(server::run(agent, listens, control))
}

/// The daemon's bounds: the configuration's, else the defaults fitted to the descriptors
/// this process may open (its soft limit raised to the hard one first).
fn resolve_limits(file: &config::Config) -> Result<limits::Limits> {
    let mut l = limits::Limits::default();
    if let Some(n) = file.nbd_connections_max {
        anyhow::ensure!(n >= 1, "nbd_connections_max must be at least 1");
        l.nbd_connections = n;
    }
    if let Some(n) = file.control_connections_max {
        anyhow::ensure!(n >= 1, "control_connections_max must be at least 1");
        l.control_connections = n;
    }
    if let Some(text) = &file.nbd_memory_max {
        l.nbd_memory = parse_size(text).map_err(anyhow::Error::msg)?;
        anyhow::ensure!(
            l.nbd_memory >= u64::from(ctk_agent::nbd::PAYLOAD_MAX),
            "nbd_memory_max must be at least 32M, the largest request the agent accepts"
        );
    }
    if let Some(ms) = file.nbd_handshake_timeout_ms {
        anyhow::ensure!(ms >= 100, "nbd_handshake_timeout_ms must be at least 100");
        l.nbd_handshake_timeout = std::time::Duration::from_millis(ms);
    }
    let fds = limits::raise_descriptor_limit();
    if let Some(warning) = l.fit_to_descriptors(
        fds,
        file.nbd_connections_max.is_some(),
        file.control_connections_max.is_some(),
    ) {
        tracing::warn!("{warning}");
    }
    tracing::debug!(?l, fds, "limits");
    Ok(l)
}
