//! The messages an agent and a receiver exchange, and their encoding: bincode 2 with
//! fixed-width little-endian integers, decoded under a size limit. This is the only module
//! that knows the encoding, so the codec can be swapped.
//!
//! One request per QUIC bidirectional stream: the agent writes one framed `Request`, then
//! finishes its side; the receiver answers with one framed `Response`. A frame is a `u32`
//! little-endian length and that many bytes; no frame may exceed [`FRAME_MAX`].
//!
//! A `Push` is followed by the delta as it is produced (the agent does not know its length
//! in advance: it streams the export): chunks, each a `u32` little-endian length of 1 to
//! [`CHUNK_MAX`] and that many bytes, ended by a zero length; then one framed [`PushEnd`]
//! with what is only known once the export is done (the cut's time and consistency, the
//! image digest).

use crate::id::{ChangeId, GroupCutId};
use bincode::{Decode, Encode};

/// Protocol name and version, offered as the TLS ALPN: a peer speaking another version fails
/// the handshake before any disk data moves.
pub const ALPN: &[u8] = b"ctk/2";
/// Largest frame (a request or a response; delta bytes are not framed).
pub const FRAME_MAX: usize = 64 * 1024;
/// Longest string in a message (names, ChangeIds, error text).
pub const STRING_MAX: usize = 4096;

#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub enum Request {
    /// Which point is the newest committed for this disk (none before the first full)?
    Newest { disk: String },
    /// Merge the delta that follows (chunks, then a [`PushEnd`]) into this disk's replica.
    Push { disk: String },
    /// A strong hash of each `unit` bytes of the disk's newest point, for a resync that
    /// sends only what differs. Answered by `Response::Digests`, then the hashes (32 bytes
    /// each, in disk order) in chunks like a push's, ended by a zero length.
    Digests { disk: String, unit: u32 },
    /// What the receiver kept of a push to `disk` that was cut off, if anything (answered
    /// once any push of the disk still running has ended).
    Resume { disk: String },
    /// A push that resumes the cut-off push of cut `resumes` from disk offset `next_offset`,
    /// as `Resume` reported them: chunks and a `PushEnd` follow, as after `Push`.
    PushResume {
        disk: String,
        resumes: ChangeId,
        next_offset: u64,
    },
    /// A push (`resumes: None`) or a resumed push, its delta spread over `lanes` streams:
    /// chunk `i` (counting from 0) goes on lane `i % lanes`. Lane 0 is this stream; lanes 1
    /// and up are unidirectional streams the agent opens, each starting with a [`Lane`]
    /// frame. Every lane ends with a zero length after the delta's last chunk, and the
    /// [`PushEnd`] follows on lane 0. One stream's flow-control window caps what it carries
    /// per round trip; several lanes carry that much each on a long link.
    PushLanes {
        disk: String,
        lanes: u8,
        resumes: Option<ChangeId>,
        next_offset: u64,
    },
    /// Failback, one pass (the disk is failed over): the blocks the DR disk holds that the
    /// agent's disk may not, as a delta read from the DR disk. `since: None` (the first
    /// pass): every block the failover's overlay wrote, every block that differs between
    /// the failover's point and the newest point, and what `known` names; `Some(cut)`: what
    /// the overlay wrote since its cut `cut` (a pass's `upto`). After this frame the agent
    /// sends what `known` says as chunks ended by a zero length. `final_pass`: the DR export
    /// is stopped and the overlay cut first, so nothing changes after this pass. Answered by
    /// [`Response::FailbackPass`] and the delta's bytes as chunks ended by a zero length.
    /// Added after the push requests: their encoding is unchanged.
    FailbackPull {
        disk: String,
        since: Option<ChangeId>,
        known: Known,
        final_pass: bool,
    },
    /// Failback's cutover, after a final pass as of overlay cut `upto` was applied and the
    /// agent cut its disk as `point`: commit the DR disk as point `point` (a merge like any
    /// other), lift the fence and discard the overlay. Answered by
    /// [`Response::FailbackCommitted`]; asked again after a crash, it finishes what is left.
    FailbackCommit {
        disk: String,
        upto: ChangeId,
        point: ChangeId,
        cut_unix_ms: u64,
    },
    /// A consistency group's cut `group_cut` is committed on every member: each `(disk,
    /// point)` a point the receiver has committed (pushed as usual, one push per member).
    /// Record them as one group point of `group`, the group's commit: a group point exists
    /// only once this is answered. Answered by [`Response::GroupCommitted`]; asked again,
    /// it is answered `already`. Added after the failback requests (variant 8).
    GroupCommit {
        group: String,
        group_cut: GroupCutId,
        cut_unix_ms: u64,
        consistency: Consistency,
        members: Vec<(String, ChangeId)>,
    },
}

