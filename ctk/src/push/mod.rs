//! The agent's push decisions, as functions of values: whether a receiver's resume state
//! can be continued, which blocks a resumed push sends, what a resync sends, and what the
//! receiver's answer to a push lets the agent do. No I/O of their own.
//!
//! The order they are asked in is `Session`, a state machine with no I/O (quinn-proto's
//! contract: `poll` says what to do next, `handle_*` takes what came of it). `ctk-agent`
//! drives it with QUIC requests and its control socket; `ctk-sim` drives the same `Session`
//! with the simulated link and store, so a mistake in the decisions or in their order is
//! within the simulation's reach and not only the real-process tests'.

use std::io::{self, Read, Write};

use roaring::RoaringBitmap;

mod session;

#[cfg(feature = "mutants")]
pub use session::Mutant;
pub use session::{Action, Note, Outcome, Plan, Session};

use crate::delta::{DeltaError, DeltaHeader, DeltaSummary, DeltaWriter, WriteOptions};
use crate::wire::{Refusal, Response, ResumeState};
use crate::{ChangeId, Geometry};

/// Whether the receiver's resume state `state` continues a push this agent can finish: it
/// starts at the receiver's newest point `newest`, is of this disk's size, its cut comes
/// after `newest`, and the agent can still name the changes since that cut (`answerable`
/// says why not when it cannot). Returns the cut-off push's cut, or why the state is not
/// trusted (a state of another disk, generation or size, or a forged one: the push then
/// starts from the beginning; trusting it blindly would lose the blocks it claims were
/// sent).
pub fn judge_resume(
    state: &ResumeState,
    newest: Option<ChangeId>,
    disk_size: u64,
    answerable: impl FnOnce(ChangeId) -> Result<(), String>,
) -> Result<ChangeId, String> {
    let prior = judge_resume_state(state, newest, disk_size)?;
    answerable(state.to).map_err(|why| {
        format!("this agent cannot name the changes since its cut {prior}: {why}")
    })?;
    Ok(prior)
}

/// The checks of `judge_resume` that need nothing but the values: the state's cut if the
/// state fits, before the agent is asked whether it can name the changes since that cut.
pub fn judge_resume_state(
    state: &ResumeState,
    newest: Option<ChangeId>,
    disk_size: u64,
) -> Result<ChangeId, String> {
    if state.from != newest {
        return Err(format!(
            "it starts at {:?}, the receiver's newest point is {newest:?}",
            state.from
        ));
    }
    if state.disk_size != disk_size || state.next_offset == 0 || state.next_offset > disk_size {
        return Err(format!(
            "it is of a {}-byte disk at offset {}; this disk has {disk_size} bytes",
            state.disk_size, state.next_offset
        ));
    }
    let prior = state.to;
    if let Some(n) = newest
        && n.generation == prior.generation
        && prior.seq <= n.seq
    {
        return Err(format!("its cut {prior} is not after {n}"));
    }
    Ok(prior)
}

/// The blocks of a resumed push. `all` are the blocks changed since the push's start (what
/// the cut-off push was sending, grown by the writes since), `later` those changed since the
/// cut-off push's own cut. The receiver holds every record below `next_offset`, so below it
/// only the blocks rewritten since that cut are sent; from it on, everything.
///
/// Returns `(send, kept)`: the blocks to send, and the blocks below `next_offset` the
/// receiver already holds as they are now (read only for their leaves of the image digest).
/// The block holding `next_offset` counts as received when `next_offset` is not on a block
/// boundary: only the disk's short last block can end a record there.
pub fn resume_blocks(
    all: &RoaringBitmap,
    later: &RoaringBitmap,
    next_offset: u64,
    geometry: &Geometry,
) -> (RoaringBitmap, RoaringBitmap) {
    let cut = next_offset
        .div_ceil(geometry.block_size() as u64)
        .min(u32::MAX as u64) as u32;
    let mut send = all.clone();
    send.remove_range(..cut);
    let mut below = later.clone();
    below.remove_range(cut..);
    send |= &below;
    let mut kept = all.clone();
    kept.remove_range(cut..);
    kept -= later;
    (send, kept)
}

