//! `ingest` (delta files merged into a store) and `adopt` (an image already at this site
//! made a disk's first point).

use std::io::BufReader;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::json;

use ctk_receiver::retention::Retention;
use ctk_receiver::store::{self, Ingested};

use super::{TierList, open, parse_digest, parse_tier_list};

#[derive(Args)]
pub struct Ingest {
    /// The store's root directory (one subdirectory per disk).
    #[arg(long)]
    pub store: PathBuf,
    /// The disk's name: 1-128 of A-Z a-z 0-9 . _ - (it must match the deltas' disk id).
    #[arg(long)]
    pub disk: String,
    /// Restore points to keep; older ones are dropped after each merge.
    #[arg(long, default_value_t = store::KEEP_DEFAULT)]
    pub keep: usize,
    /// Also keep points by age tiers (see `serve --help`).
    #[arg(long, value_parser = parse_tier_list, value_name = "TIERS")]
    pub tiers: Option<TierList>,
    /// When the (single) delta's cut was taken (unix ms), for the point's record and
    /// the age tiers; default: when it is merged.
    #[arg(long, value_name = "MS")]
    pub cut_unix_ms: Option<u64>,
    /// The digest of the whole image after the (single) delta, as the sender computed it
    /// (64 hex digits, see docs/format.md): the merge is refused if the merged image
    /// differs. Pushes over QUIC carry it; this is for deltas that travelled otherwise.
    #[arg(long, value_parser = parse_digest)]
    pub image_digest: Option<ctk::digest::ImageDigest>,
    /// Print one JSON object per delta.
    #[arg(long)]
    pub json: bool,
    #[arg(required = true)]
    pub deltas: Vec<PathBuf>,
}

pub fn ingest(args: Ingest) -> Result<()> {
    let Ingest {
        store,
        disk,
        keep,
        tiers,
        cut_unix_ms,
        image_digest,
        json,
        deltas,
    } = args;
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
                    image_digest,
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
    Ok(())
}

#[derive(Args)]
pub struct Adopt {
    /// The agent's store directory (STORE/AGENT, as `serve` lays it out).
    #[arg(long)]
    pub store: PathBuf,
    #[arg(long)]
    pub disk: String,
    /// The raw image to adopt (read, never changed).
    #[arg(long)]
    pub image: PathBuf,
    /// The agent's block size for this disk (its `--block-size`).
    #[arg(long, default_value_t = ctk::limits::BLOCK_SIZE_DEFAULT)]
    pub block_size: u32,
    #[arg(long)]
    pub json: bool,
}

pub fn adopt(args: Adopt) -> Result<()> {
    let Adopt {
        store,
        disk,
        image,
        block_size,
        json,
    } = args;
    let mut s = open(&store, &disk)?;
    if let Some(p) = s.points().last() {
        bail!(
            "disk {disk:?} already has points (newest {}): adopt seeds an empty store",
            p.change_id
        );
    }
    let file =
        std::fs::File::open(&image).with_context(|| format!("opening {}", image.display()))?;
    let size = file.metadata()?.len();
    // The image's own digest goes with it, so the copy written into the store is
    // checked like any pushed point.
    let digest = ctk::digest::Leaves::of_image(&file, size, block_size)
        .map(|l| l.digest())
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
    Ok(())
}
