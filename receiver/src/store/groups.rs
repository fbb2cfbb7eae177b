//! Consistency groups' points. A group point is one cut of every member of a group (the
//! agent's `replicate --group`): each member's point is pushed and committed on its own, like
//! any push, and only once all are does the agent ask for the group point, which the
//! receiver records in the group's catalog, `<agent>/groups/<group>.json`. Replacing that
//! file (written whole, synced, renamed, the directory synced) is the group's commit: killed
//! at any moment, the catalog holds the group points it held, or those and the new one,
//! never part of one. Member points that no group point names (a group push cut off after
//! some members committed) are ordinary points of their disks.
//!
//! Retention keeps and drops group points whole: the group's catalog keeps the group points
//! the member disks' retention would keep of a disk pushed at the same cuts, and every point
//! a kept group point names is pinned in its disk (`pinned`), whatever that disk's own
//! retention says of it; a group point dropped from the catalog unpins its members, which
//! their disks' retention then drops.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ctk::vfs::{self, Vfs};
use ctk::{ChangeId, Consistency, GroupCutId};
use serde::{Deserialize, Serialize};

use super::{Result, StoreError, committed_points_in, io_err, validate_name};
use crate::retention::Retention;

/// One group point: the group's cut and each member's point of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupPoint {
    pub group_cut: GroupCutId,
    /// When the agent cut the group (unix ms).
    pub cut_unix_ms: u64,
    pub consistency: Consistency,
    /// When the receiver recorded the group point (unix ms).
    pub committed_unix_ms: u64,
    /// Each member's point, by disk name.
    pub members: BTreeMap<String, ChangeId>,
}

/// A group's catalog: its group points, oldest first.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Catalog {
    pub points: Vec<GroupPoint>,
}

/// The directory of the group catalogs under an agent's store root.
const GROUPS_DIR: &str = "groups";
/// Largest catalog read: at most `GROUP_POINTS_MAX` points of at most 64 members.
const CATALOG_BYTES_MAX: u64 = 64 << 20;
/// Most group points a catalog holds (retention keeps far fewer).
pub const GROUP_POINTS_MAX: usize = 10_000;

/// One commit of a group point at a time in this process (the root's lock keeps others out).
static COMMITTING: Mutex<()> = Mutex::new(());

fn path(root: &Path, group: &str) -> PathBuf {
    root.join(GROUPS_DIR).join(format!("{group}.json"))
}

/// The catalog of `group` under the agent's store `root` (empty when it has none).
pub fn load(fs: &dyn Vfs, root: &Path, group: &str) -> Result<Catalog> {
    validate_name(group)?;
    let at = path(root, group);
    let f = match fs.open(&at) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Catalog::default()),
        Err(e) => return Err(io_err(format!("opening {}", at.display()))(e)),
    };
    let mut text = String::new();
    vfs::Cursor::new(f)
        .take(CATALOG_BYTES_MAX)
        .read_to_string(&mut text)
        .map_err(io_err(format!("reading {}", at.display())))?;
    let catalog: Catalog = serde_json::from_str(&text).map_err(|e| StoreError::Damaged {
        disk: format!("group {group}"),
        why: format!("{}: {e}", at.display()),
    })?;
    if catalog.points.len() > GROUP_POINTS_MAX {
        return Err(StoreError::Damaged {
            disk: format!("group {group}"),
            why: format!("{} holds more than {GROUP_POINTS_MAX} points", at.display()),
        });
    }
    Ok(catalog)
}

/// The groups that have a catalog under `root`, sorted.
pub fn groups(fs: &dyn Vfs, root: &Path) -> Result<Vec<String>> {
    let names = match fs.list(&root.join(GROUPS_DIR)) {
        Ok(names) => names,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("listing the group catalogs")(e)),
    };
    Ok(names
        .iter()
        .filter_map(|n| n.strip_suffix(".json"))
        .filter(|n| validate_name(n).is_ok())
        .map(str::to_owned)
        .collect())
}

/// Every disk any group point of `group` names, sorted, once each.
pub fn member_disks(fs: &dyn Vfs, root: &Path, group: &str) -> Result<Vec<String>> {
    let mut disks: Vec<String> = load(fs, root, group)?
        .points
        .into_iter()
        .flat_map(|p| p.members.into_keys())
        .collect();
    disks.sort();
    disks.dedup();
    Ok(disks)
}

