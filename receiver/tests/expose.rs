//! `ctk-receiver expose`: a restore point served over NBD equals its restore for real clients
//! (qemu-img, nbdcopy, qemu-io, nbdinfo), stays the point's while merges commit newer points
//! and retention runs, is pinned while exposed, and refuses what it cannot do.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use common::chain::{chain, id, points, restored};
use common::{Proc, Rng, run, start, tool};
use ctk_receiver::store::{DiskStore, Exposure, Pick, PointMeta};

fn expose(store: &Path, disk: &str, point: &str, sock: &Path) -> (Proc, serde_json::Value) {
    let (p, line) = start(Command::new(env!("CARGO_BIN_EXE_ctk-receiver")).args([
        "expose",
        "--store",
        store.to_str().unwrap(),
        "--disk",
        disk,
        "--point",
        point,
        "--listen",
        &format!("unix:{}", sock.display()),
        "--json",
    ]));
    (p, serde_json::from_str(&line).unwrap())
}

/// The runs `nbdinfo --map` prints: (offset, length, is a hole).
fn map(uri: &str) -> Vec<(u64, u64, bool)> {
    let (ok, out, err) = run(Command::new(tool("nbdinfo")).args(["--map", "--json", uri]));
    assert!(ok, "nbdinfo --map: {err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let t = r["type"].as_u64().unwrap();
            (
                r["offset"].as_u64().unwrap(),
                r["length"].as_u64().unwrap(),
                t & 1 != 0,
            )
        })
        .collect()
}

#[test]
fn an_exposed_point_reads_as_its_restore_through_real_clients() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let c = chain(dir.path(), "vm1", 8, 2 << 20, 41);
    let s = store.to_str().unwrap();
    for d in &c.deltas {
        common::chain::ingest(s, "vm1", d);
    }
    let ids = points(s, "vm1");
    assert_eq!(ids.len(), 8);
    // The newest point (all from full.img) and an old one (through seven undo files).
    for (k, point) in [(7usize, "latest"), (2, ids[2].as_str())] {
        let want = &c.states[k];
        let sock = dir.path().join(format!("x{k}.sock"));
        let (proc, ready) = expose(&store, "vm1", point, &sock);
        assert_eq!(ready["point"], ids[k].as_str());
        assert_eq!(ready["size"], want.len() as u64);
        let uri = ready["uri"].as_str().unwrap().to_owned();
        // qemu-img convert and nbdcopy both copy out exactly the point, as restore does.
        let out = dir.path().join(format!("q{k}.img"));
        let (ok, _, err) = run(Command::new("qemu-img").args([
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &uri,
            out.to_str().unwrap(),
        ]));
        assert!(ok, "qemu-img convert: {err}");
        // qemu sizes a disk in 512-byte sectors: an unaligned point comes out with its last
        // sector completed with zeros.
        let got = std::fs::read(&out).unwrap();
        assert_eq!(got.len() as u64, (want.len() as u64).next_multiple_of(512));
        assert!(
            got[..want.len()] == want[..] && got[want.len()..].iter().all(|&x| x == 0),
            "qemu-img copy of point {k}"
        );
        let out2 = dir.path().join(format!("n{k}.img"));
        let (ok, _, err) = run(Command::new(tool("nbdcopy")).args([&uri, out2.to_str().unwrap()]));
        assert!(ok, "nbdcopy: {err}");
        assert!(
            std::fs::read(&out2).unwrap() == *want,
            "nbdcopy of point {k}"
        );
        let r = restored(s, "vm1", &ids[k], &dir.path().join(format!("r{k}.img")));
        assert!(r == *want, "restore of point {k}");
        // qemu-io checks a block's pattern where the point has one.
        let at = want
            .chunks(4096)
            .position(|b| b[0] != 0 && b.iter().all(|&x| x == b[0]))
            .expect("a block filled with one byte");
        let cmd = format!("read -P {} {} 4096", want[at * 4096], at * 4096);
        let (ok, out, err) =
            run(Command::new("qemu-io").args(["-r", "-f", "raw", "-c", &cmd, &uri]));
        assert!(ok && !out.contains("failed"), "qemu-io {cmd}: {out}{err}");
        // A write is refused: the point is read-only.
        let (_, out, err) =
            run(Command::new("qemu-io").args(["-f", "raw", "-c", "write 0 4k", &uri]));
        assert!(!out.contains("wrote"), "a write went through: {out}{err}");
        // The map covers the point exactly; what it calls a hole reads as zeros.
        let runs = map(&uri);
        assert_eq!(runs.iter().map(|r| r.1).sum::<u64>(), want.len() as u64);
        let mut holes = 0;
        for &(offset, length, hole) in &runs {
            if hole {
                holes += length;
                let bytes = &want[offset as usize..(offset + length) as usize];
                assert!(
                    bytes.iter().all(|&x| x == 0),
                    "a hole at {offset} holds data"
                );
            }
        }
        assert!(
            holes > 0,
            "point {k} has zero blocks but the map shows no hole"
        );
        // SIGTERM: a clean stop takes the socket and the pin away.
        let mut proc = proc;
        // SAFETY: kill(2) on a child's pid touches no memory.
        unsafe { libc::kill(proc.0.id() as i32, libc::SIGTERM) };
        assert!(proc.0.wait().unwrap().success());
        assert!(!sock.exists(), "the socket outlived its exposure");
    }
    // The exposures ended: their pins are gone, and the store verifies.
    assert!(!store.join("vm1").join("expose.pin").exists());
    common::chain::ok(&["verify", "--store", s, "--disk", "vm1"]);
}

