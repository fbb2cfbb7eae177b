//! The agent's push, as the agent makes it: the real `ctk::push::Session`, driven with the
//! simulated tracker, store and link; the export of what it plans; the cursor.

use super::*;

impl Sim {
    pub(crate) fn push(&mut self) -> Outcome {
        // Half the pushes are of crash cuts, which make no point when nothing changed.
        let may_skip = self.rng.below(2) == 0;
        self.push_with(may_skip)
    }

    /// One push as the agent makes it: the real `ctk::push::Session` decides what to ask,
    /// what to send and when the cursor moves; this driver answers its questions from the
    /// simulated tracker, store and link.
    pub(crate) fn push_with(&mut self, may_skip: bool) -> Outcome {
        self.report.pushes += 1;
        // Sometimes an old push arrives again first (a retry racing a reconnect, a stale
        // stream): it must be acknowledged as already committed or refused, never merged
        // over newer points.
        if self.rng.chance(self.swarm.redeliver)
            && let Some(old) = self.last_push.clone()
        {
            self.report.redelivered += 1;
            self.event("link: an earlier push delivered again".into());
            self.deliver(&old, true)?;
            self.check_receiver()?;
        }
        let forced = self.rng.chance(self.swarm.forced_resync);
        let mut s = push::Session::new(self.size, true, forced, may_skip);
        if let Some(m) = self.mutant {
            s = s.with_mutant(m);
        }
        // The receiver's hashes of a resync: (unit, replica size, hashes).
        let mut digests: Option<(u32, u64, Vec<u8>)> = None;
        loop {
            for note in s.take_notes() {
                self.event(format!("agent: {note:?}"));
            }
            match s.poll() {
                Action::AskNewest => {
                    let points = self.receiver_points()?;
                    let newest = points.last().map(|p| p.change_id);
                    s.handle_newest(newest);
                }
                Action::AskAnswerable(since) => {
                    let t = self.tracker()?;
                    let latest = t.latest();
                    let answer = match t.changed(Since::Id(since), latest) {
                        Ok(_) => Ok(()),
                        Err(TrackerError::Query(q)) => Err(q.to_string()),
                        Err(e) => {
                            return Err(self.violation(format!("changed({since}) failed: {e}")));
                        }
                    };
                    s.handle_answerable(answer);
                }
                Action::AskResume => {
                    let offered = self
                        .open_store()
                        .ok()
                        .and_then(|store| store.partial())
                        .map(|p| p.state());
                    s.handle_resume(offered);
                }
                Action::AskUnchanged(since) => {
                    let t = self.tracker()?;
                    let unchanged = t
                        .changed_blocks_unconfirmed(Since::Id(since), t.map().latest())
                        .is_ok_and(|b| b.is_empty() && t.map().open_blocks().is_empty());
                    s.handle_unchanged(unchanged);
                }
                Action::FetchDigests(_) => {
                    self.report.resyncs += 1;
                    let unit = (BS as u32) << self.rng.below(3);
                    match self
                        .open_store()
                        .ok()
                        .and_then(|store| store.unit_digests(unit).ok())
                    {
                        Some((of, size, hashes)) => {
                            digests = Some((unit, size, hashes));
                            s.handle_digests(Ok(of));
                        }
                        None => s.handle_digests(Err("resync digests unavailable".into())),
                    }
                }
                Action::Push(plan) => {
                    let Some((push, to)) = self.export(&plan, s.newest(), digests.as_ref())? else {
                        // The agent crashed taking the cut: this push is over.
                        return Ok(());
                    };
                    let answer = self.deliver(&push, true)?;
                    self.last_push = Some(push);
                    match answer {
                        Some(_) if self.rng.chance(self.swarm.ack_lost) => {
                            self.report.acks_lost += 1;
                            self.event(format!("link: the answer to the push of {to} is lost"));
                            s.handle_push_lost("the answer was lost".into(), false, Some(to));
                        }
                        Some(answer) => s.handle_pushed(to, &answer),
                        None => s.handle_push_lost("no answer".into(), false, Some(to)),
                    }
                    self.check_receiver()?;
                }
                Action::MoveCursor(point) => {
                    self.last_acked = Some(point);
                    self.committed_seen(point);
                    self.advance_cursor(point)?;
                    s.handle_cursor_moved();
                }
                Action::Done(outcome) => {
                    if let PushOutcome::InSync { point } = &outcome
                        && self.cuts.get(point) != Some(&self.source)
                    {
                        return Err(self.violation(format!(
                            "MISSED WRITE: the agent said nothing changed since {point}, but \
                             the disk differs from it"
                        )));
                    }
                    self.event(format!("agent: push done: {outcome:?}"));
                    return self.check_receiver();
                }
            }
        }
    }

