//! The commands that need no running agent: `init` (this agent's identity) and
//! `verify-delta` (check a delta file).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use serde_json::json;

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
    let (id, created) = ctk_net::Identity::init(&identity, "ctk-agent")?;
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
        "identity {} {}; allow it on the receiver with --allow NAME=<the fingerprint above>",
        if created { "written to" } else { "already in" },
        identity.display()
    );
    Ok(())
}

#[derive(Args)]
pub struct VerifyDelta {
    pub file: PathBuf,
    #[arg(long)]
    pub json: bool,
}

pub fn verify_delta(args: VerifyDelta) -> Result<()> {
    let VerifyDelta { file, json } = args;
    let f = std::fs::File::open(&file).with_context(|| format!("opening {}", file.display()))?;
    let (h, s) = ctk::delta::verify(std::io::BufReader::new(f))
        .with_context(|| format!("{} is not a valid ctk delta", file.display()))?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "file": file.display().to_string(),
                "disk_id": h.disk_id, "disk_size": h.disk_size, "block_size": h.block_size,
                "from": h.from.map(|f| f.to_string()), "to": h.to.to_string(),
                "records": s.records, "data_bytes": s.data_bytes, "zero_bytes": s.zero_bytes,
                "encoded_bytes": s.encoded_bytes, "stream_bytes": s.stream_bytes,
            }))?
        );
    } else {
        let from = h.from.map_or("(full)".to_string(), |f| f.to_string());
        println!(
            "{}: valid ctk delta of disk {:?} ({} bytes, {}-byte blocks)",
            file.display(),
            h.disk_id,
            h.disk_size,
            h.block_size
        );
        println!("  from {from}\n  to   {}", h.to);
        println!(
            "  {} records: {} data bytes ({} encoded), {} zero bytes",
            s.records, s.data_bytes, s.encoded_bytes, s.zero_bytes
        );
    }
    Ok(())
}
