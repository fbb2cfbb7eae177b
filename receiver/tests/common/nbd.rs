//! A small blocking NBD client over a Unix socket: fixed newstyle, `OPT_GO`, simple replies,
//! one request at a time, so a test knows exactly which writes were acknowledged.
#![allow(dead_code)] // each test file uses its own subset

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use ctk_nbd as nbd;

pub struct Client {
    s: UnixStream,
    pub size: u64,
    pub flags: u16,
    cookie: u64,
}

/// An error reply (errno) or a broken connection.
#[derive(Debug)]
pub enum Failed {
    Errno(u32),
    Io(io::Error),
}

impl From<io::Error> for Failed {
    fn from(e: io::Error) -> Failed {
        Failed::Io(e)
    }
}

impl Client {
    /// Connects to export `name` at `sock` and negotiates with `OPT_GO`.
    pub fn connect(sock: &Path, name: &str) -> io::Result<Client> {
        let mut s = UnixStream::connect(sock)?;
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello)?;
        if &hello[..8] != b"NBDMAGIC" {
            return Err(io::Error::other("not an NBD server"));
        }
        s.write_all(&(nbd::CLIENT_FLAG_FIXED_NEWSTYLE | nbd::CLIENT_FLAG_NO_ZEROES).to_be_bytes())?;
        let mut data = (name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        let mut msg = nbd::IHAVEOPT.to_be_bytes().to_vec();
        msg.extend_from_slice(&nbd::OPT_GO.to_be_bytes());
        msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
        msg.extend_from_slice(&data);
        s.write_all(&msg)?;
        let (mut size, mut flags) = (None, 0);
        loop {
            let mut head = [0u8; 20];
            s.read_exact(&mut head)?;
            let kind = u32::from_be_bytes(head[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(head[16..20].try_into().unwrap());
            let mut rest = vec![0u8; len as usize];
            s.read_exact(&mut rest)?;
            match kind {
                nbd::REP_INFO if rest.len() >= 12 && rest[..2] == [0, 0] => {
                    size = Some(u64::from_be_bytes(rest[2..10].try_into().unwrap()));
                    flags = u16::from_be_bytes(rest[10..12].try_into().unwrap());
                }
                nbd::REP_INFO => {}
                nbd::REP_ACK => break,
                other => return Err(io::Error::other(format!("option reply {other:#x}"))),
            }
        }
        let size = size.ok_or_else(|| io::Error::other("no export size"))?;
        Ok(Client {
            s,
            size,
            flags,
            cookie: 0,
        })
    }

    fn request(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> Result<(), Failed> {
        self.cookie += 1;
        let mut msg = nbd::REQUEST_MAGIC.to_be_bytes().to_vec();
        msg.extend_from_slice(&flags.to_be_bytes());
        msg.extend_from_slice(&kind.to_be_bytes());
        msg.extend_from_slice(&self.cookie.to_be_bytes());
        msg.extend_from_slice(&offset.to_be_bytes());
        msg.extend_from_slice(&length.to_be_bytes());
        msg.extend_from_slice(payload);
        self.s.write_all(&msg)?;
        let mut reply = [0u8; 16];
        self.s.read_exact(&mut reply)?;
        let magic = u32::from_be_bytes(reply[..4].try_into().unwrap());
        let cookie = u64::from_be_bytes(reply[8..16].try_into().unwrap());
        if magic != nbd::SIMPLE_REPLY_MAGIC || cookie != self.cookie {
            return Err(Failed::Io(io::Error::other("reply out of step")));
        }
        match u32::from_be_bytes(reply[4..8].try_into().unwrap()) {
            0 => Ok(()),
            errno => Err(Failed::Errno(errno)),
        }
    }

    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> Result<(), Failed> {
        let flags = if fua { nbd::CMD_FLAG_FUA } else { 0 };
        self.request(nbd::CMD_WRITE, flags, offset, data.len() as u32, data)
    }

    pub fn zero(&mut self, offset: u64, length: u32) -> Result<(), Failed> {
        self.request(nbd::CMD_WRITE_ZEROES, 0, offset, length, &[])
    }

    pub fn flush(&mut self) -> Result<(), Failed> {
        self.request(nbd::CMD_FLUSH, 0, 0, 0, &[])
    }

    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Failed> {
        self.request(nbd::CMD_READ, 0, offset, buf.len() as u32, &[])?;
        self.s.read_exact(buf)?;
        Ok(())
    }

    /// The whole export, read in 1 MiB requests.
    pub fn read_all(&mut self) -> Result<Vec<u8>, Failed> {
        let mut out = vec![0u8; self.size as usize];
        for (i, chunk) in out.chunks_mut(1 << 20).enumerate() {
            self.read((i as u64) << 20, chunk)?;
        }
        Ok(out)
    }
}
