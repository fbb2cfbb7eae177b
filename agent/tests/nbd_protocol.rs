//! The NBD front and the control socket against clients that misbehave on purpose (a raw
//! client that breaks the protocol, misuses meta contexts and pipelines requests), against
//! a real `ctk-agent serve` process: each gets an error, nothing changes, the agent serves on.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::Agent;
use common::nbd::{Raw, qemu_io};

#[test]
fn bad_clients_get_protocol_errors_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("d0.img");
    let size = 16u64 << 20;
    std::fs::write(&image, vec![0x5au8; size as usize]).unwrap();
    let agent = Agent::serve(dir.path(), &[("d0", &image)], &[]);
    let before = std::fs::read(&image).unwrap();

    // Garbage instead of client flags and options: the connection is closed.
    let mut raw = Raw::connect(dir.path());
    raw.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(raw.closed());

    // Unknown option: an error reply, and the connection stays usable.
    let mut raw = Raw::connect(dir.path());
    raw.send(&1u32.to_be_bytes());
    assert_eq!(raw.option(99, b"whatever").0, (1 << 31) + 1);
    // An export that does not exist.
    let mut go = 5u32.to_be_bytes().to_vec();
    go.extend_from_slice(b"nope!");
    go.extend_from_slice(&0u16.to_be_bytes());
    assert_eq!(raw.option(7, &go).0, (1 << 31) + 6);
    // A GO payload whose name length lies.
    let mut liar = 4000u32.to_be_bytes().to_vec();
    liar.extend_from_slice(b"d0");
    assert_eq!(raw.option(7, &liar).0, (1 << 31) + 3);
    // An option claiming a payload far beyond the limit is discarded and refused.
    let mut big = 0x4948_4156_454f_5054u64.to_be_bytes().to_vec();
    big.extend_from_slice(&6u32.to_be_bytes());
    big.extend_from_slice(&(200_000u32).to_be_bytes());
    raw.send(&big);
    raw.send(&vec![0u8; 200_000]);
    assert_eq!(raw.option_reply().0, (1 << 31) + 9);
    // TLS is refused by policy.
    assert_eq!(raw.option(5, &[]).0, (1 << 31) + 2);
    assert_eq!(raw.option(2, &[]).0, 1); // ABORT is acknowledged

    // Transmission-phase misuse.
    let mut raw = Raw::go(dir.path(), "d0");
    raw.request(0, 1, size - 100, 4096, &[]); // read past the end
    assert_eq!(raw.reply(4096), (22, 1));
    raw.request(1, 2, size - 100, 4096, &[0xee; 4096]); // write past the end
    assert_eq!(raw.reply(0), (28, 2));
    raw.request(1, 3, 0, 64 << 20, &[]); // a write longer than the maximum...
    raw.send(&vec![0xee; 64 << 20]); // ...whose payload is discarded
    assert_eq!(raw.reply(0), (75, 3));
    raw.request(0, 4, 0, u32::MAX, &[]); // an oversized read
    assert_eq!(raw.reply(0), (75, 4));
    raw.request(42, 5, 0, 4096, &[]); // unknown command
    assert_eq!(raw.reply(0), (22, 5));
    raw.request(4, 6, u64::MAX - 10, 4096, &[]); // trim with an overflowing range
    assert_eq!(raw.reply(0), (28, 6));
    // Still in step: a valid read works.
    raw.request(0, 7, 0, 4096, &[]);
    assert_eq!(raw.reply(4096), (0, 7));
    // Bad request magic: the server cannot resync and closes.
    raw.send(&[0xffu8; 28]);
    assert!(raw.closed());

    // A client that disconnects in the middle of a write payload.
    let mut raw = Raw::go(dir.path(), "d0");
    raw.request(1, 8, 0, 65536, &[0xee; 1000]);
    drop(raw);

    std::thread::sleep(Duration::from_millis(200));
    assert!(
        std::fs::read(&image).unwrap() == before,
        "a refused request changed the image"
    );
    // The agent is still up for everyone else, and nothing was tracked.
    qemu_io(&agent.uri("d0"), &["read -P 0x5a 0 64k".to_string()]);
    let answer = agent.ok(&["status"]);
    assert_eq!(answer["disks"][0]["writes"], 0, "{answer}");
    agent.stop();
}

