//! The NBD protocol (fixed newstyle), as far as ctk-agent serves it: constants, and parsing
//! and encoding of handshake options, requests and replies. No I/O: the server feeds bytes in
//! and writes the bytes this module produces. Every length is checked before it is used.
//! Reference: NBD's doc/proto.md.

pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

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

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_BLOCK_SIZE: u16 = 3;

pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
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

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

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
