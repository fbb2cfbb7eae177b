//! Which filesystem a freeze target is, and whether freezing it can quiesce a protected disk.
//!
//! `FIFREEZE` on a directory freezes the filesystem that holds it, whatever that is: a
//! target that is not a mount point (its filesystem not mounted yet, a typo) freezes the one
//! above it, often `/`, for the whole freeze timeout, while the disk's own filesystem goes
//! on writing. And a filesystem that does not write through this agent's NBD front is not
//! the disk's at all: freezing it quiesces nothing the cut captures. So before each freeze,
//! every target is checked:
//! - it is the mount point of a mounted filesystem (`/proc/self/mountinfo`), and not `/`;
//! - the filesystem sits on a block device, followed down through partitions and
//!   device-mapper layers (`/sys/dev/block`) to the devices below, and each of those can be
//!   this agent's export: an NBD device (`nbd-client`, `qemu-nbd -c`), or a loop device over
//!   a file on a FUSE filesystem (`nbdfuse`). Which export such a device talks to cannot be
//!   told from here; anything else (a disk of the host, a loop device over a plain file) can
//!   be told, and is refused. A loop device over the protected image itself is refused by
//!   name: its writes would bypass the tracker.

use std::path::{Path, PathBuf};

/// Why a freeze target is refused.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("freeze target {}: never freeze / (it holds the host, not the disk)", .0.display())]
    Root(PathBuf),
    #[error("freeze target {}: not an absolute path", .0.display())]
    Relative(PathBuf),
    #[error(
        "freeze target {}: not a mount point (it is inside the filesystem mounted at {}); \
         freezing it would freeze that one. Mount the disk's filesystem there first",
        path.display(), within.display()
    )]
    NotAMountPoint { path: PathBuf, within: PathBuf },
    #[error(
        "freeze target {}: its filesystem is on {device}, {why}; only filesystems on this \
         agent's NBD export can be frozen for its cuts (through nbd-client, or nbdfuse and a \
         loop device)",
        path.display()
    )]
    NotOnTheDisk {
        path: PathBuf,
        device: String,
        why: String,
    },
    #[error(
        "freeze target {}: mounted from {device}, a loop device over the protected image \
         itself: writes there bypass the agent and are not tracked. Mount the agent's NBD \
         export instead",
        path.display()
    )]
    BypassesTracker { path: PathBuf, device: String },
    #[error("freeze target {}: {why}", path.display())]
    Unreadable { path: PathBuf, why: String },
}

/// One line of `/proc/self/mountinfo`, the fields used here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    pub mount_point: PathBuf,
    pub major: u32,
    pub minor: u32,
    pub fstype: String,
    pub source: String,
}

/// Parses `/proc/self/mountinfo` (`36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3
/// /dev/root rw`), undoing the octal escapes of spaces and the like. Malformed lines are
/// skipped.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let left: Vec<&str> = left.split(' ').collect();
            let mut right = right.split(' ');
            let (major, minor) = left.get(2)?.split_once(':')?;
            Some(Mount {
                mount_point: PathBuf::from(unescape(left.get(4)?)),
                major: major.parse().ok()?,
                minor: minor.parse().ok()?,
                fstype: right.next()?.to_owned(),
                source: unescape(right.next().unwrap_or("")),
            })
        })
        .collect()
}

fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What the system says about block devices: the seams a test can replace.
pub trait BlockInfo {
    /// The kernel name of a block device (`loop3`, `nbd0p1`, `dm-2`, `vda1`).
    fn name(&self, major: u32, minor: u32) -> Option<String>;
    /// The whole device a partition belongs to (`nbd0` for `nbd0p1`), `None` if not one.
    fn parent(&self, name: &str) -> Option<String>;
    /// The devices a device-mapper (or md) device sits on.
    fn slaves(&self, name: &str) -> Vec<String>;
    /// A loop device's backing file, `None` when it has none.
    fn loop_backing(&self, name: &str) -> Option<PathBuf>;
    /// Whether a file lives on a FUSE filesystem.
    fn on_fuse(&self, path: &Path) -> bool;
    /// Whether `path` is the protected image.
    fn is_image(&self, path: &Path) -> bool;
}

/// `BlockInfo` from `/sys`, for the disk whose image is `image` (device and inode).
pub struct SysBlock {
    pub image: Option<(u64, u64)>,
}