/// Most members a consistency group may have.
pub const GROUP_MEMBERS_MAX: usize = 64;

/// What the agent knows of its own disk for a first failback pass, sent after the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub enum Known {
    /// The byte ranges written since the receiver's newest point: `count` (offset, length)
    /// pairs of `u64` little-endian (none after the first pass).
    Extents { count: u64 },
    /// Nothing of its history (journal lost, a new disk): the hash
    /// ([`crate::digest::unit_hash`], 32 bytes) of each `unit` bytes of its disk, `count` of
    /// them in disk order; the receiver sends every unit whose DR bytes hash otherwise.
    UnitHashes { unit: u32, count: u64 },
}

/// Most (offset, length) pairs a failback request may carry (16 bytes each).
pub const KNOWN_EXTENTS_MAX: u64 = 1 << 22;

/// Most lanes one push may use.
pub const LANES_MAX: u8 = 16;

/// The first frame of a push's extra lane: which push (the index of the request's stream,
/// `quinn::StreamId`'s `u64`) and which lane of it (1 to `lanes - 1`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub struct Lane {
    pub push: u64,
    pub index: u8,
}

impl Lane {
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Lane, WireError> {
        let lane: Lane = decode(bytes)?;
        if lane.index == 0 || lane.index >= LANES_MAX {
            return Err(WireError::Malformed(format!(
                "lane {} (lanes 1 to {} open streams of their own)",
                lane.index,
                LANES_MAX - 1
            )));
        }
        Ok(lane)
    }
}

/// Longest chunk of a pushed delta.
pub const CHUNK_MAX: usize = 1 << 20;

/// The end of a push: the restore point was cut at `cut_unix_ms` with this consistency
/// level, and `image_digest` is the agent's digest of the whole image as of the cut
/// (`ctk::digest`): the receiver refuses to commit a merged image that does not match it.
/// `None` when the agent does not know it (its leaves were lost, or the disk changed size);
/// the point is then recorded as unchecked.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct PushEnd {
    pub cut_unix_ms: u64,
    pub consistency: Consistency,
    pub image_digest: Option<[u8; 32]>,
}

impl PushEnd {
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }

    pub fn decode(bytes: &[u8]) -> Result<PushEnd, WireError> {
        decode(bytes)
    }
}

/// How consistent a cut is: every acknowledged write in (crash), or applications quiesced
/// and filesystems frozen first (application).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub enum Consistency {
    Crash,
    Application,
}

impl Consistency {
    pub fn as_str(self) -> &'static str {
        match self {
            Consistency::Crash => "crash",
            Consistency::Application => "application",
        }
    }
}

impl std::fmt::Display for Consistency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Consistency {
    type Err = String;
    fn from_str(s: &str) -> Result<Consistency, String> {
        match s {
            "crash" => Ok(Consistency::Crash),
            "application" => Ok(Consistency::Application),
            other => Err(format!("consistency {other:?}: use crash or application")),
        }
    }
}

