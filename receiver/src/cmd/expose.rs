//! `expose`: a restore point served over NBD, read-only, until Ctrl-C or SIGTERM.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::Result;
use clap::Args;
use ctk_net::local::Listen;
use serde_json::json;

use ctk_receiver::export;

use super::group::Target;

#[derive(Args)]
#[command(after_help = "Examples:\n  \
ctk-receiver expose --store /srv/ctk/host1 --disk vm1 --point latest --listen unix:/run/ctk/vm1.sock\n  \
qemu-img convert -O qcow2 'nbd+unix:///vm1?socket=/run/ctk/vm1.sock' vm1.qcow2\n  \
nbdinfo --map 'nbd+unix:///vm1?socket=/run/ctk/vm1.sock'\n\n\
  # a consistency group's point: every member, each on its own socket in a directory\n  \
ctk-receiver expose --store /srv/ctk/host1 --group erp --point latest --listen-dir /run/ctk/erp\n\n\
The export is named after the disk. It is ready as soon as `expose` prints its URI (with \
--json, one JSON line); stop it with Ctrl-C or SIGTERM, which also unpins the point. One \
exposure per disk at a time.")]
pub struct Expose {
    #[command(flatten)]
    pub served: super::group::ServeSel,
    /// Print the ready line as JSON: {"ready", "disk", "point", "size", "cut", "consistency",
    /// "writable", "mode" ("read-only", "drill" or "failover"), "uri"}.
    #[arg(long)]
    pub json: bool,
}

pub fn expose(args: Expose) -> Result<()> {
    let Expose { served, json } = args;
    let (sel, listen) = match served.target()? {
        Target::Disk(sel, listen) => (sel, listen),
        Target::Group(g) => return super::group::expose(&g, json),
    };
    let (_, exposure) = sel.expose("exposing a point of")?;
    let disk = sel.sel.disk;
    let served = export::Served {
        exposure: Arc::new(exposure),
        overlay: None,
    };
    run_export(&disk, served, &listen, json)
}

/// Serves `served` on `listen` until SIGINT or SIGTERM: the ready line (with `json`, one
/// JSON object) once clients can connect, then the export. Shared by `expose`, `drill` and
/// `failover`.
pub(crate) fn run_export(
    disk: &str,
    served: export::Served,
    listen: &Listen,
    json: bool,
) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = export::bind(listen).await?;
        let uri = listener.uri(disk)?;
        let p = served.exposure.point();
        let (access, mode) = match &served.overlay {
            None => ("read-only", "read-only"),
            Some(export::Writes::Drill(_)) => ("writable through a throwaway overlay", "drill"),
            Some(export::Writes::Failover(_)) => (
                "writable, FAILED OVER: every write is tracked and kept",
                "failover",
            ),
        };
        let cut = p
            .cut_unix_ms
            .map(|ms| humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)));
        if json {
            let line = json!({
                "ready": true,
                "disk": disk,
                "point": p.change_id.to_string(),
                "size": p.disk_size,
                "cut": cut.map(|c| c.to_string()),
                "consistency": p.consistency,
                "writable": served.overlay.is_some(),
                "mode": mode,
                "uri": uri,
            });
            println!("{line}");
        } else {
            println!(
                "ready: {disk} as of {} ({} bytes{}), {access}, at {uri}\nstop with Ctrl-C",
                p.change_id,
                p.disk_size,
                cut.map(|c| format!(", cut {c}")).unwrap_or_default()
            );
        }
        std::io::stdout().flush()?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let stop = async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        };
        export::serve(served, listener, stop).await
    })?;
    // Connections still open end with the runtime; then the caller's pin goes.
    drop(runtime);
    Ok(())
}
