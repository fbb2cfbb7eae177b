//! Pushes spread over several QUIC streams (`Request::PushLanes`), driven by hand over real
//! QUIC on 127.0.0.1 against a real `ctk-receiver serve`: deltas dealt over 3 and 5 lanes
//! commit and restore byte for byte; lanes that are missing, misnumbered, out of turn or
//! longer than the delta are refused with a reason, nothing is committed, and the receiver
//! keeps serving. (The agent's own multi-lane pushes run in every replication test: 4
//! streams is its default.)

mod common;

use std::path::Path;

use common::*;
use ctk::delta::{self, DeltaHeader, WriteOptions};
use ctk::digest::Leaves;
use ctk::{ChangeId, Extent, Generation};
use ctk_net::wire::{Consistency, Lane, PushEnd, Refusal, Request, Response};
use ctk_net::{Fingerprint, Identity};

const SIZE: u64 = 8 << 20;

fn id(seq: u64) -> ChangeId {
    ChangeId {
        generation: Generation(0x5eed),
        seq,
    }
}

/// The delta of `extents` of `image`, from `from` to `to`.
fn delta_of(image: &[u8], extents: &[Extent], from: Option<ChangeId>, to: ChangeId) -> Vec<u8> {
    let header = DeltaHeader {
        disk_id: "vm1".into(),
        disk_size: SIZE,
        block_size: 4096,
        from,
        to,
    };
    let read = |o: u64, b: &mut [u8]| {
        b.copy_from_slice(&image[o as usize..o as usize + b.len()]);
        Ok(())
    };
    let opts = WriteOptions {
        zstd_level: Some(1),
    };
    delta::export_with(read, extents, &header, opts, Vec::new())
        .unwrap()
        .0
}

fn end_of(image: &[u8]) -> Vec<u8> {
    let mut leaves = Leaves::zeroed(SIZE, 4096).unwrap();
    leaves.set_data(0, image).unwrap();
    PushEnd {
        cut_unix_ms: 1_795_000_000_000,
        consistency: Consistency::Crash,
        image_digest: Some(leaves.digest().0),
    }
    .encode()
}

/// Each lane's bytes: chunk `i` of `delta` (of `chunk` bytes) on lane `i % lanes`, then a
/// zero length on every lane.
fn deal(delta: &[u8], lanes: usize, chunk: usize) -> Vec<Vec<u8>> {
    let mut out = vec![Vec::new(); lanes];
    for (i, c) in delta.chunks(chunk).enumerate() {
        out[i % lanes].extend_from_slice(&(c.len() as u32).to_le_bytes());
        out[i % lanes].extend_from_slice(c);
    }
    for lane in &mut out {
        lane.extend_from_slice(&0u32.to_le_bytes());
    }
    out
}

/// One push as a (possibly misbehaving) agent sends it: `request` and `bodies[0]` (then the
/// end frame `end`) on a bidirectional stream, and each `(frame, body)` of `extra` on a
/// unidirectional stream of its own. Returns the receiver's answer.
fn push(
    rt: &tokio::runtime::Runtime,
    conn: &quinn::Connection,
    request: Request,
    lane0: &[u8],
    extra: &[(Vec<u8>, Vec<u8>)],
    end: &[u8],
) -> Response {
    rt.block_on(async {
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        ctk_net::write_frame(&mut send, &request.encode())
            .await
            .unwrap();
        let mut lanes = Vec::new();
        for (frame, _) in extra {
            let mut lane = conn.open_uni().await.unwrap();
            ctk_net::write_frame(&mut lane, frame).await.unwrap();
            lanes.push(lane);
        }
        // Lanes written concurrently, as flow control needs (the receiver reads them in
        // turn), and the answer read meanwhile: a refusal may come before all is written.
        let mut writers = Vec::new();
        for (mut lane, (_, body)) in lanes.into_iter().zip(extra) {
            let body = body.clone();
            writers.push(tokio::spawn(async move {
                let _ = lane.write_all(&body).await;
                let _ = lane.finish();
            }));
        }
        let (lane0, end) = (lane0.to_vec(), end.to_vec());
        let main = tokio::spawn(async move {
            let _ = send.write_all(&lane0).await;
            let _ = ctk_net::write_frame(&mut send, &end).await;
            let _ = send.finish();
        });
        let answer = ctk_net::read_frame(&mut recv).await.unwrap();
        let _ = main.await;
        for w in writers {
            let _ = w.await;
        }
        Response::decode(&answer).unwrap()
    })
}

fn lanes_request(lanes: u8) -> Request {
    Request::PushLanes {
        disk: "vm1".into(),
        lanes,
        resumes: None,
        next_offset: 0,
    }
}

fn lane(push: u64, index: u8) -> Vec<u8> {
    Lane { push, index }.encode()
}

fn refused(r: Response, want: Refusal, says: &str) {
    match r {
        Response::Refused { refusal, message } => {
            assert_eq!(refusal, want, "{message}");
            assert!(message.contains(says), "{message:?} should say {says:?}");
        }
        other => panic!("expected a refusal ({says}), got {other:?}"),
    }
}