/// The delta of a resync: reads the disk of `size` bytes unit by unit (`read_at`, in pieces
/// of at most one delta record, each starting on a block boundary when `unit` is a multiple
/// of the block size) and writes the units whose hash (`digest::unit_hash`) differs from
/// the receiver's. `theirs` gives the receiver's hashes, 32 bytes per unit in disk order; a
/// unit it has no hash for (it ends early: a replica of another size, the last-resort full
/// copy) is sent. Returns the writer, the delta's totals and the bytes of the units sent.
pub fn compare_export<W: Write>(
    mut read_at: impl FnMut(u64, &mut [u8]) -> io::Result<()>,
    size: u64,
    unit: u32,
    mut theirs: impl Read,
    header: &DeltaHeader,
    options: WriteOptions,
    out: W,
) -> Result<(W, DeltaSummary, u64), DeltaError> {
    if unit == 0 {
        return Err(DeltaError::HeaderInvalid("a resync unit of 0 bytes".into()));
    }
    let mut writer = DeltaWriter::new(out, header, options)?;
    let mut buf = vec![0u8; unit as usize];
    let mut differing = 0u64;
    let mut at = 0u64;
    let mut known = true;
    while at < size {
        let n = (size - at).min(unit as u64) as usize;
        for piece in (0..n).step_by(crate::limits::DELTA_RECORD_DATA_MAX) {
            let end = (piece + crate::limits::DELTA_RECORD_DATA_MAX).min(n);
            read_at(at + piece as u64, &mut buf[piece..end])?;
        }
        let mut hash = [0u8; 32];
        if known {
            match theirs.read_exact(&mut hash) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => known = false,
                Err(e) => return Err(e.into()),
            }
        }
        if !known || crate::digest::unit_hash(&buf[..n]) != hash {
            writer.write_extent(at, &buf[..n])?;
            differing += n as u64;
        }
        at += n as u64;
    }
    let (w, summary) = writer.finish()?;
    Ok((w, summary, differing))
}

/// What the receiver's answer to a push lets the agent do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AfterPush {
    /// The pushed cut is committed (durable on the receiver; `already`: before this push):
    /// only now may the agent's cursor and leaves move to it.
    Committed { change_id: ChangeId, already: bool },
    /// The receiver moved on meanwhile (another push of this disk committed first): ask
    /// where it stands and push again.
    Retry(String),
    /// Refused or not understood: the cursor stays where it is.
    Failed(String),
}

