//! The NBD protocol (fixed newstyle), as far as ctk serves it (the agent's front; the
//! receiver's exports of restore points): constants, and parsing and encoding of handshake
//! options, requests and replies. No I/O: the server feeds bytes in and writes the bytes this
//! crate produces. Every length is checked before it is used. Reference: NBD's doc/proto.md.

pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const CLIENT_FLAG_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const CLIENT_FLAG_NO_ZEROES: u32 = 1 << 1;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_BLOCK_SIZE: u16 = 3;

pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

/// `base:allocation` status bits.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;
/// `ctk:changed:<ChangeId>` status bit: the block was written after that cut (in a later
/// cut or in the open epoch).
pub const STATE_CHANGED: u32 = 1 << 0;

/// The meta context ctk-agent always offers.
pub const CONTEXT_ALLOCATION: &str = "base:allocation";
/// Prefix of ctk's own meta contexts: `ctk:changed:<ChangeId>`.
pub const CONTEXT_CHANGED_PREFIX: &str = "ctk:changed:";
/// Most meta contexts one connection may select (each costs a chunk per BLOCK_STATUS).
pub const CONTEXTS_MAX: usize = 8;
/// Most descriptors in one BLOCK_STATUS chunk (8 bytes each); the spec lets a server
/// answer a prefix of the range, and the client asks again for the rest.
pub const DESCRIPTORS_MAX: usize = 16 * 1024;

pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;

/// Largest option payload read into memory; a longer one is discarded and refused.
pub const OPTION_LEN_MAX: u32 = 64 * 1024;
/// Largest READ or WRITE payload (advertised as the maximum block size). Per request, the
/// server holds at most one buffer of this size.
pub const PAYLOAD_MAX: u32 = 32 << 20;
/// Export names longer than this are refused (the spec's hard limit is 4096).
pub const NAME_LEN_MAX: usize = 4096;

/// A request header as sent by the client (28 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

/// Parses a request header; `None` if the magic is wrong (the stream cannot be resynced).
pub fn parse_request(bytes: &[u8; 28]) -> Option<Request> {
    let be32 = |i: usize| u32::from_be_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
    let be16 = |i: usize| u16::from_be_bytes(bytes[i..i + 2].try_into().expect("2 bytes"));
    let be64 = |i: usize| u64::from_be_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
    if be32(0) != REQUEST_MAGIC {
        return None;
    }
    Some(Request {
        flags: be16(4),
        kind: be16(6),
        cookie: be64(8),
        offset: be64(16),
        length: be32(24),
    })
}

/// A simple reply header (16 bytes); read data follows it.
pub fn simple_reply(error: u32, cookie: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out
}

/// The header of one structured reply chunk (20 bytes); `length` payload bytes follow.
pub fn chunk_header(flags: u16, kind: u16, cookie: u64, length: u32) -> [u8; 20] {
    let mut out = [0u8; 20];
    out[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&kind.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out[16..20].copy_from_slice(&length.to_be_bytes());
    out
}

/// The server's greeting: `NBDMAGIC`, `IHAVEOPT`, and the handshake flags ctk offers (fixed
/// newstyle, no zeroes).
pub fn greeting() -> [u8; 18] {
    let mut out = [0u8; 18];
    out[0..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    out
}

/// The client's handshake flags, checked: whether it asked for no zeroes after EXPORT_NAME.
pub fn client_flags(flags: u32) -> Result<bool, String> {
    if flags & !(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES) != 0 {
        return Err(format!("client sent unknown handshake flags {flags:#x}"));
    }
    Ok(flags & CLIENT_FLAG_NO_ZEROES != 0)
}

/// The head of a successful READ's reply, which the data follows: one final `OFFSET_DATA`
/// chunk's header and offset with structured replies, a simple reply without.
pub fn read_reply_head(structured: bool, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
    if structured {
        let mut head =
            chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, cookie, 8 + length).to_vec();
        head.extend_from_slice(&offset.to_be_bytes());
        head
    } else {
        simple_reply(0, cookie).to_vec()
    }
}

/// A failed request's reply: an error chunk with a message once structured replies are on
/// (required for READ, and it tells the client why), a simple reply otherwise.
pub fn error_reply(structured: bool, cookie: u64, error: u32, why: &str) -> Vec<u8> {
    debug_assert!(error != 0);
    if structured {
        error_chunk(cookie, error, why)
    } else {
        simple_reply(error, cookie).to_vec()
    }
}

/// A final NBD_REPLY_TYPE_ERROR chunk: header and payload (errno, message).
pub fn error_chunk(cookie: u64, error: u32, message: &str) -> Vec<u8> {
    // Messages are ours, but keep them within the spec's string limit all the same.
    let message = &message.as_bytes()[..message.len().min(NAME_LEN_MAX)];
    let length = 4 + 2 + message.len() as u32;
    let mut out = chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie, length).to_vec();
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(message.len() as u16).to_be_bytes());
    out.extend_from_slice(message);
    out
}