#[test]
fn a_live_reader_keeps_its_points_bytes_while_merges_commit_and_retention_runs() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let c = chain(dir.path(), "d", 16, 4 << 20, 7);
    let ingest = |k: usize, keep: usize| {
        let (mut s, _) = DiskStore::open_waiting(&root, "d").unwrap();
        let f = std::fs::File::open(&c.deltas[k]).unwrap();
        s.ingest(f, keep, |_| Ok(PointMeta::default())).unwrap();
    };
    for k in 0..4 {
        ingest(k, 30);
    }
    // Exposed: point 4 (index 3), the newest, read wholly from full.img.
    let exposure = Exposure::open(&root, "d", Pick::Latest).unwrap();
    assert_eq!(exposure.point().change_id, id(4));
    let mut reader = exposure.reader().unwrap();
    // A merge overwrites full.img: the reader must follow it to the undo (deterministic).
    ingest(4, 30);
    let mut whole = vec![0u8; c.states[3].len()];
    reader.read_at(&mut whole, 0).unwrap();
    assert!(
        whole == c.states[3],
        "a read after a merge returned the newer point's bytes"
    );
    // Now concurrently: a reader thread against ten merges with retention keeping three.
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicUsize::new(0));
    let want = c.states[3].clone();
    let thread = {
        let (stop, reads) = (stop.clone(), reads.clone());
        let mut reader = exposure.reader().unwrap();
        std::thread::spawn(move || {
            let mut rng = Rng(99);
            while !stop.load(Ordering::Relaxed) {
                let offset = rng.below(want.len() as u64 - 1);
                let len = 1 + rng.below((want.len() as u64 - offset).min(256 << 10)) as usize;
                let mut buf = vec![0u8; len];
                reader.read_at(&mut buf, offset).unwrap();
                assert!(
                    buf == want[offset as usize..offset as usize + len],
                    "{len} bytes at {offset} differ from the exposed point's"
                );
                reads.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    for k in 5..15 {
        ingest(k, 3);
    }
    stop.store(true, Ordering::Relaxed);
    thread
        .join()
        .expect("the reader saw the point's bytes throughout");
    let n = reads.load(Ordering::Relaxed);
    assert!(n >= 20, "only {n} reads ran beside the merges");
    let (s, _) = DiskStore::open_waiting(&root, "d").unwrap();
    let kept: Vec<_> = s.points().iter().map(|p| p.change_id).collect();
    assert!(
        kept.contains(&id(4)),
        "the pinned point was dropped: {kept:?}"
    );
    assert_eq!(
        kept.len(),
        4,
        "three by retention and the pinned one: {kept:?}"
    );
    // Every kept point still restores exactly.
    for p in &kept {
        let k = (p.seq - 1) as usize;
        let out = dir.path().join("r.img");
        s.restore(*p, &out, |_, _| {}).unwrap();
        assert!(
            std::fs::read(&out).unwrap() == c.states[k],
            "restore of {p}"
        );
    }
    drop(s);
    // Unpinned, the next merge's retention drops it.
    drop(reader);
    drop(exposure);
    ingest(15, 3);
    let (s, _) = DiskStore::open_waiting(&root, "d").unwrap();
    assert!(s.points().iter().all(|p| p.change_id != id(4)));
    eprintln!("{n} reads beside 10 merges, every one the exposed point's bytes");
}

#[test]
fn exposing_what_is_not_there_or_twice_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let c = chain(dir.path(), "vm1", 2, 256 << 10, 3);
    let s = store.to_str().unwrap();
    for d in &c.deltas {
        common::chain::ingest(s, "vm1", d);
    }
    let bin = env!("CARGO_BIN_EXE_ctk-receiver");
    let sock = dir.path().join("a.sock");
    let listen = format!("unix:{}", sock.display());
    let attempt = |disk: &str, point: &str, listen: &str| {
        run(Command::new(bin).args([
            "expose", "--store", s, "--disk", disk, "--point", point, "--listen", listen,
        ]))
    };
    let missing = id(9).to_string();
    let (ok, _, err) = attempt("vm1", &missing, &listen);
    // A missing point: the error names the points that are kept.
    assert!(
        !ok && err.contains("no restore point") && err.contains("the newest it keeps"),
        "{err}"
    );
    let (ok, _, err) = attempt("vm9", "latest", &listen);
    assert!(!ok && err.contains("no disk \"vm9\""), "{err}");
    let (ok, _, err) = attempt("vm1", "not-an-id", &listen);
    assert!(!ok && err.contains("ChangeId"), "{err}");
    let (ok, _, err) = attempt("vm1", "latest", "/no/form");
    assert!(!ok && err.contains("unix:PATH"), "{err}");
    // One exposure per disk; the second names the reason and leaves the first serving.
    let (_first, ready) = expose(&store, "vm1", "latest", &sock);
    let other = format!("unix:{}", dir.path().join("b.sock").display());
    let (ok, _, err) = attempt("vm1", "latest", &other);
    assert!(!ok && err.contains("already exposed"), "{err}");
    let uri = ready["uri"].as_str().unwrap();
    let listed = common::chain::ok(&["points", "--store", s, "--disk", "vm1", "--json"]);
    assert_eq!(
        listed[0]["exposed"], ready["point"],
        "points names the exposed point"
    );
    let (ok, out, err) = run(Command::new(tool("nbdinfo")).args(["--size", uri]));
    assert!(
        ok && out.trim() == c.states[1].len().to_string(),
        "{out}{err}"
    );
    // Killed, it leaves its pin and socket behind; neither stops the next exposure.
    drop(_first);
    assert!(store.join("vm1").join("expose.pin").exists());
    let listed = common::chain::ok(&["points", "--store", s, "--disk", "vm1", "--json"]);
    assert!(listed[0]["exposed"].is_null(), "a stale pin shown as live");
    let (_again, ready) = expose(&store, "vm1", "latest", &sock);
    let uri = ready["uri"].as_str().unwrap();
    let (ok, out, err) = run(Command::new(tool("nbdinfo")).args(["--size", uri]));
    assert!(
        ok && out.trim() == c.states[1].len().to_string(),
        "{out}{err}"
    );
}

/// Reads the server's 18-byte greeting and sends the client's flags (fixed newstyle, no
/// zeroes).
fn greet(s: &mut std::os::unix::net::UnixStream) {
    use std::io::{Read, Write};
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    assert_eq!(&hello[..8], b"NBDMAGIC");
    s.write_all(&3u32.to_be_bytes()).unwrap();
}

/// Sends an option and returns the types of its replies, up to the final one (the ACK or an
/// error); None if the server closed.
fn option(s: &mut std::os::unix::net::UnixStream, opt: u32, data: &[u8]) -> Option<Vec<u32>> {
    use std::io::{Read, Write};
    let mut msg = b"IHAVEOPT".to_vec();
    msg.extend_from_slice(&opt.to_be_bytes());
    msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
    msg.extend_from_slice(data);
    s.write_all(&msg).ok()?;
    let mut types = Vec::new();
    loop {
        let mut head = [0u8; 20];
        s.read_exact(&mut head).ok()?;
        let len = u32::from_be_bytes(head[16..20].try_into().unwrap());
        let mut rest = vec![0u8; len as usize];
        s.read_exact(&mut rest).ok()?;
        let kind = u32::from_be_bytes(head[12..16].try_into().unwrap());
        types.push(kind);
        if kind == 1 || kind & (1 << 31) != 0 {
            return Some(types);
        }
    }
}

#[test]
fn hostile_clients_end_only_their_own_connection() {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let c = chain(dir.path(), "vm1", 2, 256 << 10, 9);
    let s = store.to_str().unwrap();
    for d in &c.deltas {
        common::chain::ingest(s, "vm1", d);
    }
    let sock = dir.path().join("h.sock");
    let (_proc, ready) = expose(&store, "vm1", "latest", &sock);
    let uri = ready["uri"].as_str().unwrap().to_owned();
    let serves = || {
        let (ok, out, err) = run(Command::new(tool("nbdinfo")).args(["--size", &uri]));
        assert!(
            ok && out.trim() == c.states[1].len().to_string(),
            "{out}{err}"
        );
    };
    // Garbage instead of the client's flags and options.
    let mut g = UnixStream::connect(&sock).unwrap();
    let mut hello = [0u8; 18];
    g.read_exact(&mut hello).unwrap();
    g.write_all(&[0xffu8; 64]).unwrap();
    assert_eq!(
        g.read(&mut [0u8; 16]).unwrap_or(0),
        0,
        "garbage was answered"
    );
    serves();
    // An option too large is refused without being held, the connection goes on.
    let mut big = UnixStream::connect(&sock).unwrap();
    greet(&mut big);
    assert_eq!(
        option(&mut big, 3, &vec![0u8; 1 << 20]),
        Some(vec![(1 << 31) + 9])
    );
    assert_eq!(
        option(&mut big, 3, &[]),
        Some(vec![2, 1]),
        "LIST after the refusal"
    );
    // An unknown export for GO: a clean error, and the connection goes on.
    let mut name = 3u32.to_be_bytes().to_vec();
    name.extend_from_slice(b"vm9");
    name.extend_from_slice(&0u16.to_be_bytes());
    assert_eq!(option(&mut big, 7, &name), Some(vec![(1 << 31) + 6]));
    serves();
    // A request past the end and a bad request magic, after a real handshake.
    let mut t = UnixStream::connect(&sock).unwrap();
    greet(&mut t);
    let mut go = 3u32.to_be_bytes().to_vec();
    go.extend_from_slice(b"vm1");
    go.extend_from_slice(&0u16.to_be_bytes());
    assert_eq!(
        option(&mut t, 7, &go),
        Some(vec![3, 3, 3, 1]),
        "GO: size, name, block sizes"
    );
    let mut req = 0x2560_9513u32.to_be_bytes().to_vec();
    req.extend_from_slice(&0u16.to_be_bytes()); // flags
    req.extend_from_slice(&0u16.to_be_bytes()); // READ
    req.extend_from_slice(&7u64.to_be_bytes()); // cookie
    req.extend_from_slice(&(u64::MAX - 10).to_be_bytes());
    req.extend_from_slice(&4096u32.to_be_bytes());
    t.write_all(&req).unwrap();
    let mut reply = [0u8; 16];
    t.read_exact(&mut reply).unwrap();
    assert_eq!(
        u32::from_be_bytes(reply[4..8].try_into().unwrap()),
        22,
        "EINVAL past the end"
    );
    t.write_all(&[0u8; 28]).unwrap();
    assert_eq!(t.read(&mut [0u8; 16]).unwrap_or(0), 0, "a bad magic closes");
    serves();
}

/// `points`, retention and `drill stop` probe the exposure lock while an exposure may be
/// starting: a probe must never make a starting exposure report "already exposed".
#[test]
fn probes_of_the_exposure_lock_never_refuse_an_exposure() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let c = chain(dir.path(), "d", 1, 64 << 10, 3);
    let (mut s, _) = DiskStore::open_waiting(&root, "d").unwrap();
    s.ingest(std::fs::File::open(&c.deltas[0]).unwrap(), 30, |_| {
        Ok(PointMeta::default())
    })
    .unwrap();
    drop(s);
    let stop = Arc::new(AtomicBool::new(false));
    let prober = {
        let (stop, root) = (stop.clone(), root.clone());
        std::thread::spawn(move || {
            let mut probes = 0u64;
            while !stop.load(Ordering::Relaxed) {
                ctk_receiver::store::exposed(&root, "d").unwrap();
                probes += 1;
            }
            probes
        })
    };
    for i in 0..300 {
        let e = Exposure::open(&root, "d", Pick::Latest);
        assert!(e.is_ok(), "open {i} refused beside a probe: {:?}", e.err());
    }
    stop.store(true, Ordering::Relaxed);
    let probes = prober.join().unwrap();
    assert!(probes > 300, "only {probes} probes ran");
}