/// Reads the receiver's answer to the push of cut `exported_to`. A commit of any other
/// point than the one pushed is a failure, never a reason to move the cursor.
pub fn after_push(answer: &Response, exported_to: ChangeId) -> AfterPush {
    match answer {
        Response::Committed { change_id, already } if *change_id == exported_to => {
            AfterPush::Committed {
                change_id: *change_id,
                already: *already,
            }
        }
        Response::Committed { change_id, .. } => AfterPush::Failed(format!(
            "the receiver committed {change_id}, not the exported {exported_to}"
        )),
        Response::Refused {
            refusal: Refusal::Mismatch,
            message,
        } => AfterPush::Retry(message.clone()),
        Response::Refused { refusal, message } => AfterPush::Failed(format!(
            "the receiver refused the delta ({refusal}): {message}"
        )),
        other => AfterPush::Failed(format!("unexpected answer from the receiver: {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Generation;

    fn id(seq: u64) -> ChangeId {
        ChangeId {
            generation: Generation(7),
            seq,
        }
    }

    fn state(from: Option<ChangeId>, to: ChangeId, size: u64, next: u64) -> ResumeState {
        ResumeState {
            from,
            to,
            disk_size: size,
            next_offset: next,
        }
    }

    #[test]
    fn a_fitting_resume_state_is_continued() {
        let newest = id(3);
        let s = state(Some(id(3)), id(5), 1 << 20, 4096);
        assert_eq!(
            judge_resume(&s, Some(newest), 1 << 20, |_| Ok(())),
            Ok(id(5))
        );
        let first = state(None, id(1), 1 << 20, 4096);
        assert_eq!(judge_resume(&first, None, 1 << 20, |_| Ok(())), Ok(id(1)));
    }

    #[test]
    fn resume_states_that_do_not_fit_are_refused_with_the_reason() {
        let newest = id(3);
        let cases = [
            (state(Some(id(2)), id(5), 1 << 20, 4096), "starts at"),
            (state(None, id(5), 1 << 20, 4096), "starts at"),
            (state(Some(id(3)), id(5), 2 << 20, 4096), "this disk has"),
            (state(Some(id(3)), id(5), 1 << 20, 0), "at offset 0"),
            (state(Some(id(3)), id(5), 1 << 20, 2 << 20), "this disk has"),
            (state(Some(id(3)), id(3), 1 << 20, 4096), "is not after"),
            (state(Some(id(3)), id(2), 1 << 20, 4096), "is not after"),
        ];
        for (s, why) in cases {
            let r = judge_resume(&s, Some(newest), 1 << 20, |_| Ok(()));
            assert!(matches!(&r, Err(e) if e.contains(why)), "{s:?}: {r:?}");
        }
        // Another generation's cut (a forged or stale state) is not after the newest point
        // by sequence, but it does not start there either.
        let forged = state(Some(id(2)), ChangeId::new(Generation(9), 9), 1 << 20, 4096);
        assert!(judge_resume(&forged, Some(newest), 1 << 20, |_| Ok(())).is_err());
        let s = state(Some(id(3)), id(5), 1 << 20, 4096);
        let r = judge_resume(&s, Some(newest), 1 << 20, |_| Err("journal lost".into()));
        assert!(matches!(&r, Err(e) if e.contains("journal lost")), "{r:?}");
    }

    #[test]
    fn a_resumed_push_sends_the_rest_and_what_was_rewritten_below_it() {
        let g = Geometry::new(10 * 4096 - 512, 4096).unwrap();
        let all: RoaringBitmap = [1, 2, 4, 6, 8, 9].into_iter().collect();
        let later: RoaringBitmap = [2, 7].into_iter().collect();
        // Records below block 5 were received.
        let (send, kept) = resume_blocks(&all, &later, 5 * 4096, &g);
        assert_eq!(send.iter().collect::<Vec<_>>(), vec![2, 6, 8, 9]);
        assert_eq!(kept.iter().collect::<Vec<_>>(), vec![1, 4]);
        // Everything received, the short last block included.
        let (send, kept) = resume_blocks(&all, &later, g.disk_size(), &g);
        assert_eq!(send.iter().collect::<Vec<_>>(), vec![2, 7]);
        assert_eq!(kept.iter().collect::<Vec<_>>(), vec![1, 4, 6, 8, 9]);
    }

    #[test]
    fn the_answer_to_a_push_moves_the_cursor_only_to_the_pushed_cut() {
        let to = id(4);
        let committed = |c: ChangeId, already| Response::Committed {
            change_id: c,
            already,
        };
        assert_eq!(
            after_push(&committed(to, true), to),
            AfterPush::Committed {
                change_id: to,
                already: true
            }
        );
        assert!(matches!(
            after_push(&committed(id(3), false), to),
            AfterPush::Failed(_)
        ));
        let refused = |refusal| Response::Refused {
            refusal,
            message: "m".into(),
        };
        assert_eq!(
            after_push(&refused(Refusal::Mismatch), to),
            AfterPush::Retry("m".into())
        );
        for r in [Refusal::Damaged, Refusal::BadRequest, Refusal::Unavailable] {
            assert!(matches!(after_push(&refused(r), to), AfterPush::Failed(_)));
        }
        let other = Response::Resume { state: None };
        assert!(matches!(after_push(&other, to), AfterPush::Failed(_)));
    }

    #[test]
    fn a_resync_sends_the_units_that_differ_and_everything_without_hashes() {
        let size = 5 * 4096 + 100;
        let image: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
        let header = DeltaHeader {
            disk_id: "d".into(),
            disk_size: size as u64,
            block_size: 4096,
            from: Some(id(1)),
            to: id(2),
        };
        let read = |o: u64, b: &mut [u8]| {
            b.copy_from_slice(&image[o as usize..o as usize + b.len()]);
            Ok(())
        };
        let mut theirs = Vec::new();
        for (i, c) in image.chunks(8192).enumerate() {
            let mut c = c.to_vec();
            if i == 1 {
                c[5] ^= 1;
            }
            theirs.extend_from_slice(&crate::digest::unit_hash(&c));
        }
        let opts = WriteOptions { zstd_level: None };
        let (_, _, differing) = compare_export(
            read,
            size as u64,
            8192,
            &theirs[..],
            &header,
            opts,
            Vec::new(),
        )
        .unwrap();
        assert_eq!(differing, 8192);
        // Only the first unit's hash: the rest is sent, the short last unit included.
        let (_, _, differing) = compare_export(
            read,
            size as u64,
            8192,
            &theirs[..32],
            &header,
            opts,
            Vec::new(),
        )
        .unwrap();
        assert_eq!(differing, size as u64 - 8192);
    }
}
