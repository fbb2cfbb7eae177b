//! A failback pass streamed into the running agent over its control socket (the `apply`
//! step with the delta after the request line): a delta cut short, or with a damaged
//! record, is refused and not recorded, so the pass is done again; a whole one is written
//! and recorded; and the agent goes on serving others meanwhile.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;

use common::{Agent, disk_image};
use ctk::delta::{DeltaHeader, DeltaWriter, WriteOptions};
use ctk::{ChangeId, Generation};

const MIB: u64 = 1 << 20;

/// A delta for a `size`-byte disk: 64 KiB of `0xA5` at 1 MiB and 64 KiB of `0x5A` at
/// 3 MiB, uncompressed (so a flipped byte lands in data, not in a compressed frame).
fn delta(size: u64) -> Vec<u8> {
    let header = DeltaHeader {
        disk_id: "dr".into(),
        disk_size: size,
        block_size: 4096,
        from: Some(ChangeId::new(Generation(7), 3)),
        to: ChangeId::new(Generation(8), 5),
    };
    let options = WriteOptions { zstd_level: None };
    let mut w = DeltaWriter::new(Vec::new(), &header, options).unwrap();
    w.write_extent(MIB, &[0xA5; 65536]).unwrap();
    w.write_extent(3 * MIB, &[0x5A; 65536]).unwrap();
    w.finish().unwrap().0
}

/// An `apply` with `body` after it, the writing half closed; the answer, and whether the
/// agent closed the connection after it.
fn apply(agent: &Agent, body: &[u8]) -> (serde_json::Value, bool) {
    let point = ChangeId::new(Generation(7), 3);
    let upto = ChangeId::new(Generation(8), 5);
    let mut s = UnixStream::connect(&agent.control).unwrap();
    let line = format!(
        r#"{{"cmd":"failback","disk":"d","step":"apply","point":"{point}","upto":"{upto}"}}"#
    );
    writeln!(s, "{line}").unwrap();
    // The agent may stop reading early (a damaged record): its answer still comes.
    let _ = s.write_all(body);
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut reader = BufReader::new(&s);
    let mut answer = String::new();
    reader.read_line(&mut answer).unwrap();
    let mut rest = Vec::new();
    // Closed with part of the body unread, the socket is reset rather than ended.
    let closed = match reader.read_to_end(&mut rest) {
        Ok(n) => n == 0,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    };
    (serde_json::from_str(&answer).unwrap(), closed)
}

fn passes(agent: &Agent) -> u64 {
    let status = agent.call(r#"{"cmd":"status"}"#);
    status["disks"][0]["failback"]["passes"].as_u64().unwrap()
}

#[test]
fn a_pass_cut_short_or_damaged_is_refused_unrecorded_and_a_whole_one_is_applied() {
    let dir = tempfile::tempdir().unwrap();
    let image = disk_image(dir.path(), "d", 8);
    let agent = Agent::serve(dir.path(), &[("d", &image)], &[]);
    let size = 8 * MIB;
    let whole = delta(size);

    // Without a failback under way there is nothing to apply to.
    let (answer, closed) = apply(&agent, &whole);
    assert_eq!(answer["ok"], false, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("no failback"));
    assert!(closed, "the connection ends with an apply's answer");

    let begun = agent.call(r#"{"cmd":"failback","disk":"d","step":"begin"}"#);
    assert_eq!(begun["ok"], true, "{begun}");
    assert_eq!(passes(&agent), 0);

    // Cut short (the receiver's stream broke mid-pass): refused, not recorded.
    for cut in [10, whole.len() / 2, whole.len() - 1] {
        let (answer, closed) = apply(&agent, &whole[..cut]);
        assert_eq!(answer["ok"], false, "cut at {cut}: {answer}");
        assert!(closed);
        assert_eq!(passes(&agent), 0, "a pass cut at {cut} was recorded");
    }

    // A flipped byte in the second record's data: its checksum fails, nothing recorded,
    // and that record is not written.
    let mut damaged = whole.clone();
    let at = damaged
        .windows(4096)
        .rposition(|w| w.iter().all(|&b| b == 0x5A))
        .unwrap();
    damaged[at + 100] ^= 0xFF;
    let (answer, _) = apply(&agent, &damaged);
    assert_eq!(answer["ok"], false, "{answer}");
    assert_eq!(passes(&agent), 0);
    let disk = std::fs::read(&image).unwrap();
    assert!(disk[3 * MIB as usize..][..65536].iter().all(|&b| b == 0));

    // Bytes after a whole delta are not part of it: refused too.
    let mut longer = whole.clone();
    longer.extend_from_slice(b"more");
    let (answer, _) = apply(&agent, &longer);
    assert_eq!(answer["ok"], false, "{answer}");
    assert_eq!(passes(&agent), 0);

    // The whole pass: written, synced and recorded; the agent answers others meanwhile.
    let (answer, closed) = apply(&agent, &whole);
    assert_eq!(answer["ok"], true, "{answer}");
    assert!(closed);
    assert_eq!(answer["state"]["passes"], 1);
    assert_eq!(
        answer["state"]["applied_upto"],
        ChangeId::new(Generation(8), 5).to_string()
    );
    assert_eq!(passes(&agent), 1);
    let disk = std::fs::read(&image).unwrap();
    assert!(disk[MIB as usize..][..65536].iter().all(|&b| b == 0xA5));
    assert!(disk[3 * MIB as usize..][..65536].iter().all(|&b| b == 0x5A));
    assert!(disk[..MIB as usize].iter().all(|&b| b == 0));
    // The writes went through the tracker: the disk's changes name them.
    let status = agent.call(r#"{"cmd":"status"}"#);
    assert!(status["disks"][0]["open_epoch_blocks"].as_u64().unwrap() >= 32);
}
