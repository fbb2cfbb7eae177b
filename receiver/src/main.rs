//! `ctk-receiver`: the offsite half of ctk. It keeps, per disk, a synthetic full and restore
//! points (reverse increments), merged crash-atomically from ctk deltas pushed by agents
//! over QUIC (`serve`) or given as files (`ingest`).

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

mod cmd;

use cmd::Damaged;

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
ctk-receiver expose --store /srv/ctk/host1 --disk vm1 --point latest --listen unix:/run/ctk/vm1.sock\n  \
ctk-receiver drill start --store /srv/ctk/host1 --disk vm1 --listen unix:/run/ctk/vm1-drill.sock\n  \
ctk-receiver failover start --store /srv/ctk/host1 --disk vm1 --listen unix:/run/ctk/vm1.sock\n  \
ctk-receiver files --store /srv/ctk/host1 --disk vm1 --point latest --path /etc/hosts -o hosts\n  \
ctk-receiver verify --store /srv/ctk --all-agents       # exit 3 if anything is damaged\n  \
ctk-receiver ingest --store /srv/ctk/host1 --disk vm1 full.ctkd inc1.ctkd   # deltas from `ctk-agent export`\n\n\
Receiving from agents over QUIC:\n  \
ctk-receiver init --identity /etc/ctk-receiver      # prints this receiver's fingerprint\n  \
ctk-receiver serve --identity /etc/ctk-receiver --store /srv/ctk --allow host1=sha256:...",
    after_long_help = "Exit codes: 0 done; 1 failed (the message says what and why); 2 bad command \
line; 3 `verify` found damage."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// How the log is written on stderr: text, or json (one object per line, for journald
    /// and log collectors). Its level comes from RUST_LOG (default warn; info logs each
    /// commit).
    #[arg(long, global = true, default_value = "text", env = "CTK_LOG_FORMAT")]
    log_format: ctk_net::log::LogFormat,
}

#[derive(Subcommand)]
enum Command {
    /// Merge delta files (oldest first; `-` reads standard input) into a disk's store.
    Ingest(cmd::ingest::Ingest),
    /// Seed a disk's replica from an image already here (a copy shipped to this site): it
    /// becomes the disk's first point, and the agent's next `replicate` compares digests
    /// with it and sends only the units that differ, instead of the whole disk. The disk's
    /// store must be empty.
    Adopt(cmd::ingest::Adopt),
    /// List the restore points of one disk, or of every disk of an agent.
    Points(cmd::read::Points),
    /// Write a restore point out as a raw image (sparse), with progress on stderr.
    Restore(cmd::read::Restore),
    /// Serve a restore point over NBD, read-only, until Ctrl-C: any NBD client (qemu,
    /// nbdcopy, nbdfuse) reads the disk as of that point at once, nothing copied. A running
    /// `serve` goes on merging meanwhile; the point is pinned against retention.
    Expose(cmd::expose::Expose),
    /// Test a point while protection goes on: `drill start` serves it writable through a
    /// throwaway overlay (the point is never written), `drill stop --result passed|failed`
    /// ends it and records the result on the point (`points` shows it).
    #[command(subcommand)]
    Drill(cmd::drill::Drill),
    /// Bring a disk up for real at this site: `failover start` fences it (the agent's pushes
    /// are refused, nothing they send commits) and serves its point writable, every write
    /// tracked and kept across restarts; `failover status` shows where it stands;
    /// `failover rollback` ends it without failback.
    #[command(subcommand)]
    Failover(cmd::failover::Failover),
    /// Copy one file out of a point's filesystem (mounted read-only for the copy, unmounted
    /// after; MBR and GPT partitions found): single-file restore without a whole image.
    Files(cmd::files::Files),
    /// Mount a point's filesystem read-only at a directory, the point pinned, until `umount`
    /// or Ctrl-C (stays in the foreground).
    Mount(cmd::mount::Mount),
    /// Undo a `mount`: unmount and tear down its export (also after its process was killed).
    Umount(cmd::mount::Umount),
    /// Re-read every stored increment and check every checksum, and full.img against the
    /// newest point's image digest. Exits 3 when it finds damage; a store, agent or disk that
    /// does not exist is an error (exit 1), never a silent pass.
    Verify(cmd::read::Verify),
    /// Create this receiver's identity (key and self-signed certificate) and print its
    /// fingerprint: give it to each agent (`ctk-agent replicate --receiver-fingerprint`).
    /// Run again, it prints the existing identity's fingerprint (never replaced).
    Init(cmd::serve::Init),
    /// Serve agents over QUIC: merge the deltas they push, answer where each disk stands.
    Serve(cmd::serve::Serve),
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Ingest(args) => cmd::ingest::ingest(args),
        Command::Adopt(args) => cmd::ingest::adopt(args),
        Command::Points(args) => cmd::read::points(args),
        Command::Restore(args) => cmd::read::restore(args),
        Command::Expose(args) => cmd::expose::expose(args),
        Command::Drill(cmd) => cmd::drill::drill(cmd),
        Command::Failover(cmd) => cmd::failover::failover(cmd),
        Command::Files(args) => cmd::files::files(args),
        Command::Mount(args) => cmd::mount::mount(args),
        Command::Umount(args) => cmd::mount::umount(args),
        Command::Verify(args) => cmd::read::verify(args),
        Command::Init(args) => cmd::serve::init(args),
        Command::Serve(args) => cmd::serve::serve(args),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    ctk_net::log::init(cli.log_format);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            // 3: verify found damage; 1: anything else that failed.
            ExitCode::from(if e.is::<Damaged>() { 3 } else { 1 })
        }
    }
}