/// One piece: the good pushes and the broken ones go to one receiver and one store, and each
/// broken one must leave the store as the good ones before it left it.
#[test]
fn pushes_over_several_lanes_commit_and_broken_lanes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let receiver_bin = Path::new(env!("CARGO_BIN_EXE_ctk-receiver"));
    let rfp = init(receiver_bin, &d.join("rid"));
    let agent = Identity::generate("host1").unwrap();
    let (_receiver, addr) = start_receiver(receiver_bin, d, &agent.fingerprint().to_string());
    let pin: Fingerprint = rfp.parse().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let conn = rt.block_on(ctk_net::connect(&agent, addr, pin)).unwrap();
    // Bidirectional stream ids of the client: 0, 4, 8, ... (QUIC numbers them so); a
    // push's lanes name the stream its request is on. `present`: the lanes opened.
    let mut next_bi = 0u64;
    let mut send = |bodies: &[Vec<u8>], present: &[u8], count: u8, image: &[u8]| {
        let p = next_bi;
        next_bi += 4;
        let extra: Vec<_> = present
            .iter()
            .map(|&i| (lane(p, i), bodies[i as usize].clone()))
            .collect();
        push(
            &rt,
            &conn,
            lanes_request(count),
            &bodies[0],
            &extra,
            &end_of(image),
        )
    };

    let mut image = vec![0u8; SIZE as usize];
    let mut rng = Rng(7);
    for (i, b) in image.iter_mut().enumerate().take(6 << 20) {
        *b = if i % 3 == 0 {
            rng.next() as u8
        } else {
            (i / 4096) as u8
        };
    }
    let full = delta_of(&image, &[Extent::new(0, SIZE)], None, id(1));
    assert!(full.len() > 3 * 65536, "a delta of many chunks");

    // Out of turn: every chunk on lane 0, the other lanes empty. The receiver reads chunk 1
    // from lane 1, finds its end there: the delta is cut short.
    let mut bodies = deal(&full, 1, 65536);
    bodies.push(0u32.to_le_bytes().to_vec());
    bodies.push(0u32.to_le_bytes().to_vec());
    let r = send(&bodies, &[1, 2], 3, &image);
    refused(r, Refusal::Damaged, "truncated");

    // Lane 2 never comes: refused after the wait, with which lane was missing.
    let r = send(&deal(&full, 3, 65536), &[1], 3, &image);
    refused(r, Refusal::BadRequest, "lane 2 of 3 did not arrive");
    // A lane numbered 0 and a lane frame that does not decode: refused on arrival, they
    // change nothing.
    rt.block_on(async {
        for frame in [lane(0, 0), vec![0, 0]] {
            let mut bad = conn.open_uni().await.unwrap();
            let _ = ctk_net::write_frame(&mut bad, &frame).await;
            let _ = bad.finish();
        }
    });

    // Lane counts out of range.
    for lanes in [0u8, 17, 255] {
        let r = send(&[0u32.to_le_bytes().to_vec()], &[], lanes, &image);
        refused(r, Refusal::BadRequest, "lanes");
    }

    // A lane that goes on after the delta ended.
    let mut bodies = deal(&full, 3, 65536);
    for body in &mut bodies[1..] {
        body.truncate(body.len() - 4);
        body.extend_from_slice(&4u32.to_le_bytes());
        body.extend_from_slice(b"more");
        body.extend_from_slice(&0u32.to_le_bytes());
    }
    let r = send(&bodies, &[1, 2], 3, &image);
    // Which check sees it first depends on where the trailer fell: the lanes ("lane N goes
    // on past the delta's trailer") or the store ("bytes after the delta's trailer").
    match r {
        Response::Refused { message, .. } => assert!(
            message.contains("the delta's trailer"),
            "a lane longer than the delta: {message:?}"
        ),
        other => panic!("a lane longer than the delta was not refused: {other:?}"),
    }

    // Nothing of the above was committed.
    let store = d.join("store/host1");
    let held: usize = points(receiver_bin, &store)
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["points"].as_array().map_or(0, |p| p.len()))
        .sum();
    assert_eq!(held, 0, "a refused push committed something");

    // A first full over 3 lanes (lane frames sent before or after the request: here the
    // streams open in order, and the receiver parks whichever comes first).
    let r = send(&deal(&full, 3, 65536), &[2, 1], 3, &image);
    assert_eq!(
        r,
        Response::Committed {
            change_id: id(1),
            already: false
        }
    );

    // A delta over 5 lanes, in chunks of odd sizes.
    let mut extents = Vec::new();
    for k in 0..40u64 {
        let at = (rng.next() % (SIZE / 4096 - 16)) * 4096;
        let len = 4096 * (1 + k % 16);
        for b in &mut image[at as usize..(at + len) as usize] {
            *b = rng.next() as u8;
        }
        extents.push(Extent::new(at, len));
    }
    extents.sort_by_key(|e| e.offset);
    let mut merged: Vec<Extent> = Vec::new();
    for e in extents {
        match merged.last_mut() {
            Some(l) if e.offset <= l.end() => l.length = l.end().max(e.end()) - l.offset,
            _ => merged.push(e),
        }
    }
    let delta = delta_of(&image, &merged, Some(id(1)), id(2));
    let r = send(&deal(&delta, 5, 12_345), &[1, 2, 3, 4], 5, &image);
    assert_eq!(
        r,
        Response::Committed {
            change_id: id(2),
            already: false
        }
    );
    let restored = restore(
        receiver_bin,
        &store,
        "vm1",
        &id(2).to_string(),
        &d.join("r.img"),
    );
    assert!(
        restored == image,
        "the point pushed over 5 lanes restores to the image"
    );

    // And the connection, and the receiver, still answer.
    let newest = rt.block_on(async {
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        let req = Request::Newest { disk: "vm1".into() }.encode();
        ctk_net::write_frame(&mut send, &req).await.unwrap();
        send.finish().unwrap();
        Response::decode(&ctk_net::read_frame(&mut recv).await.unwrap()).unwrap()
    });
    assert_eq!(
        newest,
        Response::Newest {
            change_id: Some(id(2))
        }
    );
}
