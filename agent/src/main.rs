//! `ctk-agent`: the host-resident half of ctk. Parses and resolves the command line, then
//! calls library code; only this binary uses anyhow.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

use ctk_agent::{freeze, pipeline};

mod cmd;

/// Exit codes: 0 success, 1 an operation failed (the message says what and why), 2 bad
/// command line (clap's own).
#[derive(Parser)]
#[command(
    name = "ctk-agent",
    version,
    about = "Changed-block tracking agent: tracks writes to protected disks, cuts consistent points, exports deltas",
    long_about = "ctk-agent keeps, for every protected disk, a change map in which each block carries the \
sequence number of the cut in which it was last written, durable in a journal beside the disk. At a cut \
it can export exactly the blocks changed since any earlier cut (a ChangeId) as a self-checking delta.\n\n\
Start with `ctk-demo` (its own binary): it generates an image, replicates it to a receiver, and proves that \
full + incremental deltas rebuild it byte for byte.\n\nLogs go to stderr; set RUST_LOG=info (or debug) for more.",
    after_long_help = "Exit codes: 0 done; 1 failed (the message says what and why); 2 bad command line."
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
    /// Run the agent: serve each protected disk over NBD with change tracking, and answer
    /// cut / changed / export / resize / status on the control socket. Stops cleanly on
    /// SIGINT/SIGTERM.
    ///
    /// One agent per disk: the image and its journal are locked for the life of the process
    /// (a second `serve` on either exits naming the holder); a socket left by a killed agent
    /// is replaced, one something still answers on never is. Bounds on what clients can make
    /// it hold (connections, memory, timeouts) are in the configuration (docs/nbd.md).
    ///
    /// Example: ctk-agent serve --disk vm1=/var/lib/images/vm1.img --listen unix:/run/ctk-agent/nbd.sock
    /// then: qemu-io -f raw 'nbd+unix:///vm1?socket=/run/ctk-agent/nbd.sock' -c 'write 0 4k'
    Serve(cmd::serve::Serve),
    /// (internal) Freeze mount points and thaw them on request, on parent death or at the
    /// timeout; started by the agent for application-consistent cuts.
    #[command(hide = true)]
    FreezeHelper {
        #[arg(long)]
        timeout_ms: u64,
        mounts: Vec<PathBuf>,
    },
    /// (internal) Run a hook or destage command for the agent, killing it and everything it
    /// started if the agent dies first.
    #[command(hide = true)]
    HookRunner {
        #[arg(long)]
        parent: u32,
        #[arg(last = true)]
        command: String,
    },
    /// Cut now: hold NBD writes, let those in flight finish, seal the epoch, release the
    /// writes, then make the seal and the backing durable. With the disk's hooks and freezes
    /// (the default when it has any) the cut is application-consistent. Prints the new
    /// ChangeId. With --group, every disk of a consistency group is cut at one instant
    /// (all their writes held at once) and each member's ChangeId is printed.
    Cut(cmd::control::Cut),
    /// List the extents changed since a ChangeId (or "all") up to the latest cut, like
    /// VMware's QueryChangedDiskAreas.
    Changed(cmd::control::Changed),
    /// Cut, and write the blocks changed since a ChangeId (or "all") up to that cut as a
    /// delta file. Writes are held only for the cut; the delta is the disk as of the cut
    /// while writes go on (copy-on-write). A failed export leaves no partial file. With
    /// --group, one cut of every member at one instant and one delta per member in the
    /// directory -o names (DISK.ctkd), all or none.
    Export(cmd::control::Export),
    /// Register, advance or drop a consumer cursor: cuts after a registered cursor stay
    /// answerable until it advances (without one, only the newest 8 cuts stay exact).
    Cursor(cmd::control::Cursor),
    /// Grow or shrink a protected disk while it is served (a raw image file; resize a block
    /// device itself and the agent follows at its next cut). The change journal records the
    /// new size first, so tracking continues: growing marks the new range changed, and the
    /// next `replicate` sends only the blocks written since, the receiver's replica taking
    /// the new size. NBD clients see the new size when they reconnect (as with qemu-nbd).
    /// Shrinking discards the end of the disk.
    ///
    /// Example: ctk-agent resize --disk vm1 --size 40G
    Resize(cmd::control::Resize),
    /// Create this agent's identity (key and self-signed certificate) and print its
    /// fingerprint: the receiver allows the agent by it (`ctk-receiver serve --allow`).
    /// Run again, it prints the existing identity's fingerprint (never replaced).
    Init(cmd::offline::Init),
    /// Bring a disk's replica on a receiver up to a new cut: export the changes since the
    /// receiver's newest point (a full the first time), push them over QUIC, and advance
    /// this agent's cursor for the receiver once the receiver has committed them.
    ///
    /// Once by default. With --every it keeps going (continuous mode: a crash-consistent
    /// cut every interval, plus application-consistent ones every --app-every); with --at
    /// it cuts at those local times each day (incremental forever). A long-running
    /// replication retries failures with growing pauses and stops on SIGINT/SIGTERM after
    /// the push under way. When the link is slower than the writes, each push carries all
    /// that piled up since the last commit (each block once, newest data): it never falls
    /// back to a full for being behind.
    #[command(verbatim_doc_comment)]
    Replicate(cmd::replicate::Replicate),
    /// After a failover at the DR site: bring this disk equal to the DR disk, sending only
    /// what either side changed (passes while the recovered VM runs, --every), then the
    /// cutover (--final): the receiver commits the DR disk as this disk's cut and
    /// replication resumes with an increment, no full.
    #[command(verbatim_doc_comment)]
    Failback(cmd::failback::Failback),
    /// Show each protected disk: latest cut, open epoch, journal syncs, I/O counters.
    Status(cmd::control::Status),
    /// Read a delta file and check every record, checksum and the trailer; print its header
    /// and totals.
    VerifyDelta(cmd::offline::VerifyDelta),
}
fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve(args) => cmd::serve::serve(args),
        Command::FreezeHelper { timeout_ms, mounts } => {
            freeze::helper_main(&mounts, std::time::Duration::from_millis(timeout_ms))
        }
        Command::HookRunner { parent, command } => {
            let code = pipeline::hook_runner_main(parent, &command)?;
            std::process::exit(code);
        }
        Command::Cut(args) => cmd::control::cut(args),
        Command::Changed(args) => cmd::control::changed(args),
        Command::Export(args) => cmd::control::export(args),
        Command::Cursor(args) => cmd::control::cursor(args),
        Command::Resize(args) => cmd::control::resize(args),
        Command::Init(args) => cmd::offline::init(args),
        Command::Replicate(args) => cmd::replicate::replicate(args),
        Command::Failback(args) => cmd::failback::failback(args),
        Command::Status(args) => cmd::control::status(args),
        Command::VerifyDelta(args) => cmd::offline::verify_delta(args),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    ctk_net::log::init(cli.log_format);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