impl BlockInfo for SysBlock {
    fn name(&self, major: u32, minor: u32) -> Option<String> {
        let link = std::fs::read_link(format!("/sys/dev/block/{major}:{minor}")).ok()?;
        Some(link.file_name()?.to_string_lossy().into_owned())
    }
    fn parent(&self, name: &str) -> Option<String> {
        let dir = PathBuf::from(format!("/sys/class/block/{name}"));
        if !dir.join("partition").exists() {
            return None;
        }
        let real = std::fs::canonicalize(&dir).ok()?;
        Some(real.parent()?.file_name()?.to_string_lossy().into_owned())
    }
    fn slaves(&self, name: &str) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(format!("/sys/class/block/{name}/slaves")) else {
            return Vec::new();
        };
        let mut out: Vec<String> = entries
            .filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
            .collect();
        out.sort();
        out
    }
    fn loop_backing(&self, name: &str) -> Option<PathBuf> {
        let text =
            std::fs::read_to_string(format!("/sys/class/block/{name}/loop/backing_file")).ok()?;
        Some(PathBuf::from(text.trim_end_matches('\n')))
    }
    fn on_fuse(&self, path: &Path) -> bool {
        const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;
        let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
            return false;
        };
        // SAFETY: statfs writes into the zeroed struct we own; the path is NUL-terminated.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        (unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0) && st.f_type as i64 == FUSE_SUPER_MAGIC
    }
    fn is_image(&self, path: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        match (self.image, std::fs::metadata(path)) {
            (Some((dev, ino)), Ok(m)) => m.dev() == dev && m.ino() == ino,
            _ => false,
        }
    }
}

/// Checks one freeze target against the mount table `mounts` (see the module's doc).
pub fn check_target(
    path: &Path,
    mounts: &[Mount],
    info: &dyn BlockInfo,
) -> Result<(), TargetError> {
    if !path.is_absolute() {
        return Err(TargetError::Relative(path.to_owned()));
    }
    let real = std::fs::canonicalize(path).map_err(|e| TargetError::Unreadable {
        path: path.to_owned(),
        why: e.to_string(),
    })?;
    if real == Path::new("/") {
        return Err(TargetError::Root(path.to_owned()));
    }
    // The topmost mount at that point is the one a freeze reaches.
    let Some(mount) = mounts.iter().rev().find(|m| m.mount_point == real) else {
        let within = mounts
            .iter()
            .filter(|m| real.starts_with(&m.mount_point))
            .max_by_key(|m| m.mount_point.as_os_str().len())
            .map_or_else(|| PathBuf::from("/"), |m| m.mount_point.clone());
        return Err(TargetError::NotAMountPoint {
            path: path.to_owned(),
            within,
        });
    };
    let device = match (mount.major, info.name(mount.major, mount.minor)) {
        (0, _) | (_, None) => {
            return Err(TargetError::NotOnTheDisk {
                path: path.to_owned(),
                device: format!("{} ({})", mount.source, mount.fstype),
                why: "which is not a block device".into(),
            });
        }
        (_, Some(name)) => name,
    };
    check_device(path, &device, info, 0)
}

/// Follows `device` down to the devices it is made of; each must be one this agent may
/// serve. Bounded: device stacks are a few layers deep.
fn check_device(
    path: &Path,
    device: &str,
    info: &dyn BlockInfo,
    depth: u32,
) -> Result<(), TargetError> {
    let refuse = |why: String| TargetError::NotOnTheDisk {
        path: path.to_owned(),
        device: format!("/dev/{device}"),
        why,
    };
    if depth > 8 {
        return Err(refuse(
            "a device stack deeper than this agent follows".into(),
        ));
    }
    let whole = info.parent(device).unwrap_or_else(|| device.to_owned());
    let slaves = info.slaves(&whole);
    if !slaves.is_empty() {
        for s in slaves {
            check_device(path, &s, info, depth + 1)?;
        }
        return Ok(());
    }
    if whole.starts_with("nbd") {
        return Ok(());
    }
    if whole.starts_with("loop") {
        return match info.loop_backing(&whole) {
            None => Err(refuse("a loop device with no backing file".into())),
            Some(file) if info.is_image(&file) => Err(TargetError::BypassesTracker {
                path: path.to_owned(),
                device: format!("/dev/{whole}"),
            }),
            Some(file) if info.on_fuse(&file) => Ok(()),
            Some(file) => Err(refuse(format!(
                "a loop device over {}, which does not go through this agent",
                file.display()
            ))),
        };
    }
    Err(refuse("a device this agent does not serve".into()))
}

/// Checks every target against the system's current mount table.
pub fn check_targets(targets: &[PathBuf], image: Option<(u64, u64)>) -> Result<(), TargetError> {
    let text =
        std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| TargetError::Unreadable {
            path: PathBuf::from("/proc/self/mountinfo"),
            why: e.to_string(),
        })?;
    let mounts = parse_mountinfo(&text);
    let info = SysBlock { image };
    for t in targets {
        check_target(t, &mounts, &info)?;
    }
    Ok(())
}

