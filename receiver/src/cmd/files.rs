//! `files`: one file copied out of a point's filesystem, nothing left mounted after.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::json;

use ctk_receiver::export::MountedPoint;

use super::PointSel;

#[derive(Args)]
#[command(after_help = "Example:\n  \
ctk-receiver files --store /srv/ctk/host1 --disk vm1 --point latest --path /etc/hosts -o hosts\n\n\
The point's filesystem is mounted read-only for the copy (nbdfuse, a read-only loop device, \
partitions found on MBR and GPT disks; whatever this kernel mounts: ext4, XFS, vfat, ...) and \
unmounted after, whatever happens. Needs root, nbdfuse and fusermount3 (libnbd-bin, fuse3).")]
pub struct Files {
    #[command(flatten)]
    pub sel: PointSel,
    /// The file's path inside the point's filesystem, e.g. /etc/hosts.
    #[arg(long)]
    pub path: PathBuf,
    /// Which partition holds it (1-based), on a partitioned disk; default: the first that
    /// mounts.
    #[arg(long)]
    pub partition: Option<u32>,
    /// Where to write the copy (must not exist).
    #[arg(short = 'o', long)]
    pub output: PathBuf,
    #[arg(long)]
    pub json: bool,
}

/// `path` as a path under a mount's root: absolute or relative, never leaving it.
fn inside(path: &Path) -> Result<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => out.push(n),
            Component::ParentDir | Component::Prefix(_) => {
                bail!(
                    "{}: give the path from the filesystem's root, without ..",
                    path.display()
                )
            }
        }
    }
    if out.as_os_str().is_empty() {
        bail!("--path names the filesystem's root, not a file");
    }
    Ok(out)
}

pub fn files(args: Files) -> Result<()> {
    let Files {
        sel,
        path,
        partition,
        output,
        json,
    } = args;
    let relative = inside(&path)?;
    if output.exists() {
        bail!("{} exists: give -o a new file", output.display());
    }
    let (_, exposure) = sel.expose("opening a point of")?;
    let exposure = Arc::new(exposure);
    let disk = sel.sel.disk;
    let change_id = exposure.point().change_id;
    let work = std::env::temp_dir().join(format!("ctk-files-{}", std::process::id()));
    let mounted = MountedPoint::mount(exposure, &work.join("root"), &work, partition)
        .with_context(|| format!("mounting the filesystem of {change_id}"))?;
    let copied = copy_out(&mounted.dir, &relative, &path, &output);
    drop(mounted);
    let _ = std::fs::remove_dir_all(&work);
    let bytes = copied?;
    if json {
        println!(
            "{}",
            json!({"disk": disk, "point": change_id.to_string(), "path": path, "output": output, "bytes": bytes})
        );
    } else {
        println!(
            "{} of {disk} as of {change_id}: {bytes} bytes to {}",
            path.display(),
            output.display()
        );
    }
    Ok(())
}

/// Copies `relative` under `root` to `output`: a regular file only, and never through a
/// symbolic link that leads out of the point's filesystem (onto this host's own files).
fn copy_out(root: &Path, relative: &Path, shown: &Path, output: &Path) -> Result<u64> {
    let joined = root.join(relative);
    std::fs::symlink_metadata(&joined)
        .with_context(|| format!("{} is not in the point's filesystem", shown.display()))?;
    let real = joined
        .canonicalize()
        .with_context(|| format!("resolving {}", shown.display()))?;
    let root_real = root.canonicalize()?;
    if !real.starts_with(&root_real) {
        bail!(
            "{} is a symbolic link out of the point's filesystem ({}): give the path it means \
             inside the point",
            shown.display(),
            std::fs::read_link(&joined)
                .map(|t| t.display().to_string())
                .unwrap_or_default()
        );
    }
    let target = std::fs::metadata(&real)?;
    if !target.is_file() {
        bail!(
            "{} is not a regular file ({})",
            shown.display(),
            if target.is_dir() {
                "a directory"
            } else {
                "a special file"
            }
        );
    }
    let mut from = std::fs::File::open(&real)?;
    let mut to = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(output)
        .with_context(|| format!("creating {}", output.display()))?;
    let n = std::io::copy(&mut from, &mut to)?;
    to.sync_all()?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_inside_the_filesystem() {
        assert_eq!(
            inside(Path::new("/etc/hosts")).unwrap(),
            Path::new("etc/hosts")
        );
        assert_eq!(
            inside(Path::new("etc/./hosts")).unwrap(),
            Path::new("etc/hosts")
        );
        for bad in ["/", "../x", "/etc/../../x", ""] {
            assert!(inside(Path::new(bad)).is_err(), "{bad:?}");
        }
    }
}
