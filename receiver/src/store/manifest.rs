//! The manifest: the committed points of a disk and the merge in progress, replaced whole
//! (write, fsync, rename, fsync the directory) and checked against its own CRC32 at every read.

use super::*;

/// Reads a manifest (`None`: there is none) and checks it is of this disk and version.
pub(super) fn read_manifest(fs: &dyn Vfs, path: &Path, name: &str) -> Result<Option<Manifest>> {
    let f = match fs.open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("opening the manifest")(e)),
    };
    let mut text = String::new();
    vfs::Cursor::new(f)
        .take(MANIFEST_LEN_MAX)
        .read_to_string(&mut text)
        .map_err(io_err("reading the manifest"))?;
    let m: Manifest = serde_json::from_str(&text).map_err(|e| StoreError::Damaged {
        disk: name.into(),
        why: format!("manifest.json: {e}"),
    })?;
    if !(1..=MANIFEST_VERSION).contains(&m.version) || m.disk != name || m.points.len() > POINTS_MAX
    {
        return Err(StoreError::Damaged {
            disk: name.into(),
            why: "manifest.json is of another version or disk".into(),
        });
    }
    // Every byte of what the store commits to is checked before it is used: a bad read of
    // the manifest (a flipped digit in a ChangeId or an undo's name) would otherwise be
    // written back by the next merge as the truth.
    if m.version >= 2 && m.checksum.as_deref() != Some(m.checksum().as_str()) {
        return Err(StoreError::Damaged {
            disk: name.into(),
            why: "manifest.json does not match its checksum (a bad read, or damage)".into(),
        });
    }
    Ok(Some(m))
}

/// One committed restore point.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Point {
    pub change_id: ChangeId,
    /// The point this one was merged onto (none for the first full).
    pub from: Option<ChangeId>,
    pub disk_size: u64,
    pub committed_unix_ms: u64,
    /// Undo file (relative to the disk directory) back to the previous point, if kept.
    pub undo: Option<String>,
    pub delta_bytes: u64,
    /// When the agent cut it (unix ms), if the agent said.
    #[serde(default)]
    pub cut_unix_ms: Option<u64>,
    /// "crash" or "application", if the agent said.
    #[serde(default)]
    pub consistency: Option<Consistency>,
    /// The digest of the whole image as of this point (`ctk::digest`), as merged here.
    #[serde(default)]
    pub image_digest: Option<ImageDigest>,
    /// The agent sent its own digest of the image and it matched: the point is checked end
    /// to end. False for points the agent could not vouch for.
    #[serde(default)]
    pub digest_checked: bool,
    /// The last drill on this point (`ctk-receiver drill`): absent until one is recorded, so
    /// manifests without drills keep their bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tested: Option<Box<Tested>>,
}

/// How a drill on a point went, as the operator said when stopping it.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DrillResult {
    Passed,
    Failed,
}

impl std::str::FromStr for DrillResult {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<DrillResult, String> {
        match s {
            "passed" => Ok(DrillResult::Passed),
            "failed" => Ok(DrillResult::Failed),
            _ => Err(format!("{s:?}: a drill's result is passed or failed")),
        }
    }
}

/// A drill recorded on a point.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Tested {
    pub started_unix_ms: u64,
    pub stopped_unix_ms: u64,
    pub result: DrillResult,
    /// What the operator noted (at most `NOTE_MAX` bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Longest drill note kept (the manifest is read whole, bounded).
pub const NOTE_MAX: usize = 1024;

/// What the sender says about a point: when it was cut and how consistent it is.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointMeta {
    pub cut_unix_ms: Option<u64>,
    pub consistency: Option<Consistency>,
    /// The agent's digest of the whole image as of the cut, if it sent one.
    #[serde(default)]
    pub image_digest: Option<ImageDigest>,
}

/// The merge in progress, as the manifest records it before full.img is touched.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(from = "ApplyingRecord", into = "ApplyingRecord")]
pub(super) enum Applying {
    /// A verified, durable staged delta: after a crash it is applied again, or undone with
    /// `undo` (none when the store had no point: undone by emptying full.img).
    Staged {
        change_id: ChangeId,
        staged: String,
        undo: Option<String>,
        meta: PointMeta,
    },
    /// A first full written straight into full.img as it arrived (no staged copy): after a
    /// crash it can only be undone, which empties the store.
    Direct {
        change_id: ChangeId,
        meta: PointMeta,
    },
}

impl Applying {
    pub(super) fn change_id(&self) -> ChangeId {
        match self {
            Applying::Staged { change_id, .. } | Applying::Direct { change_id, .. } => *change_id,
        }
    }

    /// The staged delta, relative to the disk's directory (none for a direct full).
    pub(super) fn staged(&self) -> Option<&str> {
        match self {
            Applying::Staged { staged, .. } => Some(staged),
            Applying::Direct { .. } => None,
        }
    }

    pub(super) fn undo(&self) -> Option<&str> {
        match self {
            Applying::Staged { undo, .. } => undo.as_deref(),
            Applying::Direct { .. } => None,
        }
    }

    pub(super) fn meta(&self) -> &PointMeta {
        match self {
            Applying::Staged { meta, .. } | Applying::Direct { meta, .. } => meta,
        }
    }
}

/// `Applying` as manifest.json holds it (docs/format.md section 5): one object whose
/// `direct` says which kind, `staged` empty for a direct full.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
struct ApplyingRecord {
    change_id: ChangeId,
    staged: String,
    undo: Option<String>,
    #[serde(default)]
    meta: PointMeta,
    #[serde(default)]
    direct: bool,
}