    /// Cuts, and exports what `plan` says on top of the receiver's newest point `newest`:
    /// the push's bytes and cut, or `None` when the agent crashed taking the cut.
    pub(crate) fn export(
        &mut self,
        plan: &Plan,
        newest: Option<ChangeId>,
        digests: Option<&(u32, u64, Vec<u8>)>,
    ) -> Result<Option<(Push, ChangeId)>, Violation> {
        let to = match self.tracker()?.cut() {
            Ok(id) => id,
            Err(e) => {
                self.report.journal_sync_failures += 1;
                self.crash_agent(&format!("cut failed: {e}"));
                return Ok(None);
            }
        };
        self.cuts.insert(to, self.source.clone());
        let image = self.source.clone();
        let read = |offset: u64, buf: &mut [u8]| {
            buf.copy_from_slice(&image[offset as usize..offset as usize + buf.len()]);
            Ok(())
        };
        let geometry = Geometry::new(self.size, BS).expect("a simulated disk's geometry");
        let header = DeltaHeader {
            disk_id: DISK.into(),
            disk_size: self.size,
            block_size: BS as u32,
            // A resumed push starts where the cut-off one did: the same point.
            from: newest,
            to,
        };
        let options = WriteOptions {
            zstd_level: if self.rng.below(2) == 0 {
                Some(1)
            } else {
                None
            },
        };
        let mut resume = None;
        let exported = match plan {
            Plan::Compare { .. } => {
                let (unit, size, hashes) = digests.expect("a compare follows its digests");
                // A replica of another size has no hash the agent can use: the full copy.
                let theirs: &[u8] = if *size == self.size { hashes } else { &[] };
                let r = push::compare_export(
                    read,
                    self.size,
                    *unit,
                    theirs,
                    &header,
                    options,
                    Vec::new(),
                );
                if let Ok((_, _, differing)) = &r {
                    self.event(format!(
                        "agent: resync by digests, {differing} bytes differ"
                    ));
                }
                r.map(|(w, summary, _)| (w, summary))
            }
            Plan::Since(since) | Plan::Resume { since, .. } => {
                let Some(extents) = self.changed(*since, to)? else {
                    // Answerable a moment ago, not now (a crash in between): a full.
                    self.report.fulls += 1;
                    let whole = [Extent::new(0, self.size)];
                    let (w, _) = delta::export_with(read, whole, &header, options, Vec::new())
                        .map_err(|e| self.violation(format!("export failed: {e}")))?;
                    return Ok(Some((self.pushed(w, None), to)));
                };
                match newest {
                    Some(from) => self.check_reported(&from, to, &extents)?,
                    None => self.report.fulls += 1,
                }
                let mut extents = extents;
                if let Plan::Resume {
                    prior, next_offset, ..
                } = plan
                {
                    let t = self.tracker()?;
                    let all = t.changed_blocks(*since, to);
                    let later = t.changed_blocks(Since::Id(*prior), to);
                    match (all, later) {
                        (Ok(all), Ok(later)) => {
                            let send = push::resume_blocks(&all, &later, *next_offset, &geometry).0;
                            extents = ctk::map::blocks_to_extents(&send, &geometry);
                            resume = Some((*prior, *next_offset));
                            self.report.resumes += 1;
                        }
                        _ => self.event("agent: the resumed cut is no longer answerable".into()),
                    }
                }
                self.event(format!("agent: {} extents to send", extents.len()));
                delta::export_with(read, &extents, &header, options, Vec::new())
            }
        };
        let (bytes, _) = exported.map_err(|e| self.violation(format!("export failed: {e}")))?;
        self.event(format!(
            "agent: push {:?} -> {to}, {} bytes",
            newest.map(|f| f.to_string()),
            bytes.len()
        ));
        Ok(Some((self.pushed(bytes, resume), to)))
    }

    /// A push of `bytes` with the end frame the agent sends: the cut's time, its
    /// consistency, and the digest of the whole image as of the cut.
    pub(crate) fn pushed(&self, bytes: Vec<u8>, resume: Option<(ChangeId, u64)>) -> Push {
        let mut leaves = Leaves::zeroed(self.size, BS as u32).expect("small disk");
        leaves.set_data(0, &self.source).expect("whole image");
        Push {
            bytes,
            meta: PointMeta {
                cut_unix_ms: Some(self.now()),
                consistency: Some(ctk::Consistency::Crash),
                image_digest: Some(leaves.digest()),
            },
            resume,
        }
    }

    /// The tracker's answer for `since` up to `upto`, or `None` if it cannot give one (the
    /// agent then compares digests).
    pub(crate) fn changed(
        &mut self,
        since: Since,
        upto: ChangeId,
    ) -> Result<Option<Vec<Extent>>, Violation> {
        match self.tracker()?.changed(since, upto) {
            Ok(e) => Ok(Some(e)),
            Err(TrackerError::Query(q)) => {
                self.event(format!("agent: cannot answer since {since:?}: {q}"));
                Ok(None)
            }
            Err(e) => Err(self.violation(format!("changed({since:?}) failed: {e}"))),
        }
    }

    pub(crate) fn advance_cursor(&mut self, at: ChangeId) -> Outcome {
        let registered = self.cursor.is_some();
        let t = self.tracker()?;
        if at.generation != t.latest().generation {
            return Ok(());
        }
        let r = if registered {
            t.advance_cursor("replica", at)
        } else {
            t.register_cursor("replica", at)
        };
        match r {
            Ok(()) => self.cursor = Some(at),
            Err(TrackerError::Io { .. }) | Err(TrackerError::Poisoned(_)) => {
                self.report.journal_sync_failures += 1;
                self.crash_agent("cursor write failed");
            }
            Err(e) => self.event(format!("agent: cursor not moved: {e}")),
        }
        Ok(())
    }

    pub(crate) fn committed_seen(&mut self, id: ChangeId) {
        if self.committed_set.insert(id) {
            self.committed.push(id);
        }
    }
}
