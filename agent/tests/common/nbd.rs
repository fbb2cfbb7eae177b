//! What the NBD tests share: the tools they drive, qemu-io, a seeded write workload, a
//! delta applied to a replica, and `Raw`, an NBD client that speaks the protocol byte by
//! byte so it can also break it on purpose.
#![allow(dead_code)] // each test file uses its own subset

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// A tool the test needs. Missing means failing, never skipping (CI installs them).
pub fn tool(name: &str) -> &str {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .output()
        .unwrap();
    assert!(
        found.status.success(),
        "{name} is required (Debian: qemu-utils, libnbd-bin); .ci/run installs it"
    );
    name
}

pub fn qemu_io(uri: &str, commands: &[String]) {
    let mut cmd = Command::new(tool("qemu-io"));
    cmd.args(["-f", "raw", uri]);
    for c in commands {
        cmd.arg("-c").arg(c);
    }
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("error"),
        "qemu-io failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub use ctk::seeded::XorShift64 as Rng;

/// Random qemu-io writes: sizes from 512 bytes to 256 KiB at 512-byte aligned offsets, plus
/// zeroing and discards.
pub fn random_writes(rng: &mut Rng, size: u64, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| {
            let len = 512 * (1 + rng.next() % 512);
            let off = 512 * (rng.next() % ((size - len) / 512));
            match rng.next() % 10 {
                0 => format!("write -z {off} {len}"),
                1 => format!("discard {off} {len}"),
                _ => format!("write -P {} {off} {len}", rng.next() % 255 + 1),
            }
        })
        .collect()
}

pub fn apply(delta: &Path, replica: &Path) {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(replica)
        .unwrap();
    ctk::delta::apply(
        std::io::BufReader::new(std::fs::File::open(delta).unwrap()),
        &file,
        None,
    )
    .unwrap();
}

/// A raw NBD client speaking just enough protocol to misbehave.
pub struct Raw {
    pub s: UnixStream,
}

impl Raw {
    pub fn connect(dir: &Path) -> Raw {
        let mut s = UnixStream::connect(dir.join("nbd.sock")).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello).unwrap();
        assert_eq!(&hello[..8], b"NBDMAGIC");
        Raw { s }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).unwrap();
    }

    pub fn option(&mut self, option: u32, data: &[u8]) -> (u32, Vec<u8>) {
        let mut m = 0x4948_4156_454f_5054u64.to_be_bytes().to_vec();
        m.extend_from_slice(&option.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.send(&m);
        self.option_reply()
    }

    pub fn option_reply(&mut self) -> (u32, Vec<u8>) {
        let mut head = [0u8; 20];
        self.s.read_exact(&mut head).unwrap();
        let reply = u32::from_be_bytes(head[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(head[16..20].try_into().unwrap()) as usize;
        let mut data = vec![0u8; len];
        self.s.read_exact(&mut data).unwrap();
        (reply, data)
    }

    /// Fixed newstyle, no zeroes, then NBD_OPT_GO for `name`.
    pub fn go(dir: &Path, name: &str) -> Raw {
        let mut raw = Raw::connect(dir);
        raw.send(&3u32.to_be_bytes());
        let mut data = (name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        let mut m = 0x4948_4156_454f_5054u64.to_be_bytes().to_vec();
        m.extend_from_slice(&7u32.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(&data);
        raw.send(&m);
        loop {
            let (reply, _) = raw.option_reply();
            if reply == 1 {
                return raw;
            }
            assert_eq!(reply, 3, "expected INFO replies before ACK");
        }
    }

    pub fn request(&mut self, kind: u16, cookie: u64, offset: u64, length: u32, payload: &[u8]) {
        assert!(
            self.try_request(kind, cookie, offset, length, payload),
            "send failed"
        );
    }

    /// Sends a request; false if the server is gone.
    pub fn try_request(
        &mut self,
        kind: u16,
        cookie: u64,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> bool {
        let mut r = 0x2560_9513u32.to_be_bytes().to_vec();
        r.extend_from_slice(&0u16.to_be_bytes());
        r.extend_from_slice(&kind.to_be_bytes());
        r.extend_from_slice(&cookie.to_be_bytes());
        r.extend_from_slice(&offset.to_be_bytes());
        r.extend_from_slice(&length.to_be_bytes());
        r.extend_from_slice(payload);
        self.s.write_all(&r).is_ok()
    }

    /// Reads a simple reply; returns (error, cookie).
    pub fn reply(&mut self, data_len: usize) -> (u32, u64) {
        let mut head = [0u8; 16];
        self.s.read_exact(&mut head).unwrap();
        assert_eq!(
            u32::from_be_bytes(head[0..4].try_into().unwrap()),
            0x6744_6698
        );
        let error = u32::from_be_bytes(head[4..8].try_into().unwrap());
        if error == 0 && data_len > 0 {
            let mut data = vec![0u8; data_len];
            self.s.read_exact(&mut data).unwrap();
        }
        (error, u64::from_be_bytes(head[8..16].try_into().unwrap()))
    }

    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
}

impl Raw {
    /// Reads one structured reply chunk: (flags, type, cookie, payload).
    pub fn chunk(&mut self) -> (u16, u16, u64, Vec<u8>) {
        let mut head = [0u8; 20];
        self.s.read_exact(&mut head).unwrap();
        assert_eq!(&head[0..4], &0x668e_33efu32.to_be_bytes(), "not a chunk");
        let flags = u16::from_be_bytes(head[4..6].try_into().unwrap());
        let kind = u16::from_be_bytes(head[6..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(head[8..16].try_into().unwrap());
        let len = u32::from_be_bytes(head[16..20].try_into().unwrap()) as usize;
        let mut payload = vec![0u8; len];
        self.s.read_exact(&mut payload).unwrap();
        (flags, kind, cookie, payload)
    }
}
