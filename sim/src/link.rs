//! The receiver side and the link: the store over its simulated filesystem, its power cuts, and
//! the delivery of a push (cut, corrupted, or whole) with the answer the server would give.

use super::*;

/// The delta and end frame of one push, as the link carries them.
#[derive(Clone)]
pub(crate) struct Push {
    pub(crate) bytes: Vec<u8>,
    pub(crate) meta: PointMeta,
    /// `Some((resumes, next_offset))` for a resumed push.
    pub(crate) resume: Option<(ChangeId, u64)>,
}

/// The link's view of a push: the bytes up to an optional cut, then a reset.
pub(crate) struct LinkReader {
    bytes: Vec<u8>,
    pos: usize,
    cut_at: Option<usize>,
}

impl Read for LinkReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let end = self.cut_at.unwrap_or(self.bytes.len());
        if self.pos >= end {
            if self.cut_at.is_some() {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "simulated link cut",
                ));
            }
            return Ok(0);
        }
        // Short reads, as a network gives them.
        let n = buf
            .len()
            .min(end - self.pos)
            .min(1 + (self.pos * 7919) % 3000);
        buf[..n].copy_from_slice(&self.bytes[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl Sim {
    pub(crate) fn now(&self) -> u64 {
        self.clock.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) fn retention(&self) -> ctk_receiver::retention::Retention {
        ctk_receiver::retention::Retention {
            keep: self.swarm.keep,
            tiers: self.swarm.tiers.map_or_else(Vec::new, |t| {
                ctk_receiver::retention::parse_tiers(t).expect("the simulation's tiers parse")
            }),
        }
    }

    pub(crate) fn open_store(&mut self) -> Result<DiskStore, ctk_receiver::store::StoreError> {
        let fs: Arc<dyn Vfs> = Arc::new(self.fs.clone());
        let clock = self.clock.clone();
        DiskStore::open_in(fs, Path::new(ROOT), DISK, false).map(|(mut s, recovery)| {
            s.set_clock(Arc::new(move || {
                clock.load(std::sync::atomic::Ordering::Relaxed)
            }));
            if recovery != ctk_receiver::store::Recovery::Clean {
                self.event(format!("receiver: opened after a crash: {recovery:?}"));
            }
            s
        })
    }

    /// A power cut on the receiver: the filesystem loses what was not synced.
    pub(crate) fn power_cut(&mut self) {
        self.fs.crash();
        self.report.receiver_crashes += 1;
        self.event("receiver: power cut applied".into());
    }

    pub(crate) fn faults(&mut self) -> SimFaults {
        SimFaults {
            sync_fail_per_mille: self.swarm.fs_sync_fail,
            bad_read_per_mille: self.swarm.bad_read,
            capacity: if self.swarm.disk_full && self.rng.below(2) == 0 {
                // Room for roughly the image and a little more: some pushes will not fit.
                Some(self.size + self.rng.below(3 * self.size))
            } else {
                None
            },
        }
    }

    /// Delivers one push to the receiver through the faulty link and filesystem; returns
    /// the receiver's answer (`ctk_receiver::server::push_answer`), none when the power went.
    pub(crate) fn deliver(
        &mut self,
        push: &Push,
        may_fault: bool,
    ) -> Result<Option<Response>, Violation> {
        let mut bytes = push.bytes.clone();
        let mut meta = push.meta.clone();
        let mut cut_at = None;
        if may_fault && self.rng.chance(self.swarm.link_cut) {
            cut_at = Some(self.rng.below(bytes.len() as u64 + 1) as usize);
            self.report.links_cut += 1;
        }
        if may_fault && self.rng.chance(self.swarm.corrupt) {
            self.report.corrupted += 1;
            if self.rng.below(4) == 0 {
                let mut forged = [0u8; 32];
                forged[..8].copy_from_slice(&self.rng.next_u64().to_le_bytes());
                meta.image_digest = Some(ctk::digest::ImageDigest(forged));
                self.event("link: the end frame's digest is corrupted".into());
            } else {
                let at = self.rng.below(bytes.len() as u64) as usize;
                bytes[at] ^= 1 << self.rng.below(8);
                self.event(format!("link: byte {at} of {} flipped", bytes.len()));
            }
        }
        let power_cut = may_fault && self.rng.chance(self.swarm.receiver_crash);
        if power_cut {
            // Anywhere from opening the store to the last rename of the commit.
            let ops = self.rng.below(400);
            self.fs.power_cut_after(ops);
        }
        let faults = if may_fault {
            self.faults()
        } else {
            SimFaults::default()
        };
        self.fs.set_faults(faults);
        let result = match self.open_store() {
            Ok(mut store) => {
                let input = LinkReader {
                    bytes,
                    pos: 0,
                    cut_at,
                };
                let end = move |_rest: LinkReader| Ok(meta);
                let retention = self.retention();
                let r = match &push.resume {
                    Some((resumes, next)) => {
                        store.ingest_resume(input, *resumes, *next, retention, end)
                    }
                    None => store.ingest(input, retention, end),
                };
                drop(store);
                r
            }
            Err(e) => Err(e),
        };
        self.fs.set_faults(SimFaults::default());
        let down = self.fs.is_down();
        self.fs.cancel_power_cut();
        if down {
            self.event(format!("receiver: power lost mid-push ({result:?})"));
            self.power_cut();
            return Ok(None);
        }
        match &result {
            Ok(Ingested::Committed { point, dropped }) => {
                self.report.commits += 1;
                self.report.points_dropped += *dropped as u64;
                self.event(format!(
                    "receiver: committed {} (dropped {dropped})",
                    point.change_id
                ));
            }
            Ok(Ingested::AlreadyCommitted { change_id }) => {
                self.report.already_committed += 1;
                self.event(format!("receiver: {change_id} was committed already"));
            }
            Err(e) => {
                self.report.refused += 1;
                self.event(format!("receiver: refused: {e}"));
            }
        }
        Ok(Some(ctk_receiver::server::push_answer(result)))
    }

    /// The receiver's points (a store that does not open is a violation).
    pub(crate) fn receiver_points(&mut self) -> Result<Vec<ctk_receiver::store::Point>, Violation> {
        match self.open_store() {
            Ok(store) => Ok(store.points().to_vec()),
            Err(e) => Err(self.violation(format!("the store does not open: {e}"))),
        }
    }
}
