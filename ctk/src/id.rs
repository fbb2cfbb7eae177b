//! `ChangeId`: which tracking generation, and which cut within it.

use std::fmt;
use std::str::FromStr;

/// A tracking generation: a random 128-bit value, new whenever continuity of tracking is
/// lost (journal missing, torn past recovery, or belonging to another disk). ChangeIds of
/// one generation are meaningless in another.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Generation(pub u128);

impl Generation {
    /// A fresh generation from the operating system's random source.
    pub fn random() -> Generation {
        let mut bytes = [0u8; 16];
        // The OS random source failing is not recoverable and not caused by input.
        getrandom::fill(&mut bytes).expect("operating system random source failed");
        Generation(u128::from_le_bytes(bytes))
    }
}

/// The wall clock in unix milliseconds, for the daemons' records (cut times, commit times,
/// ages). The library's own logic never reads it: time comes in as arguments.
pub fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl fmt::Debug for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// An opaque point in a disk's change history, like VMware's `changeId`: the generation and
/// the sequence number of a cut. Sequence 0 is the start of the generation (nothing sealed
/// yet); every cut gets the next number.
///
/// Text form: `<32 hex digits of the generation>/<decimal sequence>`, e.g.
/// `5f0c...e1/42`. It round-trips through [`fmt::Display`] and [`FromStr`].
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChangeId {
    pub generation: Generation,
    pub seq: u64,
}

impl ChangeId {
    pub fn new(generation: Generation, seq: u64) -> ChangeId {
        ChangeId { generation, seq }
    }
}

impl fmt::Debug for ChangeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for ChangeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.generation, self.seq)
    }
}

/// Why a ChangeId text did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseChangeIdError {
    /// No `/` separates the generation from the sequence number.
    #[error("malformed ChangeId {0:?}: expected <32 hex digits>/<sequence number>")]
    MissingSeparator(String),
    /// The generation is not exactly 32 hexadecimal digits.
    #[error("malformed ChangeId {0:?}: the generation must be exactly 32 hex digits")]
    BadGeneration(String),
    /// The sequence number is not a decimal u64.
    #[error("malformed ChangeId {0:?}: the sequence number must be a decimal integer")]
    BadSequence(String),
}

impl FromStr for ChangeId {
    type Err = ParseChangeIdError;

    fn from_str(text: &str) -> Result<ChangeId, ParseChangeIdError> {
        let shown: String = text.chars().take(80).collect();
        let (generation, seq) = text
            .split_once('/')
            .ok_or_else(|| ParseChangeIdError::MissingSeparator(shown.clone()))?;
        if generation.len() != 32 || !generation.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ParseChangeIdError::BadGeneration(shown));
        }
        let generation = u128::from_str_radix(generation, 16)
            .map_err(|_| ParseChangeIdError::BadGeneration(shown.clone()))?;
        // from_str accepts a leading '+', which the canonical form never has.
        if seq.is_empty() || !seq.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ParseChangeIdError::BadSequence(shown));
        }
        let seq = seq
            .parse::<u64>()
            .map_err(|_| ParseChangeIdError::BadSequence(shown))?;
        Ok(ChangeId {
            generation: Generation(generation),
            seq,
        })
    }
}

/// In JSON (the agent's control socket, the receiver's manifest) a ChangeId is its text.
impl serde::Serialize for ChangeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for ChangeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<ChangeId, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// On the wire (bincode) a ChangeId is its text, as a string: the same bytes as when the
/// messages carried it as a `String`, so older peers read it unchanged. A text that does not
/// parse fails the frame's decoding.
impl bincode::Encode for ChangeId {
    fn encode<E: bincode::enc::Encoder>(
        &self,
        e: &mut E,
    ) -> Result<(), bincode::error::EncodeError> {
        bincode::Encode::encode(&self.to_string(), e)
    }
}

impl<Context> bincode::Decode<Context> for ChangeId {
    fn decode<D: bincode::de::Decoder<Context = Context>>(
        d: &mut D,
    ) -> Result<ChangeId, bincode::error::DecodeError> {
        let text: String = bincode::Decode::decode(d)?;
        text.parse().map_err(|e: ParseChangeIdError| {
            bincode::error::DecodeError::OtherString(e.to_string())
        })
    }
}