#[test]
fn control_socket_refuses_bad_requests_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("d0.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let agent = Agent::serve(dir.path(), &[("d0", &image)], &[]);
    let ask = |line: &[u8]| -> serde_json::Value {
        let mut s = UnixStream::connect(dir.path().join("ctl.sock")).unwrap();
        s.write_all(line).unwrap();
        let mut answer = String::new();
        BufReader::new(&s).read_line(&mut answer).unwrap();
        serde_json::from_str(&answer).unwrap()
    };
    for (line, expect) in [
        (&b"not json\n"[..], "not JSON"),
        (b"{\"cmd\":\"format-c\"}\n", "unknown command"),
        (
            b"{\"cmd\":\"changed\",\"since\":\"zz/1\"}\n",
            "malformed ChangeId",
        ),
        (b"{\"cmd\":\"cut\",\"disk\":\"../etc\"}\n", "no disk named"),
        (
            b"{\"cmd\":\"export\",\"since\":\"all\",\"path\":\"relative.ctkd\"}\n",
            "must be absolute",
        ),
    ] {
        let answer = ask(line);
        assert_eq!(answer["ok"], false);
        assert!(
            answer["error"].as_str().unwrap().contains(expect),
            "{answer}"
        );
    }
    let other = format!("{{\"cmd\":\"changed\",\"since\":\"{:032x}/1\"}}\n", 7);
    assert!(
        ask(other.as_bytes())["error"]
            .as_str()
            .unwrap()
            .contains("full or compare pass")
    );
    let huge = vec![b'x'; 100_000];
    assert!(ask(&huge)["error"].as_str().unwrap().contains("too long"));
    // The agent still answers.
    assert_eq!(agent.ok(&["status"])["ok"], true);
    agent.stop();
}

fn meta_payload(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut out = (export.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(export.as_bytes());
    out.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        out.extend_from_slice(&(q.len() as u32).to_be_bytes());
        out.extend_from_slice(q.as_bytes());
    }
    out
}

