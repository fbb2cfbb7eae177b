//! The checker: against the reference model (the source at every cut), after every push.

use super::*;

impl Sim {
    /// Every block that differs between the point `from` and the cut `to` is in the
    /// tracker's answer.
    pub(crate) fn check_reported(
        &self,
        from: &ChangeId,
        to: ChangeId,
        extents: &[Extent],
    ) -> Outcome {
        let (Some(before), Some(after)) = (self.cuts.get(from), self.cuts.get(&to)) else {
            return Err(self.violation(format!("no reference image of {from} or {to}")));
        };
        // Blocks of the cut's size; bytes past a smaller image's end are zeros (a grow).
        let block = |image: &[u8], b: u64| -> Vec<u8> {
            let mut v = vec![0u8; BS as usize];
            let start = ((b * BS) as usize).min(image.len());
            let end = (((b + 1) * BS) as usize).min(image.len());
            v[..end - start].copy_from_slice(&image[start..end]);
            v
        };
        for b in 0..(after.len() as u64).div_ceil(BS) {
            if block(before, b) != block(after, b) {
                let end = ((b + 1) * BS).min(after.len() as u64);
                let covered = extents.iter().any(|e| e.offset <= b * BS && e.end() >= end);
                if !covered {
                    return Err(self.violation(format!(
                        "MISSED WRITE: block {b} changed between {from} and {to} but changed_since does not report it"
                    )));
                }
            }
        }
        Ok(())
    }

    pub(crate) fn check_receiver(&mut self) -> Outcome {
        let store = self
            .open_store()
            .map_err(|e| self.violation(format!("the store does not open: {e}")))?;
        let points = store.points().to_vec();
        for p in &points {
            self.committed_seen(p.change_id);
        }
        // Nothing acknowledged is lost: the newest acknowledged point is kept until a newer
        // point is committed (then retention may drop it).
        if let Some(acked) = self.last_acked
            && !points.iter().any(|p| p.change_id == acked)
        {
            let pos = |id: ChangeId| self.committed.iter().position(|c| *c == id);
            let newest = points.last().and_then(|p| pos(p.change_id));
            if newest.is_none_or(|n| Some(n) <= pos(acked)) {
                return Err(self.violation(format!(
                    "LOST: acknowledged point {acked} is gone; the store holds {:?}",
                    points.iter().map(|p| &p.change_id).collect::<Vec<_>>()
                )));
            }
        }
        if let Some(c) = &self.cursor
            && !self.committed_set.contains(c)
        {
            return Err(self.violation(format!(
                "the agent's cursor {c} names a point the receiver never committed"
            )));
        }
        for p in &points {
            let Some(expected) = self.cuts.get(&p.change_id) else {
                return Err(self.violation(format!("point {} was never cut", p.change_id)));
            };
            if let Err(e) = store.restore(p.change_id, Path::new(RESTORE_TO), |_, _| {}) {
                return Err(self.violation(format!(
                    "DIVERGED: point {} does not restore: {e}",
                    p.change_id
                )));
            }
            let got = self.fs.read_file(Path::new(RESTORE_TO)).unwrap_or_default();
            if &got != expected {
                let first = got.iter().zip(expected.iter()).position(|(a, b)| a != b);
                return Err(self.violation(format!(
                    "DIVERGED: point {} restores to a different image (first difference at {first:?}, lengths {} and {})",
                    p.change_id,
                    got.len(),
                    expected.len()
                )));
            }
            self.report.points_checked += 1;
        }
        let _ = self.fs.remove_file(Path::new(RESTORE_TO));
        if let Err(e) = store.verify() {
            return Err(self.violation(format!("verify fails: {e}")));
        }
        Ok(())
    }
}