/// One NBD_REPLY_TYPE_BLOCK_STATUS chunk for `context`: header and descriptors.
pub fn block_status_chunk(cookie: u64, done: bool, context: u32, runs: &[(u32, u32)]) -> Vec<u8> {
    assert!(!runs.is_empty(), "a BLOCK_STATUS chunk needs a descriptor");
    let length = 4 + 8 * runs.len() as u32;
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    let mut out = chunk_header(flags, REPLY_TYPE_BLOCK_STATUS, cookie, length).to_vec();
    out.extend_from_slice(&context.to_be_bytes());
    for &(len, status) in runs {
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&status.to_be_bytes());
    }
    out
}

/// Builds BLOCK_STATUS descriptors from `(length, status)` runs in order: neighbours with
/// the same status merge, zero lengths vanish, and the list stops at `max` descriptors or
/// where a descriptor would overflow 32 bits (the client asks again for the rest).
pub fn descriptors(runs: impl IntoIterator<Item = (u64, u32)>, max: usize) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    for (len, status) in runs {
        if len == 0 {
            continue;
        }
        match out.last_mut() {
            Some((l, s)) if *s == status && (*l as u64) + len <= u32::MAX as u64 => {
                *l += len as u32;
            }
            _ => {
                if out.len() == max {
                    break;
                }
                // The request length is 32 bits, so no run is longer; clip all the same.
                out.push((len.min(u32::MAX as u64) as u32, status));
            }
        }
    }
    out
}

/// The body of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT.
#[derive(Debug, PartialEq, Eq)]
pub struct MetaRequest {
    pub export: String,
    pub queries: Vec<String>,
}

fn take_string<'a>(data: &mut &'a [u8], what: &'static str) -> Result<&'a str, &'static str> {
    let len = take_u32(data, what)? as usize;
    if len > NAME_LEN_MAX {
        return Err("string longer than 4096 bytes");
    }
    let bytes = data.get(..len).ok_or("string runs past the payload")?;
    *data = &data[len..];
    std::str::from_utf8(bytes).map_err(|_| "string is not UTF-8")
}

fn take_u32(data: &mut &[u8], what: &'static str) -> Result<u32, &'static str> {
    let bytes: [u8; 4] = data.get(..4).ok_or(what)?.try_into().expect("4");
    *data = &data[4..];
    Ok(u32::from_be_bytes(bytes))
}

/// Parses a meta context option payload: export name, query count, queries. The count is
/// checked against the bytes present before anything is allocated for it.
pub fn parse_meta_request(mut data: &[u8]) -> Result<MetaRequest, &'static str> {
    let export = take_string(&mut data, "payload too short for the export name")?.to_owned();
    let count = take_u32(&mut data, "missing query count")? as usize;
    // Each query takes at least its 4-byte length.
    if count > data.len() / 4 {
        return Err("query count does not fit the payload");
    }
    let mut queries = Vec::with_capacity(count);
    for _ in 0..count {
        queries.push(take_string(&mut data, "query runs past the payload")?.to_owned());
    }
    if !data.is_empty() {
        return Err("bytes after the last query");
    }
    Ok(MetaRequest { export, queries })
}