/// One piece: every misuse is tried on one connection to one agent, and after each the
/// agent must still answer and the disk be unchanged.
#[test]
fn meta_context_and_block_status_misuse_gets_errors_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("d0.img");
    let size = 8u64 << 20;
    std::fs::write(&image, vec![0x33u8; size as usize]).unwrap();
    let agent = Agent::serve(dir.path(), &[("d0", &image)], &[]);
    let before = std::fs::read(&image).unwrap();
    const INVALID: u32 = (1 << 31) + 3;
    const UNKNOWN: u32 = (1 << 31) + 6;
    const TOO_BIG: u32 = (1 << 31) + 9;

    let mut raw = Raw::connect(dir.path());
    raw.send(&3u32.to_be_bytes());
    // SET before structured replies: refused.
    let set = meta_payload("d0", &["base:allocation"]);
    assert_eq!(raw.option(10, &set).0, INVALID);
    // Structured replies take no data.
    assert_eq!(raw.option(8, b"x").0, INVALID);
    assert_eq!(raw.option(8, &[]).0, 1);
    // A query count that claims more queries than bytes; a truncated payload; an unknown
    // export; a malformed ChangeId in ctk's namespace; an unknown ctk context.
    let mut liar = meta_payload("d0", &[]);
    liar[6..10].copy_from_slice(&1_000_000u32.to_be_bytes());
    assert_eq!(raw.option(10, &liar).0, INVALID);
    assert_eq!(raw.option(10, &set[..set.len() - 3]).0, INVALID);
    assert_eq!(raw.option(10, &meta_payload("nope", &[])).0, UNKNOWN);
    let (code, why) = raw.option(10, &meta_payload("d0", &["ctk:changed:12/x"]));
    assert_eq!(code, INVALID);
    assert!(
        String::from_utf8_lossy(&why).contains("ctk:changed:"),
        "no reason given"
    );
    assert_eq!(
        raw.option(9, &meta_payload("d0", &["ctk:bogus"])).0,
        INVALID
    );
    // Too many contexts at once: base:allocation plus the 8 newest cuts (repeats count once).
    let mut latest = String::new();
    for _ in 0..9 {
        latest = agent.ok(&["cut"])["change_id"]
            .as_str()
            .unwrap()
            .to_string();
    }
    let (generation, seq) = latest.split_once('/').unwrap();
    let seq: u64 = seq.parse().unwrap();
    let mut queries = vec!["base:allocation".to_string(); 2];
    for s in seq - 7..=seq {
        queries.push(format!("ctk:changed:{generation}/{s}"));
        queries.push(format!("ctk:changed:{generation}/{s}"));
    }
    let q: Vec<&str> = queries.iter().map(|s| s.as_str()).collect();
    assert_eq!(raw.option(10, &meta_payload("d0", &q)).0, TOO_BIG);
    // One fewer fits, and every context comes back with its own id.
    let (mut code, mut data) = raw.option(10, &meta_payload("d0", &q[2..]));
    let mut ids = Vec::new();
    while code == 4 {
        ids.push(u32::from_be_bytes(data[0..4].try_into().unwrap()));
        (code, data) = raw.option_reply();
    }
    assert_eq!((code, ids), (1, (1..=8).collect::<Vec<u32>>()));
    drop(raw);

    // Transmission: structured, but no context selected -> BLOCK_STATUS is an error chunk.
    let mut raw = Raw::connect(dir.path());
    raw.send(&3u32.to_be_bytes());
    assert_eq!(raw.option(8, &[]).0, 1);
    let mut go = 2u32.to_be_bytes().to_vec();
    go.extend_from_slice(b"d0");
    go.extend_from_slice(&0u16.to_be_bytes());
    let mut m = 0x4948_4156_454f_5054u64.to_be_bytes().to_vec();
    m.extend_from_slice(&7u32.to_be_bytes());
    m.extend_from_slice(&(go.len() as u32).to_be_bytes());
    m.extend_from_slice(&go);
    raw.send(&m);
    while raw.option_reply().0 != 1 {}
    raw.request(7, 1, 0, 4096, &[]);
    let (flags, kind, cookie, payload) = raw.chunk();
    assert_eq!((flags & 1, kind, cookie), (1, (1 << 15) + 1, 1));
    assert_eq!(&payload[0..4], &22u32.to_be_bytes());
    // A structured read: one data chunk carrying the offset, then the bytes.
    raw.request(0, 2, 4096, 512, &[]);
    let (flags, kind, cookie, payload) = raw.chunk();
    assert_eq!((flags & 1, kind, cookie), (1, 1, 2));
    assert_eq!(&payload[0..8], &4096u64.to_be_bytes());
    assert!(payload[8..].iter().all(|&b| b == 0x33));
    // A read past the end: an error chunk (a simple reply is not allowed for READ).
    raw.request(0, 3, size - 10, 512, &[]);
    let (_, kind, cookie, payload) = raw.chunk();
    assert_eq!((kind, cookie), ((1 << 15) + 1, 3));
    assert_eq!(&payload[0..4], &22u32.to_be_bytes());
    drop(raw);

    // With base:allocation selected: out of range and zero-length queries are refused,
    // REQ_ONE answers one descriptor, and the stream stays in step throughout.
    let mut raw = Raw::connect(dir.path());
    raw.send(&3u32.to_be_bytes());
    assert_eq!(raw.option(8, &[]).0, 1);
    let (code, data) = raw.option(10, &meta_payload("d0", &["base:allocation"]));
    assert_eq!(code, 4);
    assert_eq!(&data[0..4], &1u32.to_be_bytes());
    assert_eq!(raw.option_reply().0, 1);
    raw.send(&m);
    while raw.option_reply().0 != 1 {}
    raw.request(7, 4, size - 100, 4096, &[]);
    assert_eq!(raw.chunk().1, (1 << 15) + 1);
    raw.request(7, 5, 0, 0, &[]);
    assert_eq!(raw.chunk().1, (1 << 15) + 1);
    let mut one = 0x2560_9513u32.to_be_bytes().to_vec();
    one.extend_from_slice(&(1u16 << 3).to_be_bytes());
    one.extend_from_slice(&7u16.to_be_bytes());
    one.extend_from_slice(&6u64.to_be_bytes());
    one.extend_from_slice(&0u64.to_be_bytes());
    one.extend_from_slice(&(size as u32).to_be_bytes());
    raw.send(&one);
    let (flags, kind, cookie, payload) = raw.chunk();
    assert_eq!((flags & 1, kind, cookie, payload.len()), (1, 5, 6, 12));
    raw.request(0, 7, 0, 4096, &[]);
    assert_eq!(raw.chunk().2, 7);
    drop(raw);

    std::thread::sleep(Duration::from_millis(100));
    assert!(
        std::fs::read(&image).unwrap() == before,
        "the image changed"
    );
    qemu_io(&agent.uri("d0"), &["read -P 0x33 0 64k".to_string()]);
    agent.stop();
}

