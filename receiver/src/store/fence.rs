//! Failover's fence: once a disk is failed over at the DR site, its replica is the recovered
//! VM's disk, and a push from the original site must never commit on top of it (the agent
//! may still be running there, or come back before anyone runs failback).
//!
//! The fence is a field of the manifest (`failed_over`), so it is set and cleared
//! crash-atomically with everything else the manifest says, and every merge checks it under
//! the store's lock before it reads a byte of the push: a push already merging when the fence
//! is asked for finishes first (the fence waits for the lock), and none starts after.

use super::*;

/// The fence of a failed-over disk, as the manifest records it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FailedOver {
    /// The point the recovered VM started from.
    pub point: ChangeId,
    /// When the failover fenced the disk.
    pub since_unix_ms: u64,
}

impl FailedOver {
    /// The fence's time as RFC 3339 (UTC), for messages.
    pub fn since_rfc3339(&self) -> String {
        humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(self.since_unix_ms),
        )
        .to_string()
    }
}

/// The fence of disk `name` under `root`, read without the store's lock (the manifest is
/// replaced whole): `None` for a disk that is not failed over, or has no store.
pub fn failed_over(root: &Path, name: &str) -> Result<Option<FailedOver>> {
    validate_name(name)?;
    let path = root.join(name).join("manifest.json");
    Ok(read_manifest(&RealFs, &path, name)?.and_then(|m| m.failed_over))
}

impl DiskStore {
    /// The fence, if the disk is failed over.
    pub fn failed_over(&self) -> Option<&FailedOver> {
        self.manifest.failed_over.as_ref()
    }

    /// Fences the disk for a failover at `point` (durable before it returns). Fencing again
    /// at the same point returns the fence already there; at another point it is refused:
    /// the recovered VM has one origin.
    pub fn fence(&mut self, point: ChangeId) -> Result<FailedOver> {
        if let Some(f) = &self.manifest.failed_over {
            if f.point == point {
                return Ok(f.clone());
            }
            return Err(self.fenced_error(f));
        }
        if !self.manifest.points.iter().any(|p| p.change_id == point) {
            return Err(self.manifest.no_such_point(point));
        }
        let fence = FailedOver {
            point,
            since_unix_ms: (self.clock)(),
        };
        let mut m = self.manifest.clone();
        m.failed_over = Some(fence.clone());
        self.write_manifest(m)?;
        Ok(fence)
    }

    /// Lifts the fence (durable before it returns): pushes commit again. The fence that was
    /// there, if any.
    pub fn unfence(&mut self) -> Result<Option<FailedOver>> {
        let Some(fence) = self.manifest.failed_over.clone() else {
            return Ok(None);
        };
        let mut m = self.manifest.clone();
        m.failed_over = None;
        self.write_manifest(m)?;
        Ok(Some(fence))
    }

    /// Failback's commit: merges `input`, the DR disk as a delta from the newest point to
    /// the agent's cut of its disk once failback made it equal, as a new point although the
    /// disk is fenced (crash-atomic like any merge), then lifts the fence. Killed between the
    /// two, the point is committed and the fence still up: asked again, the merge is
    /// acknowledged as already committed and the fence lifted.
    pub fn ingest_failback<R: Read>(
        &mut self,
        input: R,
        retention: impl Into<Retention>,
        end: impl FnOnce(R) -> Result<PointMeta>,
    ) -> Result<Ingested> {
        if self.manifest.failed_over.is_none() {
            return Err(StoreError::NotFailedOver {
                disk: self.name.clone(),
            });
        }
        let ingested = self.ingest_fenced_or_not(input, retention, end)?;
        self.unfence()?;
        Ok(ingested)
    }

    /// Refuses a merge into a failed-over disk.
    pub(super) fn check_not_fenced(&self) -> Result<()> {
        match &self.manifest.failed_over {
            Some(f) => Err(self.fenced_error(f)),
            None => Ok(()),
        }
    }

    fn fenced_error(&self, f: &FailedOver) -> StoreError {
        StoreError::FailedOver {
            disk: self.name.clone(),
            fence: f.clone(),
        }
    }
}