/// NBD_REP_META_CONTEXT payload: context id and name.
pub fn meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut out = id.to_be_bytes().to_vec();
    out.extend_from_slice(name.as_bytes());
    out
}

/// An option reply: magic, option, reply type, length, data.
pub fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// An option reply carrying an error message.
pub fn option_error(option: u32, reply: u32, message: &str) -> Vec<u8> {
    option_reply(option, reply, message.as_bytes())
}

/// The body of NBD_OPT_INFO / NBD_OPT_GO: the export name and the info types asked for.
#[derive(Debug, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub requests: Vec<u16>,
}

/// Parses an INFO/GO payload, checking every length against the payload.
pub fn parse_info_request(data: &[u8]) -> Result<InfoRequest, &'static str> {
    let name_len = u32::from_be_bytes(
        data.get(0..4)
            .ok_or("payload too short")?
            .try_into()
            .expect("4"),
    ) as usize;
    if name_len > NAME_LEN_MAX {
        return Err("export name too long");
    }
    let name = data
        .get(4..4 + name_len)
        .ok_or("export name runs past the payload")?;
    let name = std::str::from_utf8(name)
        .map_err(|_| "export name is not UTF-8")?
        .to_owned();
    let rest = &data[4 + name_len..];
    let count = u16::from_be_bytes(
        rest.get(0..2)
            .ok_or("missing info request count")?
            .try_into()
            .expect("2"),
    ) as usize;
    let list = &rest[2..];
    if list.len() != count * 2 {
        return Err("info request count does not match the payload");
    }
    let requests = list
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Ok(InfoRequest { name, requests })
}

/// NBD_INFO_EXPORT: size and transmission flags.
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut out = INFO_EXPORT.to_be_bytes().to_vec();
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out
}

/// NBD_INFO_BLOCK_SIZE: minimum, preferred and maximum block sizes.
pub fn info_block_size(minimum: u32, preferred: u32, maximum: u32) -> Vec<u8> {
    let mut out = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for v in [minimum, preferred, maximum] {
        out.extend_from_slice(&v.to_be_bytes());
    }
    out
}

/// NBD_INFO_NAME: the canonical export name.
pub fn info_name(name: &str) -> Vec<u8> {
    let mut out = INFO_NAME.to_be_bytes().to_vec();
    out.extend_from_slice(name.as_bytes());
    out
}