bincode::impl_borrow_decode!(ChangeId);

/// The identity of one cut across a consistency group: random, 128 bits, drawn when the
/// group's writes are held, and carried by every member's cut of that instant, so that a
/// set of per-disk points can be checked to be one group point (each member's ChangeId
/// alone says nothing of the others). Text form: 32 hex digits, like a generation; on the
/// wire, 16 bytes little-endian.
#[derive(Clone, Copy, PartialEq, Eq, Hash, bincode::Encode, bincode::Decode)]
pub struct GroupCutId(pub u128);

impl GroupCutId {
    /// A fresh identity from the operating system's random source.
    pub fn random() -> GroupCutId {
        GroupCutId(Generation::random().0)
    }
}

impl fmt::Debug for GroupCutId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Display for GroupCutId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl FromStr for GroupCutId {
    type Err = ParseChangeIdError;

    fn from_str(text: &str) -> Result<GroupCutId, ParseChangeIdError> {
        let shown: String = text.chars().take(80).collect();
        if text.len() != 32 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ParseChangeIdError::BadGeneration(shown));
        }
        u128::from_str_radix(text, 16)
            .map(GroupCutId)
            .map_err(|_| ParseChangeIdError::BadGeneration(shown))
    }
}

/// In JSON a group cut's identity is its text.
impl serde::Serialize for GroupCutId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for GroupCutId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<GroupCutId, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_is_the_text_form_and_garbage_is_refused() {
        let id = ChangeId::new(Generation(0xabc), 12);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{id}\""));
        assert_eq!(serde_json::from_str::<ChangeId>(&json).unwrap(), id);
        assert!(serde_json::from_str::<ChangeId>("\"abc/1\"").is_err());
        assert!(serde_json::from_str::<ChangeId>("12").is_err());
    }

    #[test]
    fn text_form_round_trips() {
        for (g, s) in [(0u128, 0u64), (u128::MAX, u64::MAX), (0x1234, 7)] {
            let id = ChangeId::new(Generation(g), s);
            let text = id.to_string();
            assert_eq!(text.parse::<ChangeId>().unwrap(), id, "{text}");
        }
        let random = ChangeId::new(Generation::random(), 42);
        assert_eq!(random.to_string().parse::<ChangeId>().unwrap(), random);
    }

    #[test]
    fn malformed_text_is_a_typed_error() {
        let good_gen = "0123456789abcdef0123456789ABCDEF";
        assert!(matches!(
            "".parse::<ChangeId>(),
            Err(ParseChangeIdError::MissingSeparator(_))
        ));
        assert!(matches!(
            "abc/1".parse::<ChangeId>(),
            Err(ParseChangeIdError::BadGeneration(_))
        ));
        assert!(matches!(
            format!("{}g/1", &good_gen[..31]).parse::<ChangeId>(),
            Err(ParseChangeIdError::BadGeneration(_))
        ));
        for seq in ["", "-1", "+1", "1.5", "18446744073709551616", " 1"] {
            assert!(
                matches!(
                    format!("{good_gen}/{seq}").parse::<ChangeId>(),
                    Err(ParseChangeIdError::BadSequence(_))
                ),
                "{seq:?}"
            );
        }
        assert_eq!(format!("{good_gen}/9").parse::<ChangeId>().unwrap().seq, 9);
    }

    #[test]
    fn group_cut_ids_round_trip_and_refuse_garbage() {
        let id = super::GroupCutId(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
        assert_eq!(id.to_string().parse::<super::GroupCutId>(), Ok(id));
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(
            serde_json::from_str::<super::GroupCutId>(&json).unwrap(),
            id
        );
        for bad in [
            "",
            "0123",
            &"g".repeat(32),
            &"0".repeat(33),
            "+123456789abcdef0123456789abcdef",
        ] {
            assert!(bad.parse::<super::GroupCutId>().is_err(), "{bad:?}");
        }
        assert_ne!(super::GroupCutId::random(), super::GroupCutId::random());
    }
}