/// What can be checked of a target before its filesystem is mounted (at configuration
/// load: a disk's filesystem is usually mounted from the agent's own export, after the
/// agent starts): it is absolute and is not `/`. A target already mounted is checked whole.
pub fn check_target_at_load(path: &Path, image: Option<(u64, u64)>) -> Result<(), TargetError> {
    if !path.is_absolute() {
        return Err(TargetError::Relative(path.to_owned()));
    }
    let real = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    if real == Path::new("/") {
        return Err(TargetError::Root(path.to_owned()));
    }
    match check_targets(std::slice::from_ref(&path.to_owned()), image) {
        Err(TargetError::NotAMountPoint { .. }) | Err(TargetError::Unreadable { .. }) => {
            tracing::warn!(
                target = %path.display(),
                "freeze target is not mounted yet: application-consistent cuts are refused \
                 until the disk's filesystem is mounted there"
            );
            Ok(())
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn mountinfo_parses_with_escapes_and_optional_fields() {
        let text = "22 1 252:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n\
                    40 22 7:3 / /mnt/with\\040space rw shared:9 master:2 - ext4 /dev/loop3 rw\n\
                    garbage line\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[1].mount_point, PathBuf::from("/mnt/with space"));
        assert_eq!((m[1].major, m[1].minor), (7, 3));
        assert_eq!(m[1].fstype, "ext4");
        assert_eq!(m[1].source, "/dev/loop3");
    }

    /// A made-up machine: devices by major:minor, partitions, slaves, loop backings.
    #[derive(Default)]
    struct Fake {
        names: HashMap<(u32, u32), String>,
        parents: HashMap<String, String>,
        slaves: HashMap<String, Vec<String>>,
        loops: HashMap<String, PathBuf>,
        fuse: Vec<PathBuf>,
        image: Option<PathBuf>,
    }
    impl BlockInfo for Fake {
        fn name(&self, major: u32, minor: u32) -> Option<String> {
            self.names.get(&(major, minor)).cloned()
        }
        fn parent(&self, name: &str) -> Option<String> {
            self.parents.get(name).cloned()
        }
        fn slaves(&self, name: &str) -> Vec<String> {
            self.slaves.get(name).cloned().unwrap_or_default()
        }
        fn loop_backing(&self, name: &str) -> Option<PathBuf> {
            self.loops.get(name).cloned()
        }
        fn on_fuse(&self, path: &Path) -> bool {
            self.fuse.iter().any(|f| path.starts_with(f))
        }
        fn is_image(&self, path: &Path) -> bool {
            self.image.as_deref() == Some(path)
        }
    }

    fn mount(point: &Path, major: u32, minor: u32) -> Mount {
        Mount {
            mount_point: point.to_owned(),
            major,
            minor,
            fstype: "ext4".into(),
            source: "/dev/x".into(),
        }
    }

    #[test]
    fn targets_are_refused_unless_they_can_be_this_agents_export() {
        let dir = tempfile::tempdir().unwrap();
        let d = std::fs::canonicalize(dir.path()).unwrap();
        let names = ["fuse", "plain", "host", "lvm", "img", "nbd", "tmp", "sub"];
        for n in names {
            std::fs::create_dir_all(d.join(n)).unwrap();
        }
        let mut fake = Fake::default();
        for (i, n) in ["loop0", "loop1", "vda1", "dm-0", "loop2", "nbd0p1"]
            .iter()
            .enumerate()
        {
            fake.names.insert((7, i as u32), n.to_string());
        }
        fake.parents.insert("vda1".into(), "vda".into());
        fake.parents.insert("nbd0p1".into(), "nbd0".into());
        fake.loops
            .insert("loop0".into(), PathBuf::from("/run/f/nbd"));
        fake.loops
            .insert("loop1".into(), PathBuf::from("/var/plain.img"));
        fake.loops
            .insert("loop2".into(), PathBuf::from("/var/disk.img"));
        fake.slaves
            .insert("dm-0".into(), vec!["nbd0p1".into(), "loop0".into()]);
        fake.fuse.push(PathBuf::from("/run/f"));
        fake.image = Some(PathBuf::from("/var/disk.img"));
        let mounts = vec![
            mount(Path::new("/"), 252, 1),
            mount(&d.join("fuse"), 7, 0),
            mount(&d.join("plain"), 7, 1),
            mount(&d.join("host"), 7, 2),
            mount(&d.join("lvm"), 7, 3),
            mount(&d.join("img"), 7, 4),
            mount(&d.join("nbd"), 7, 5),
            mount(&d.join("tmp"), 0, 40),
        ];
        let check = |p: &str| check_target(&d.join(p), &mounts, &fake);
        check("fuse").unwrap();
        check("nbd").unwrap();
        check("lvm").unwrap();
        assert!(matches!(
            check("plain"),
            Err(TargetError::NotOnTheDisk { .. })
        ));
        assert!(matches!(
            check("host"),
            Err(TargetError::NotOnTheDisk { .. })
        ));
        assert!(matches!(
            check("img"),
            Err(TargetError::BypassesTracker { .. })
        ));
        assert!(matches!(
            check("tmp"),
            Err(TargetError::NotOnTheDisk { .. })
        ));
        match check("sub") {
            Err(TargetError::NotAMountPoint { within, .. }) => {
                assert_eq!(within, PathBuf::from("/"))
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            check_target(Path::new("/"), &mounts, &fake),
            Err(TargetError::Root(_))
        ));
        assert!(matches!(
            check_target(Path::new("rel"), &mounts, &fake),
            Err(TargetError::Relative(_))
        ));
        // A stacked device with one leg off the agent is refused whole.
        fake.slaves
            .insert("dm-0".into(), vec!["nbd0p1".into(), "vda1".into()]);
        assert!(matches!(
            check_target(&d.join("lvm"), &mounts, &fake),
            Err(TargetError::NotOnTheDisk { .. })
        ));
    }
}
