//! `ctk-demo`: the main job, end to end, on an embedded default. In one process but
//! through the real parts: a receiver serving on 127.0.0.1 over QUIC with a store in a
//! directory, an agent protecting a generated image behind its NBD front and control socket,
//! the two paired by fingerprint; a write workload through NBD; cuts and replications; and
//! the proof that every kept restore point equals the source as of its cut.

use std::collections::HashMap;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use ctk::ChangeId;
use ctk_net::Identity;
use serde_json::{Value, json};

use ctk_agent::config::CutPolicy;
use ctk_agent::disk::ProtectedDisk;
use ctk_agent::nbd_client::NbdClient;
use ctk_agent::replicate::{self, Replicate};
use ctk_agent::server::{self, Agent, Listen};

use crate::local::{DemoOptions, Rng, fill, generate_image, say};

const DISK: &str = "vm1";
const HOST: &str = "demo-host";

/// CRC32 of a whole file: the demo's record of the source at each cut.
fn digest(path: &Path) -> Result<u32> {
    let mut f = std::fs::File::open(path)?;
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(h.finalize());
        }
        h.update(&buf[..n]);
    }
}

/// A new identity for one side (`ctk-agent` or `ctk-receiver`), saved under `dir` as the
/// binaries would keep it.
fn identity(dir: &Path, side: &str) -> Result<Identity> {
    let id = Identity::generate(&format!("ctk-{side}"))?;
    id.save(&dir.join(format!("{side}-identity")))?;
    Ok(id)
}

