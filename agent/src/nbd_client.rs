//! A minimal synchronous NBD client: enough to drive writes through the agent's front the
//! way any client would (fixed newstyle, NBD_OPT_GO, simple replies). The demo and the tests
//! that need to know exactly which write came before a cut use it; the other tests use
//! qemu-io, nbdinfo and fio.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

use crate::nbd;

/// A minimal synchronous NBD client: enough to drive writes through the agent's front the way
/// any client would (fixed newstyle, NBD_OPT_GO, simple replies).
pub struct NbdClient {
    s: UnixStream,
    cookie: u64,
}

impl NbdClient {
    pub fn connect(socket: &Path, export: &str) -> Result<NbdClient> {
        let mut s = UnixStream::connect(socket)
            .with_context(|| format!("connecting to the NBD front at {}", socket.display()))?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello)?;
        ensure!(
            hello[..8] == nbd::NBD_MAGIC.to_be_bytes()
                && hello[8..16] == nbd::IHAVEOPT.to_be_bytes(),
            "not an NBD server"
        );
        s.write_all(&(nbd::CLIENT_FLAG_FIXED_NEWSTYLE | nbd::CLIENT_FLAG_NO_ZEROES).to_be_bytes())?;
        let mut data = (export.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        let mut msg = nbd::IHAVEOPT.to_be_bytes().to_vec();
        msg.extend_from_slice(&nbd::OPT_GO.to_be_bytes());
        msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
        msg.extend_from_slice(&data);
        s.write_all(&msg)?;
        loop {
            let mut head = [0u8; 20];
            s.read_exact(&mut head)?;
            let reply = u32::from_be_bytes(head[12..16].try_into().expect("4"));
            let len = u32::from_be_bytes(head[16..20].try_into().expect("4")) as usize;
            ensure!(len <= nbd::OPTION_LEN_MAX as usize, "option reply too long");
            let mut body = vec![0u8; len];
            s.read_exact(&mut body)?;
            if reply == nbd::REP_ACK {
                return Ok(NbdClient { s, cookie: 0 });
            }
            if reply & (1 << 31) != 0 {
                bail!("NBD_OPT_GO refused: {}", String::from_utf8_lossy(&body));
            }
        }
    }

    fn request(&mut self, kind: u16, offset: u64, length: u32, payload: &[u8]) -> Result<()> {
        self.cookie += 1;
        let mut r = nbd::REQUEST_MAGIC.to_be_bytes().to_vec();
        r.extend_from_slice(&0u16.to_be_bytes());
        r.extend_from_slice(&kind.to_be_bytes());
        r.extend_from_slice(&self.cookie.to_be_bytes());
        r.extend_from_slice(&offset.to_be_bytes());
        r.extend_from_slice(&length.to_be_bytes());
        self.s.write_all(&r)?;
        self.s.write_all(payload)?;
        let mut reply = [0u8; 16];
        self.s.read_exact(&mut reply)?;
        let error = u32::from_be_bytes(reply[4..8].try_into().expect("4"));
        let cookie = u64::from_be_bytes(reply[8..16].try_into().expect("8"));
        ensure!(
            reply[..4] == nbd::SIMPLE_REPLY_MAGIC.to_be_bytes() && cookie == self.cookie,
            "NBD reply out of step"
        );
        ensure!(error == 0, "NBD request failed with error {error}");
        Ok(())
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.request(nbd::CMD_WRITE, offset, data.len() as u32, data)
    }

    pub fn flush(&mut self) -> Result<()> {
        self.request(nbd::CMD_FLUSH, 0, 0, &[])
    }

    /// Sends `count` READs of `length` bytes at `offset` and reads none of the replies: the
    /// client that never drains its socket, which the agent's memory bounds are tested with.
    pub fn read_without_reading_replies(
        &mut self,
        offset: u64,
        length: u32,
        count: u32,
    ) -> Result<()> {
        for _ in 0..count {
            self.cookie += 1;
            let mut r = nbd::REQUEST_MAGIC.to_be_bytes().to_vec();
            r.extend_from_slice(&0u16.to_be_bytes());
            r.extend_from_slice(&nbd::CMD_READ.to_be_bytes());
            r.extend_from_slice(&self.cookie.to_be_bytes());
            r.extend_from_slice(&offset.to_be_bytes());
            r.extend_from_slice(&length.to_be_bytes());
            self.s.write_all(&r)?;
        }
        Ok(())
    }
}