/// Many requests pipelined on one connection: writes into fresh regions (each waits on an
/// intent fsync, so they run on threads of their own and finish out of order) between
/// inline reads and a FLUSH. Every request gets exactly one well-formed reply, matched by
/// cookie, and the data is there afterwards.
#[test]
fn pipelined_requests_are_each_answered_once_in_any_order() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("d0.img");
    let size = 64u64 << 20;
    std::fs::File::create(&image)
        .unwrap()
        .set_len(size)
        .unwrap();
    let agent = Agent::serve(dir.path(), &[("d0", &image)], &[]);
    let mut raw = Raw::go(dir.path(), "d0");
    let mut expect_data = std::collections::HashMap::new();
    let mut cookie = 0u64;
    for i in 0..40u64 {
        cookie += 1;
        // One write per 1 MiB region: every one needs its own intent.
        let at = i * (1 << 20) + 4096 * (i % 7);
        raw.request(1, cookie, at, 4096, &[i as u8 + 1; 4096]);
        expect_data.insert(cookie, 0usize);
        cookie += 1;
        raw.request(0, cookie, 0, 512, &[]);
        expect_data.insert(cookie, 512usize);
    }
    cookie += 1;
    raw.request(3, cookie, 0, 0, &[]);
    expect_data.insert(cookie, 0);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..expect_data.len() {
        let mut head = [0u8; 16];
        raw.s.read_exact(&mut head).unwrap();
        assert_eq!(&head[0..4], &0x6744_6698u32.to_be_bytes());
        assert_eq!(&head[4..8], &0u32.to_be_bytes(), "a request failed");
        let c = u64::from_be_bytes(head[8..16].try_into().unwrap());
        let len = *expect_data
            .get(&c)
            .expect("a reply for a cookie never sent");
        assert!(seen.insert(c), "cookie {c} answered twice");
        let mut data = vec![0u8; len];
        raw.s.read_exact(&mut data).unwrap();
    }
    drop(raw);
    let image_bytes = std::fs::read(&image).unwrap();
    for i in 0..40u64 {
        let at = (i * (1 << 20) + 4096 * (i % 7)) as usize;
        assert!(image_bytes[at..at + 4096].iter().all(|&b| b == i as u8 + 1));
    }
    // And every write is tracked.
    agent.ok(&["cut"]);
    let status = agent.ok(&["status"]);
    assert_eq!(status["disks"][0]["writes"], 40, "{status}");
    agent.stop();
}