/// Every point of disk `disk` that a group point under `root` names: retention keeps them.
pub fn pinned(fs: &dyn Vfs, root: &Path, disk: &str) -> Result<Vec<ChangeId>> {
    let mut ids = Vec::new();
    for group in groups(fs, root)? {
        for p in load(fs, root, &group)?.points {
            ids.extend(p.members.get(disk).copied());
        }
    }
    Ok(ids)
}

/// Records group point `point` of `group` once every member's point is committed, then
/// drops the group points `retention` does not keep (whole). `already`: it was recorded
/// before (the same members: a request asked again).
pub fn commit(
    fs: &dyn Vfs,
    root: &Path,
    group: &str,
    point: GroupPoint,
    retention: &Retention,
    now_ms: u64,
) -> Result<bool> {
    let _one = COMMITTING.lock().unwrap_or_else(|e| e.into_inner());
    validate_name(group)?;
    if point.members.is_empty() {
        return Err(StoreError::Mismatch(format!(
            "group {group:?}: a group point names at least one disk"
        )));
    }
    let mut catalog = load(fs, root, group)?;
    if let Some(known) = catalog
        .points
        .iter()
        .find(|p| p.group_cut == point.group_cut)
    {
        if known.members == point.members {
            return Ok(true);
        }
        return Err(StoreError::Mismatch(format!(
            "group {group:?} cut {} is recorded with other members' points",
            point.group_cut
        )));
    }
    for (disk, id) in &point.members {
        validate_name(disk)?;
        if !committed_points_in(fs, root, disk)?
            .iter()
            .any(|p| p.change_id == *id)
        {
            return Err(StoreError::NoSuchPoint(format!(
                "{id} of disk {disk:?} (a member of group {group:?} cut {}): push every member \
                 before the group point",
                point.group_cut
            )));
        }
    }
    if let Some(newest) = catalog.points.last()
        && newest.cut_unix_ms > point.cut_unix_ms
    {
        return Err(StoreError::Mismatch(format!(
            "group {group:?} cut {} is older than its newest group point {}",
            point.group_cut, newest.group_cut
        )));
    }
    catalog.points.push(point);
    let times: Vec<u64> = catalog.points.iter().map(|p| p.cut_unix_ms).collect();
    let mut keep = crate::retention::select(&times, now_ms, retention);
    let levels: Vec<Option<Consistency>> =
        catalog.points.iter().map(|p| Some(p.consistency)).collect();
    crate::retention::keep_newest_of_each(&levels, &mut keep);
    let mut keep = keep.into_iter();
    catalog.points.retain(|_| keep.next().unwrap_or(true));
    if catalog.points.len() > GROUP_POINTS_MAX {
        catalog.points.remove(0);
    }
    write(fs, root, group, &catalog)?;
    Ok(false)
}

/// Replaces the catalog whole, durably: the group's commit.
fn write(fs: &dyn Vfs, root: &Path, group: &str, catalog: &Catalog) -> Result<()> {
    let dir = root.join(GROUPS_DIR);
    let doing = format!("writing the catalog of group {group:?}");
    fs.create_dir_all(&dir).map_err(io_err(doing.clone()))?;
    let tmp = dir.join(format!("{group}.json.tmp"));
    let text = serde_json::to_vec_pretty(catalog).expect("a catalog serialises");
    let f = fs.create(&tmp).map_err(io_err(doing.clone()))?;
    f.write_all_at(&text, 0)
        .and_then(|()| f.sync())
        .map_err(io_err(doing.clone()))?;
    fs.rename(&tmp, &path(root, group))
        .map_err(io_err(doing.clone()))?;
    fs.sync_dir(&dir).map_err(io_err(doing))
}