/// In JSON, `"crash"` or `"application"`.
impl serde::Serialize for Consistency {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for Consistency {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Consistency, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Why a request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub enum Refusal {
    /// The request itself is malformed or names something invalid.
    BadRequest,
    /// The delta does not continue the replica (out of order, another disk, a second full).
    Mismatch,
    /// The delta is damaged (a CRC, the trailer, a length).
    Damaged,
    /// The receiver could not store it (disk full, I/O error); nothing committed changed.
    Unavailable,
    /// The disk was failed over at the DR site (`ctk-receiver failover`): its replica is the
    /// recovered VM's disk now, and no push commits until failback. Not a reason to retry
    /// soon, and never a commit. Added last, so the other variants keep their encoding.
    FailedOver,
    /// Failback was asked for a disk that is not failed over (never, or no longer: failed
    /// back already, or rolled back at the DR site). Variant 5.
    NotFailedOver,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refusal::BadRequest => "the request is invalid",
            Refusal::Mismatch => "the delta does not continue the replica",
            Refusal::Damaged => "the delta arrived damaged",
            Refusal::Unavailable => "the receiver could not store it",
            Refusal::FailedOver => "the disk is failed over at the DR site",
            Refusal::NotFailedOver => "the disk is not failed over at the DR site",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub enum Response {
    Newest {
        change_id: Option<ChangeId>,
    },
    /// The point is committed (durable). `already`: it was before this push.
    Committed {
        change_id: ChangeId,
        already: bool,
    },
    Refused {
        refusal: Refusal,
        message: String,
    },
    /// The answer to `Resume`: none, or the cut-off push's start point (none: a first
    /// full), cut, disk size, and the disk offset below which all its records were received.
    Resume {
        state: Option<ResumeState>,
    },
    /// The hashes of point `change_id` (a disk of `disk_size` bytes) follow: `count` of
    /// them, one per `unit` bytes (the last unit may be short).
    Digests {
        change_id: ChangeId,
        disk_size: u64,
        unit: u32,
        count: u64,
    },
    /// The answer to `FailbackPull`: the failover's point, the newest committed point, the
    /// overlay's cut the pass is complete as of (the next pass's `since`), and the delta
    /// that follows: `blocks` 4 KiB blocks. `bytes`: the delta's length when known ahead,
    /// else 0 (a receiver streams the delta as it reads it, so it sends 0); its chunks end
    /// with a zero length either way.
    FailbackPass {
        point: ChangeId,
        newest: ChangeId,
        upto: ChangeId,
        disk_size: u64,
        blocks: u64,
        bytes: u64,
    },
    /// The DR disk is committed as `change_id` (`already`: by an earlier request), with the
    /// receiver's digest of the whole image; the fence is lifted.
    FailbackCommitted {
        change_id: ChangeId,
        image_digest: Option<[u8; 32]>,
        already: bool,
    },
    /// The group point is recorded (durable); `already`: it was before this request.
    GroupCommitted {
        already: bool,
    },
}

/// A frame that could not be decoded.
/// What a receiver kept of a cut-off push (see `Response::Resume`).
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct ResumeState {
    pub from: Option<ChangeId>,
    pub to: ChangeId,
    pub disk_size: u64,
    pub next_offset: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("frame of {0} bytes exceeds the {FRAME_MAX}-byte limit")]
    TooLarge(usize),
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("a string in the frame is longer than {STRING_MAX} bytes")]
    StringTooLong,
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard()
        .with_little_endian()
        .with_fixed_int_encoding()
        .with_limit::<FRAME_MAX>()
}

/// One sentence for a decoding failure (bincode's own text is its Debug form).
fn describe(e: &bincode::error::DecodeError) -> String {
    use bincode::error::DecodeError as E;
    match e {
        E::UnexpectedVariant {
            type_name, found, ..
        } => {
            let name = type_name.rsplit("::").next().unwrap_or(type_name);
            format!("unknown {name} kind {found} (is the peer a newer version?)")
        }
        E::UnexpectedEnd { .. } => "the frame ends before its message does".into(),
        E::LimitExceeded => format!("a length in the frame is over the {FRAME_MAX}-byte limit"),
        E::Utf8 { .. } => "a string in the frame is not UTF-8".into(),
        other => other.to_string(),
    }
}

fn encode<T: Encode>(value: &T) -> Vec<u8> {
    bincode::encode_to_vec(value, config()).expect("messages of bounded size encode")
}

fn decode<T: Decode<()>>(bytes: &[u8]) -> Result<T, WireError> {
    if bytes.len() > FRAME_MAX {
        return Err(WireError::TooLarge(bytes.len()));
    }
    let (value, used) = bincode::decode_from_slice::<T, _>(bytes, config())
        .map_err(|e| WireError::Malformed(describe(&e)))?;
    if used != bytes.len() {
        return Err(WireError::Malformed("bytes after the message".into()));
    }
    Ok(value)
}

fn check(strings: &[&str]) -> Result<(), WireError> {
    if strings.iter().any(|s| s.len() > STRING_MAX) {
        return Err(WireError::StringTooLong);
    }
    Ok(())
}

impl Request {
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Request, WireError> {
        let r: Request = decode(bytes)?;
        match &r {
            Request::Newest { disk }
            | Request::Push { disk }
            | Request::Digests { disk, .. }
            | Request::Resume { disk } => check(&[disk])?,
            Request::PushResume { disk, .. }
            | Request::PushLanes { disk, .. }
            | Request::FailbackPull { disk, .. }
            | Request::FailbackCommit { disk, .. } => check(&[disk])?,
            Request::GroupCommit { group, members, .. } => {
                if members.len() > GROUP_MEMBERS_MAX {
                    return Err(WireError::Malformed(format!(
                        "{} members (a group has at most {GROUP_MEMBERS_MAX})",
                        members.len()
                    )));
                }
                check(&[group])?;
                for (disk, _) in members {
                    check(&[disk])?;
                }
            }
        }
        Ok(r)
    }
}

impl Response {
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Response, WireError> {
        let r: Response = decode(bytes)?;
        match &r {
            // ChangeIds are checked by their own decoding (a text that parses).
            Response::Newest { .. }
            | Response::Committed { .. }
            | Response::Digests { .. }
            | Response::Resume { .. }
            | Response::FailbackPass { .. }
            | Response::FailbackCommitted { .. }
            | Response::GroupCommitted { .. } => {}
            Response::Refused { message, .. } => check(&[message])?,
        }
        Ok(r)
    }