/// Waits up to 10 s for `path` to appear (a socket a server binds when it is ready).
fn wait_for(path: &Path, failure: &str) -> Result<()> {
    let waited = Instant::now();
    while !path.exists() {
        ensure!(waited.elapsed() < Duration::from_secs(10), "{failure}");
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

pub fn run(opts: &DemoOptions) -> Result<()> {
    ensure!(opts.size >= 1 << 20, "--size must be at least 1 MiB");
    ensure!(
        opts.size.is_multiple_of(4096),
        "--size must be a multiple of 4096 bytes"
    );
    std::fs::create_dir_all(&opts.dir)
        .with_context(|| format!("creating {}", opts.dir.display()))?;
    let dir = std::path::absolute(&opts.dir)?;
    let source_path = dir.join("source.img");
    let store = dir.join("store");
    for p in [&source_path, &store] {
        if p.exists() {
            bail!("{} already exists: give an empty --dir", p.display());
        }
    }
    let mut rng = Rng(opts.seed | 1);
    say(opts, format!("ctk demo in {}", dir.display()));
    let started = Instant::now();
    generate_image(&source_path, opts.size, &mut rng)?;
    say(
        opts,
        format!(
            "  generated a {} MiB source image (zeros, noise, text) in {:.1} s",
            opts.size >> 20,
            started.elapsed().as_secs_f64()
        ),
    );

    // Pairing: each side has an identity; each pins the other's fingerprint.
    let (agent_id, receiver_id) = (identity(&dir, "agent")?, identity(&dir, "receiver")?);
    let receiver_fp = receiver_id.fingerprint();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    // The receiver, on 127.0.0.1 with a store in the demo directory.
    let config = ctk_receiver::server::Config::new(
        store.clone(),
        "127.0.0.1:0".parse().expect("literal"),
        HashMap::from([(agent_id.fingerprint(), HOST.to_string())]),
    );
    std::fs::create_dir_all(&store)?;
    let endpoint = {
        let _ctx = runtime.enter();
        ctk_receiver::server::bind(&receiver_id, &config)?
    };
    let receiver_addr: SocketAddr = endpoint.local_addr()?;
    let (stop_receiver, stopped) = tokio::sync::oneshot::channel::<()>();
    let receiver_task = runtime.spawn(ctk_receiver::server::serve(endpoint, config, async {
        let _ = stopped.await;
    }));
    say(
        opts,
        format!(
            "  receiver on {receiver_addr} (QUIC), {receiver_fp}, store {}",
            store.display()
        ),
    );

    // The agent, protecting the image behind its NBD front and control socket.
    let journal = dir.join("source.img.ctk");
    let (disk, _) = ProtectedDisk::open(DISK, &source_path, &journal, 4096, CutPolicy::default())?;
    let agent = Arc::new(Agent::new(
        vec![Arc::new(disk)],
        opts.zstd_level,
        ctk_agent::limits::Limits::default(),
    ));
    let nbd_socket = dir.join("nbd.sock");
    let control = dir.join("ctl.sock");
    let (stop_agent, agent_stopped) = tokio::sync::oneshot::channel::<()>();
    let agent_task = runtime.spawn(server::run_until(
        agent,
        vec![Listen::Unix(nbd_socket.clone())],
        control.clone(),
        async {
            let _ = agent_stopped.await;
        },
        false,
    ));
    wait_for(&control, "the agent did not start")?;
    say(
        opts,
        format!(
            "  agent protecting {DISK} = {} (NBD {}, paired as {HOST}, {})",
            source_path.display(),
            nbd_socket.display(),
            agent_id.fingerprint()
        ),
    );

    let result = cycles(
        opts,
        &dir,
        &nbd_socket,
        &control,
        receiver_addr,
        &receiver_fp,
        &mut rng,
    );
    let _ = stop_agent.send(());
    let _ = stop_receiver.send(());
    runtime.block_on(async {
        let _ = agent_task.await;
        let _ = receiver_task.await;
    });
    let (expected, cycles) = result?;

    let proven = prove(&store, &expected)?;
    report(
        opts,
        &dir,
        &source_path,
        receiver_addr,
        &receiver_fp,
        &proven,
        &cycles,
    )
}

/// What the demo proved: the points restored and compared, the newest one restored.
struct Proven {
    host_store: PathBuf,
    points: Vec<ChangeId>,
    newest: ChangeId,
    restored: PathBuf,
}

/// The proof: every kept point, restored from the receiver's store, equals the source as of
/// its cut, and every point was digest-checked when it was merged.
fn prove(store: &Path, expected: &HashMap<ChangeId, u32>) -> Result<Proven> {
    let host_store = store.join(HOST);
    let (disk_store, _) = ctk_receiver::store::DiskStore::open(&host_store, DISK)?;
    let points: Vec<ChangeId> = disk_store.points().iter().map(|p| p.change_id).collect();
    let restored = store.with_file_name("restored.img");
    for point in &points {
        disk_store.restore(*point, &restored, |_, _| {})?;
        let want = expected
            .get(point)
            .context("a point the demo did not make")?;
        ensure!(
            digest(&restored)? == *want,
            "restore point {point} differs from the source as of its cut"
        );
    }
    // Every point was also checked by the receiver when it merged it: the merged image's
    // digest equalled the one the agent computed from its side.
    let unchecked: Vec<ChangeId> = disk_store
        .points()
        .iter()
        .filter(|p| !p.digest_checked)
        .map(|p| p.change_id)
        .collect();
    ensure!(
        unchecked.is_empty(),
        "points committed without the agent's digest check: {unchecked:?}"
    );
    let newest = *points.last().context("no point was committed")?;
    drop(disk_store);
    Ok(Proven {
        host_store,
        points,
        newest,
        restored,
    })
}

/// The demo's answer: JSON with --json, else what was proven and what to run next.
fn report(
    opts: &DemoOptions,
    dir: &Path,
    source_path: &Path,
    receiver_addr: SocketAddr,
    receiver_fp: &ctk_net::Fingerprint,
    proven: &Proven,
    cycles: &[Value],
) -> Result<()> {
    let Proven {
        host_store,
        points,
        newest,
        restored,
    } = proven;
    if opts.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "dir": dir.display().to_string(),
                "source": source_path.display().to_string(),
                "store": host_store.display().to_string(),
                "receiver": receiver_addr.to_string(),
                "receiver_fingerprint": receiver_fp.to_string(),
                "points": points,
                "newest": newest,
                "restored": restored.display().to_string(),
                "verified": true,
                "digests_checked": true,
                "cycles": cycles,
            }))?
        );
    } else {
        println!(
            "ok: all {} restore points on the receiver equal the source as of their cuts; the newest is {newest}.",
            points.len()
        );
        println!(
            "    each was also checked at merge time: the merged image's digest equalled the agent's."
        );
        println!("the newest point is restored at {}", restored.display());
        // The receiver's binary, if it was built beside this one; otherwise how to run it.
        let receiver = std::env::current_exe()
            .ok()
            .map(|p| p.with_file_name("ctk-receiver"))
            .filter(|p| p.exists())
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "cargo run --release -p ctk-receiver --".into());
        let store = host_store.display();
        println!("next:");
        println!("  {receiver} points  --store {store}");
        println!("  {receiver} restore --store {store} --disk {DISK} --point {newest} -o vm1.img");
        println!("  {receiver} verify  --store {store}");
        println!(
            "  {receiver} expose  --store {store} --disk {DISK} --point {newest} --listen unix:{}   (any NBD client reads it at once)",
            host_store.with_file_name("vm1.sock").display()
        );
    }
    Ok(())
}