/// The group point `which` names (its group cut; `None`: the newest) of `group`.
pub fn find(
    fs: &dyn Vfs,
    root: &Path,
    group: &str,
    which: Option<GroupCutId>,
) -> Result<GroupPoint> {
    let catalog = load(fs, root, group)?;
    let found = match which {
        None => catalog.points.last(),
        Some(id) => catalog.points.iter().find(|p| p.group_cut == id),
    };
    found.cloned().ok_or_else(|| {
        let kept: Vec<String> = catalog
            .points
            .iter()
            .rev()
            .take(10)
            .map(|p| p.group_cut.to_string())
            .collect();
        StoreError::NoSuchPoint(match (which, kept.is_empty()) {
            (_, true) => format!("of group {group:?}: it has no group point"),
            (Some(id), false) => format!(
                "{id} of group {group:?} (the newest it keeps: {})",
                kept.join(", ")
            ),
            (None, false) => unreachable!("a newest exists when any does"),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{DiskStore, PointMeta};
    use ctk::Generation;
    use ctk::delta::{DeltaHeader, DeltaWriter, WriteOptions};
    use ctk::vfs::RealFs;

    /// A first full of disk `disk` under `root` committed as its one point.
    fn full(root: &Path, disk: &str) -> ChangeId {
        let id = ChangeId::new(Generation(0x5eed), 1);
        let header = DeltaHeader {
            disk_id: disk.into(),
            disk_size: 8192,
            block_size: 4096,
            from: None,
            to: id,
        };
        let mut w = DeltaWriter::new(Vec::new(), &header, WriteOptions::default()).unwrap();
        w.write_extent(0, &[7; 8192]).unwrap();
        let bytes = w.finish().unwrap().0;
        let (mut s, _) = DiskStore::open(root, disk).unwrap();
        s.ingest(bytes.as_slice(), 10usize, |_| Ok(PointMeta::default()))
            .unwrap();
        id
    }

    fn point(cut: u128, cut_unix_ms: u64, members: &[(&str, ChangeId)]) -> GroupPoint {
        GroupPoint {
            group_cut: GroupCutId(cut),
            cut_unix_ms,
            consistency: Consistency::Crash,
            committed_unix_ms: cut_unix_ms,
            members: members.iter().map(|(d, id)| (d.to_string(), *id)).collect(),
        }
    }

    #[test]
    fn group_points_commit_once_whole_in_order_and_retention_drops_them_whole() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let (a, b) = (full(root, "a"), full(root, "b"));
        let keep = Retention::from(10);
        let both = [("a", a), ("b", b)];
        let commit = |p: GroupPoint, keep: &Retention| commit(&RealFs, root, "g", p, keep, 1000);
        assert!(!commit(point(1, 100, &both), &keep).unwrap());
        // Asked again (an answer lost): already, nothing added.
        assert!(commit(point(1, 100, &both), &keep).unwrap());
        assert_eq!(load(&RealFs, root, "g").unwrap().points.len(), 1);
        // The same group cut with other members, an older cut, a member with no such point.
        let refused = [
            commit(point(1, 100, &[("a", a)]), &keep),
            commit(point(2, 50, &both), &keep),
            commit(point(3, 150, &[("a", a), ("c", b)]), &keep),
            commit(point(4, 150, &[]), &keep),
        ];
        assert!(matches!(refused[0], Err(StoreError::Mismatch(_))));
        assert!(matches!(refused[1], Err(StoreError::Mismatch(_))));
        assert!(matches!(&refused[2], Err(StoreError::NoSuchPoint(why)) if why.contains("\"c\"")));
        assert!(matches!(refused[3], Err(StoreError::Mismatch(_))));
        assert_eq!(load(&RealFs, root, "g").unwrap().points.len(), 1);
        // Keeping one: the older group point goes whole; its members stay pinned by the new.
        assert!(!commit(point(5, 200, &both), &Retention::from(1)).unwrap());
        let kept = load(&RealFs, root, "g").unwrap().points;
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].group_cut, GroupCutId(5));
        assert_eq!(pinned(&RealFs, root, "a").unwrap(), [a]);
        assert_eq!(
            find(&RealFs, root, "g", None).unwrap().group_cut,
            GroupCutId(5)
        );
        let missing = find(&RealFs, root, "g", Some(GroupCutId(1))).unwrap_err();
        assert!(
            missing.to_string().contains("the newest it keeps"),
            "{missing}"
        );
        // A catalog that is not one is damage, said as such, never an empty group.
        std::fs::write(root.join("groups/g.json"), b"{\"points\": [oops").unwrap();
        assert!(matches!(
            load(&RealFs, root, "g"),
            Err(StoreError::Damaged { .. })
        ));
        assert!(pinned(&RealFs, root, "a").is_err());
    }
}