/// NBD_REP_SERVER payload for NBD_OPT_LIST.
pub fn list_entry(name: &str) -> Vec<u8> {
    let mut out = (name.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(name.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_bad_magic_is_refused() {
        let mut bytes = [0u8; 28];
        bytes[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        bytes[4..6].copy_from_slice(&CMD_FLAG_FUA.to_be_bytes());
        bytes[6..8].copy_from_slice(&CMD_WRITE.to_be_bytes());
        bytes[8..16].copy_from_slice(&77u64.to_be_bytes());
        bytes[16..24].copy_from_slice(&4096u64.to_be_bytes());
        bytes[24..28].copy_from_slice(&512u32.to_be_bytes());
        assert_eq!(
            parse_request(&bytes),
            Some(Request {
                flags: CMD_FLAG_FUA,
                kind: CMD_WRITE,
                cookie: 77,
                offset: 4096,
                length: 512
            })
        );
        bytes[0] ^= 1;
        assert_eq!(parse_request(&bytes), None);
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

    #[test]
    fn meta_requests_are_checked_against_their_payload() {
        let good = meta_payload("vm1", &["base:allocation", "ctk:changed:x"]);
        assert_eq!(
            parse_meta_request(&good),
            Ok(MetaRequest {
                export: "vm1".into(),
                queries: vec!["base:allocation".into(), "ctk:changed:x".into()]
            })
        );
        assert_eq!(
            parse_meta_request(&meta_payload("", &[])).unwrap().queries,
            Vec::<String>::new()
        );
        // A count that claims billions of queries is refused before any allocation.
        let mut liar = meta_payload("vm1", &[]);
        liar[7..11].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_meta_request(&liar).is_err());
        // Truncated anywhere, trailing junk, a query length past the end, bad UTF-8.
        for cut in 0..good.len() {
            assert!(parse_meta_request(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut junk = good.clone();
        junk.push(0);
        assert!(parse_meta_request(&junk).is_err());
        let mut long = good.clone();
        long[14] = 0xff;
        assert!(parse_meta_request(&long).is_err());
        let mut utf = good.clone();
        utf[15] = 0xff;
        assert!(parse_meta_request(&utf).is_err());
    }

    #[test]
    fn descriptors_merge_equal_neighbours_and_stop_at_the_bound() {
        let runs = [(512, 0), (0, 3), (1024, 0), (4096, 3), (4096, 3), (512, 0)];
        assert_eq!(descriptors(runs, 16), vec![(1536, 0), (8192, 3), (512, 0)]);
        assert_eq!(descriptors(runs, 2), vec![(1536, 0), (8192, 3)]);
        assert_eq!(descriptors(runs, 1), vec![(1536, 0)]);
        // Runs that would overflow a 32-bit descriptor start a new one.
        let big = [(u32::MAX as u64 - 10, 1), (100, 1)];
        assert_eq!(descriptors(big, 16), vec![(u32::MAX - 10, 1), (100, 1)]);
    }

    #[test]
    fn chunks_have_the_spec_layout() {
        let c = block_status_chunk(9, true, 2, &[(4096, STATE_CHANGED), (512, 0)]);
        assert_eq!(&c[0..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&c[4..6], &REPLY_FLAG_DONE.to_be_bytes());
        assert_eq!(&c[6..8], &REPLY_TYPE_BLOCK_STATUS.to_be_bytes());
        assert_eq!(&c[8..16], &9u64.to_be_bytes());
        assert_eq!(&c[16..20], &20u32.to_be_bytes());
        assert_eq!(c.len(), 20 + 20);
        assert_eq!(&c[20..24], &2u32.to_be_bytes());
        let e = error_chunk(3, EINVAL, "no");
        assert_eq!(&e[16..20], &8u32.to_be_bytes());
        assert_eq!(&e[20..24], &EINVAL.to_be_bytes());
        assert_eq!(&e[24..26], &2u16.to_be_bytes());
        assert_eq!(&e[26..], b"no");
    }

    #[test]
    fn info_requests_are_checked_against_their_payload() {
        let mut good = 3u32.to_be_bytes().to_vec();
        good.extend_from_slice(b"vm1");
        good.extend_from_slice(&1u16.to_be_bytes());
        good.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        assert_eq!(
            parse_info_request(&good),
            Ok(InfoRequest {
                name: "vm1".into(),
                requests: vec![INFO_BLOCK_SIZE]
            })
        );
        // A name length past the payload, a count that lies, a truncated payload, bad UTF-8.
        let mut liar = good.clone();
        liar[3] = 200;
        assert!(parse_info_request(&liar).is_err());
        let mut count = good.clone();
        count[8] = 9;
        assert!(parse_info_request(&count).is_err());
        assert!(parse_info_request(&good[..5]).is_err());
        assert!(parse_info_request(&[0, 0, 0]).is_err());
        let mut utf = good.clone();
        utf[4] = 0xff;
        assert!(parse_info_request(&utf).is_err());
        let mut huge = u32::MAX.to_be_bytes().to_vec();
        huge.extend_from_slice(&[0; 8]);
        assert!(parse_info_request(&huge).is_err());
    }
}