    /// A refusal, with the message cut to the string limit.
    pub fn refused(refusal: Refusal, message: impl Into<String>) -> Response {
        let mut message = message.into();
        if message.len() > STRING_MAX {
            let mut cut = STRING_MAX;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        Response::Refused { refusal, message }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::Generation;

    fn id(seq: u64) -> ChangeId {
        ChangeId::new(Generation(0xab), seq)
    }

    /// A ChangeId crosses the wire as its text, byte for byte what the messages carried when
    /// the field was a string (older peers read it unchanged); a text that is no ChangeId
    /// fails the frame with a sentence.
    #[test]
    fn change_ids_travel_as_their_text_and_garbage_is_refused() {
        #[derive(Encode)]
        enum OldResponse {
            Newest { change_id: Option<String> },
        }
        let typed = Response::Newest {
            change_id: Some(id(7)),
        }
        .encode();
        let old = encode(&OldResponse::Newest {
            change_id: Some(id(7).to_string()),
        });
        assert_eq!(typed, old);
        let garbage = encode(&OldResponse::Newest {
            change_id: Some("not-a-change-id".into()),
        });
        let e = Response::decode(&garbage).unwrap_err().to_string();
        assert!(
            e.contains("not-a-change-id") || e.contains("ChangeId"),
            "{e}"
        );
    }

    #[test]
    fn messages_round_trip() {
        let msgs = [
            Request::Newest { disk: "vm1".into() },
            Request::Push { disk: "vm1".into() },
            Request::Digests {
                disk: "vm1".into(),
                unit: 65536,
            },
            Request::Resume { disk: "vm1".into() },
            Request::PushResume {
                disk: "vm1".into(),
                resumes: id(2),
                next_offset: 1 << 20,
            },
            Request::PushLanes {
                disk: "vm1".into(),
                lanes: 4,
                resumes: Some(id(2)),
                next_offset: 1 << 20,
            },
            Request::FailbackPull {
                disk: "vm1".into(),
                since: None,
                known: Known::UnitHashes {
                    unit: 1 << 20,
                    count: 4096,
                },
                final_pass: false,
            },
            Request::FailbackPull {
                disk: "vm1".into(),
                since: Some(id(4)),
                known: Known::Extents { count: 3 },
                final_pass: true,
            },
            Request::FailbackCommit {
                disk: "vm1".into(),
                upto: id(5),
                point: id(9),
                cut_unix_ms: 1_795_000_000_000,
            },
        ];
        for m in msgs {
            assert_eq!(Request::decode(&m.encode()).unwrap(), m);
        }
        let lane = Lane { push: 8, index: 3 };
        assert_eq!(Lane::decode(&lane.encode()).unwrap(), lane);
        for index in [0, LANES_MAX, 255] {
            let bad = Lane { push: 8, index }.encode();
            assert!(Lane::decode(&bad).is_err(), "lane {index}");
        }
        for end in [
            PushEnd {
                cut_unix_ms: 1_795_000_000_000,
                consistency: Consistency::Application,
                image_digest: Some([0xab; 32]),
            },
            PushEnd {
                cut_unix_ms: 0,
                consistency: Consistency::Crash,
                image_digest: None,
            },
        ] {
            assert_eq!(PushEnd::decode(&end.encode()).unwrap(), end);
        }
        let r = Response::Digests {
            change_id: id(1),
            disk_size: 1 << 30,
            unit: 65536,
            count: 16384,
        };
        assert_eq!(Response::decode(&r.encode()).unwrap(), r);
        for state in [
            None,
            Some(ResumeState {
                from: Some(id(1)),
                to: id(2),
                disk_size: 1 << 30,
                next_offset: 1 << 20,
            }),
        ] {
            let r = Response::Resume { state };
            assert_eq!(Response::decode(&r.encode()).unwrap(), r);
        }
        for r in [
            Response::FailbackPass {
                point: id(1),
                newest: id(2),
                upto: id(3),
                disk_size: 1 << 30,
                blocks: 77,
                bytes: 1 << 22,
            },
            Response::FailbackCommitted {
                change_id: id(9),
                image_digest: Some([7; 32]),
                already: false,
            },
        ] {
            assert_eq!(Response::decode(&r.encode()).unwrap(), r);
        }
        let r = Response::refused(Refusal::Mismatch, "x".repeat(10_000));
        let back = Response::decode(&r.encode()).unwrap();
        assert!(
            matches!(back, Response::Refused { ref message, .. } if message.len() == STRING_MAX)
        );
    }

    #[test]
    fn hostile_frames_are_refused_without_big_allocations() {
        // A string length claiming 2^60 bytes: refused by the limit, not allocated.
        let mut bad = Request::Newest { disk: "a".into() }.encode();
        let at = bad.len() - 1 - 8;
        bad[at..at + 8].copy_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(Request::decode(&bad).is_err());
        // Unknown variant, truncation anywhere, trailing bytes, oversize, empty.
        let good = Request::Push { disk: "vm1".into() }.encode();
        let mut unknown = good.clone();
        unknown[0] = 77;
        assert!(Request::decode(&unknown).is_err());
        for cut in 0..good.len() {
            assert!(Request::decode(&good[..cut]).is_err());
        }
        let mut long = good.clone();
        long.push(0);
        assert!(Request::decode(&long).is_err());
        assert!(Request::decode(&vec![0u8; FRAME_MAX + 1]).is_err());
        // A name over the string limit inside a frame that fits.
        let big = Request::Newest {
            disk: "n".repeat(STRING_MAX + 1),
        }
        .encode();
        assert!(matches!(
            Request::decode(&big),
            Err(WireError::StringTooLong)
        ));
    }

    #[test]
    fn group_commits_round_trip_and_oversized_ones_are_refused() {
        let request = |members: usize| Request::GroupCommit {
            group: "erp".into(),
            group_cut: GroupCutId(0x1234),
            cut_unix_ms: 7,
            consistency: Consistency::Application,
            members: (0..members)
                .map(|i| (format!("d{i}"), id(i as u64)))
                .collect(),
        };
        let r = request(3);
        assert_eq!(Request::decode(&r.encode()).unwrap(), r);
        assert!(Request::decode(&request(GROUP_MEMBERS_MAX + 1).encode()).is_err());
        let answer = Response::GroupCommitted { already: true };
        assert_eq!(Response::decode(&answer.encode()).unwrap(), answer);
    }
}