/// The workload and the replications: a full first, then `opts.cycles` rounds of writes
/// through NBD, each followed by a replication. Returns the source's digest at each
/// committed point, and a report per replication.
fn cycles(
    opts: &DemoOptions,
    dir: &Path,
    nbd_socket: &Path,
    control: &Path,
    receiver: SocketAddr,
    receiver_fp: &ctk_net::Fingerprint,
    rng: &mut Rng,
) -> Result<(HashMap<ChangeId, u32>, Vec<Value>)> {
    let r = Replicate {
        identity: dir.join("agent-identity"),
        receiver,
        pinned: *receiver_fp,
        cursor: "replica".into(),
        work_dir: dir.to_path_buf(),
        resync_unit: replicate::RESYNC_UNIT_DEFAULT,
        streams: replicate::STREAMS_DEFAULT,
    };
    let source = dir.join("source.img");
    let call = |req: &ctk_agent::control::Request| ctk_agent::control::call(control, req);
    let mut expected = HashMap::new();
    let mut reports = Vec::new();
    let mut nbd = NbdClient::connect(nbd_socket, DISK)?;
    let mut data = vec![0u8; 256 * 1024];
    for cycle in 0..=opts.cycles {
        let mut written = 0u64;
        if cycle > 0 {
            // Small database-like writes and a few large ones, through the NBD front.
            for _ in 0..opts.writes_per_cycle {
                let len = match rng.below(10) {
                    0 => 4096 * (1 + rng.below(64)),
                    _ => 4096 * (1 + rng.below(4)),
                };
                let offset = rng.below((opts.size - len) / 4096) * 4096;
                fill(rng, &mut data[..len as usize]);
                nbd.write(offset, &data[..len as usize])?;
                written += len;
            }
            nbd.flush()?;
        }
        let started = Instant::now();
        let mut answer = replicate::run(&r, DISK, &call)?;
        let seconds = started.elapsed().as_secs_f64();
        // No write is in flight: the source now is the source as of the cut just replicated.
        let id: ChangeId = answer["committed"]
            .as_str()
            .unwrap_or_default()
            .parse()
            .context("replicate's answer names no committed point")?;
        expected.insert(id, digest(&source)?);
        say(
            opts,
            format!(
                "  {} {id}: {} KiB written -> {} KiB changed -> {} KiB sent over QUIC, committed in {seconds:.2} s",
                if cycle == 0 { "full " } else { "cycle" },
                written >> 10,
                answer["changed_bytes"].as_u64().unwrap_or(0) >> 10,
                answer["delta_bytes"].as_u64().unwrap_or(0) >> 10,
            ),
        );
        answer["written_bytes"] = json!(written);
        answer["seconds"] = json!(seconds);
        reports.push(answer);
    }
    Ok((expected, reports))
}