impl From<ApplyingRecord> for Applying {
    fn from(r: ApplyingRecord) -> Applying {
        if r.direct {
            Applying::Direct {
                change_id: r.change_id,
                meta: r.meta,
            }
        } else {
            Applying::Staged {
                change_id: r.change_id,
                staged: r.staged,
                undo: r.undo,
                meta: r.meta,
            }
        }
    }
}

impl From<Applying> for ApplyingRecord {
    fn from(a: Applying) -> ApplyingRecord {
        match a {
            Applying::Staged {
                change_id,
                staged,
                undo,
                meta,
            } => ApplyingRecord {
                change_id,
                staged,
                undo,
                meta,
                direct: false,
            },
            Applying::Direct { change_id, meta } => ApplyingRecord {
                change_id,
                staged: String::new(),
                undo: None,
                meta,
                direct: true,
            },
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub(super) struct Manifest {
    pub(super) version: u32,
    pub(super) disk: String,
    pub(super) block_size: Option<u32>,
    pub(super) points: Vec<Point>,
    pub(super) applying: Option<Applying>,
    /// Set while the disk is failed over (`fence`): absent otherwise, so manifests of disks
    /// never failed over keep their bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) failed_over: Option<FailedOver>,
    /// CRC32 (hex) of the manifest's compact JSON with this field absent. Version 2 on; a
    /// manifest of version 1 has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) checksum: Option<String>,
}

/// The manifest version this code writes: 2 adds the checksum.
pub(super) const MANIFEST_VERSION: u32 = 2;

impl Manifest {
    /// The points form one chain, oldest first: each after the first was merged onto the
    /// one before it (retention re-links a point when it folds the ones between), no point
    /// is listed twice, and there are at most `POINTS_MAX`.
    pub(super) fn chain_holds(&self) -> bool {
        let linked = self
            .points
            .windows(2)
            .all(|w| w[1].from == Some(w[0].change_id));
        let mut ids: Vec<String> = self
            .points
            .iter()
            .map(|p| p.change_id.to_string())
            .collect();
        ids.sort();
        ids.dedup();
        linked && ids.len() == self.points.len() && self.points.len() <= POINTS_MAX
    }

    /// The error for point `id` when this manifest does not keep it: names the newest
    /// points it does keep, so the caller sees what to ask for instead.
    pub(super) fn no_such_point(&self, id: ChangeId) -> StoreError {
        let kept: Vec<String> = self
            .points
            .iter()
            .rev()
            .take(8)
            .map(|p| p.change_id.to_string())
            .collect();
        StoreError::NoSuchPoint(if kept.is_empty() {
            format!("{id} of disk {:?} (it keeps none yet)", self.disk)
        } else {
            format!(
                "{id} of disk {:?} (the newest it keeps: {}{}; `ctk-receiver points` lists them)",
                self.disk,
                kept.join(", "),
                if self.points.len() > kept.len() {
                    ", ..."
                } else {
                    ""
                }
            )
        })
    }

    pub(super) fn checksum(&self) -> String {
        let mut bare = self.clone();
        bare.checksum = None;
        let text = serde_json::to_vec(&bare).expect("a manifest serialises");
        format!("{:08x}", crc32fast::hash(&text))
    }
}

impl DiskStore {
    pub(super) fn write_manifest(&mut self, mut manifest: Manifest) -> Result<()> {
        debug_assert!(
            manifest.chain_holds(),
            "manifest points: {:?}",
            manifest.points
        );
        manifest.version = MANIFEST_VERSION;
        manifest.checksum = None;
        manifest.checksum = Some(manifest.checksum());
        let text = serde_json::to_vec_pretty(&manifest).expect("a manifest serialises");
        self.replace_file(
            &self.dir.join("manifest.json.tmp"),
            &self.dir.join("manifest.json"),
            &text,
            "writing the manifest",
        )?;
        // From the rename on, the new manifest is what readers see and may be what a crash
        // leaves, so everything after builds on it even if the directory sync fails: rolling
        // back a merge the visible manifest already calls committed would destroy the point
        // (a first full emptied under its own committed manifest).
        self.manifest = manifest;
        let synced = self.sync_dir(&self.dir);
        // Live readers of exposed points rebuild their maps before full.img changes.
        self.bump_generation()?;
        synced
    }

    /// Records a drill's outcome on point `change_id` (the last drill replaces the one
    /// before).
    pub fn record_drill(&mut self, change_id: ChangeId, mut tested: Tested) -> Result<()> {
        if let Some(note) = &mut tested.note
            && note.len() > NOTE_MAX
        {
            let mut cut = NOTE_MAX;
            while !note.is_char_boundary(cut) {
                cut -= 1;
            }
            note.truncate(cut);
        }
        let mut m = self.manifest.clone();
        let point = m
            .points
            .iter_mut()
            .find(|p| p.change_id == change_id)
            .ok_or_else(|| self.manifest.no_such_point(change_id))?;
        point.tested = Some(Box::new(tested));
        self.write_manifest(m)
    }

    pub(super) fn point_for(
        &self,
        staged: &Path,
        undo: Option<String>,
        meta: PointMeta,
    ) -> Result<Point> {
        let reader = DeltaReader::new(self.reader(staged, "opening the staged delta")?)?;
        let h = reader.header().clone();
        let delta_bytes = self.fs.open(staged).and_then(|f| f.len()).unwrap_or(0);
        Ok(Point {
            change_id: h.to,
            from: h.from,
            disk_size: h.disk_size,
            committed_unix_ms: (self.clock)(),
            undo,
            delta_bytes,
            cut_unix_ms: meta.cut_unix_ms,
            consistency: meta.consistency,
            image_digest: None,
            digest_checked: false,
            tested: None,
        })
    }
}
