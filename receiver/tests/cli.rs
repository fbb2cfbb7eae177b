//! The receiver's read commands as an operator runs them: `points`, `restore` and `verify`
//! at the levels of the store `serve` lays out (STORE/AGENT/DISK). A level with nothing to
//! check is an error that names what is there, never a silent pass; `verify` says what it
//! checked and exits 3 on damage. (Before the fix `verify` at the store's root checked
//! nothing and exited 0, and `points --disk` of a missing disk printed its name.)

mod common;

use std::path::Path;
use std::process::Command;

use common::run;
use ctk::delta::{DeltaHeader, WriteOptions};
use ctk::{ChangeId, Extent, Generation};

fn receiver() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ctk-receiver"))
}

/// Ingests a full and an increment of a small image into STORE/host1/vm1.
fn two_points(store: &Path) {
    let dir = store.parent().unwrap();
    let image = dir.join("src.img");
    let mut bytes: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(&image, &bytes).unwrap();
    let generation = Generation::random();
    let full = DeltaHeader {
        disk_id: "vm1".into(),
        disk_size: bytes.len() as u64,
        block_size: 4096,
        from: None,
        to: ChangeId::new(generation, 1),
    };
    let write = |header: &DeltaHeader, extents: &[Extent], name: &str| {
        let file = std::fs::File::open(&image).unwrap();
        let out = std::fs::File::create(dir.join(name)).unwrap();
        ctk::delta::export(&file, extents, header, WriteOptions::default(), out).unwrap();
        dir.join(name)
    };
    let whole = [Extent {
        offset: 0,
        length: 1 << 20,
    }];
    let f = write(&full, &whole, "full.ctkd");
    bytes[8192..12288].fill(7);
    std::fs::write(&image, &bytes).unwrap();
    let inc = DeltaHeader {
        from: Some(full.to),
        to: ChangeId::new(generation, 2),
        ..full.clone()
    };
    let i = write(
        &inc,
        &[Extent {
            offset: 8192,
            length: 4096,
        }],
        "inc.ctkd",
    );
    let (ok, _, err) = run(receiver()
        .args(["ingest", "--disk", "vm1", "--store"])
        .arg(store.join("host1"))
        .arg(&f)
        .arg(&i));
    assert!(ok, "ingest: {err}");
}

#[test]
fn read_commands_refuse_levels_with_nothing_to_check_and_verify_reports_what_it_checked() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    two_points(&root);
    let agent = root.join("host1");

    // The root, as `serve --store` names it: an error that names the agents.
    for cmd in [&["points"][..], &["verify"]] {
        let (ok, out, err) = run(receiver().args(cmd).arg("--store").arg(&root));
        assert!(!ok, "{cmd:?} at the root passed: {out}");
        assert!(
            err.contains("receiver's root") && err.contains("host1"),
            "{err}"
        );
    }
    // A disk that does not exist: an error listing those that do; nothing created.
    let (ok, out, err) = run(receiver()
        .args(["points", "--disk", "nosuch", "--store"])
        .arg(&agent));
    assert!(!ok, "{out}");
    assert!(
        err.contains("no disk \"nosuch\"") && err.contains("vm1"),
        "{err}"
    );
    let (ok, _, err) = run(receiver()
        .args(["verify", "--disk", "nosuch", "--store"])
        .arg(&agent));
    assert!(!ok && err.contains("no disk"), "{err}");
    let (ok, _, err) = run(receiver()
        .args(["restore", "--disk", "nosuch", "--point", "latest", "-o"])
        .arg(dir.path().join("x.img"))
        .arg("--store")
        .arg(&agent));
    assert!(!ok && err.contains("no disk"), "{err}");
    assert!(
        !agent.join("nosuch").exists(),
        "a read command created a store"
    );
    // A directory with no store at all.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let (ok, _, err) = run(receiver().args(["verify", "--store"]).arg(&empty));
    assert!(!ok && err.contains("no disk store"), "{err}");
    let (ok, _, err) = run(receiver()
        .args(["verify", "--store"])
        .arg(dir.path().join("missing")));
    assert!(!ok && err.contains("no store at"), "{err}");

    // The right levels: the agent's directory, or the root with --agent / --all-agents.
    let (ok, out, err) = run(receiver().args(["points", "--json", "--store"]).arg(&agent));
    assert!(ok, "{err}");
    let listed: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(listed[0]["points"].as_array().unwrap().len(), 2);
    for args in [vec!["--agent", "host1"], vec!["--all-agents"]] {
        let (ok, out, err) = run(receiver()
            .args(["verify", "--json", "--store"])
            .arg(&root)
            .args(&args));
        assert!(ok, "{args:?}: {err}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(v["ok"], true, "{v}");
        assert_eq!(v["points"], 2, "{v}");
        assert!(v["files_checked"].as_u64().unwrap() >= 1, "{v}");
        assert!(v["bytes_checked"].as_u64().unwrap() > 0, "{v}");
    }
    let (ok, out, _) = run(receiver().args(["verify", "--store"]).arg(&agent));
    assert!(ok && out.contains("2 point(s)"), "{out}");

    // Damage: exit 3, and the disk named.
    let undo = std::fs::read_dir(agent.join("vm1/undo"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut bytes = std::fs::read(&undo).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x40;
    std::fs::write(&undo, bytes).unwrap();
    let out = receiver()
        .args(["verify", "--store"])
        .arg(&agent)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "damage must exit 3");
    assert!(String::from_utf8_lossy(&out.stdout).contains("vm1: DAMAGED"));
}

/// A restored image is as thin as its source, at 4 KiB: a 64 MiB image with one 4 KiB block
/// of data every 256 KiB restores to about 1 MiB allocated. (Holes were 1 MiB granular:
/// the same image restored to 64 MiB allocated.)
#[test]
fn a_restored_image_keeps_the_sources_holes_at_4_kib() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let size = 64u64 << 20;
    let mut bytes = vec![0u8; size as usize];
    for block in (0..size).step_by(256 << 10) {
        bytes[block as usize..block as usize + 4096].fill(0xa5);
    }
    let image = d.join("src.img");
    std::fs::write(&image, &bytes).unwrap();
    let header = DeltaHeader {
        disk_id: "vm1".into(),
        disk_size: size,
        block_size: 4096,
        from: None,
        to: ChangeId::new(Generation::random(), 1),
    };
    let delta = d.join("full.ctkd");
    ctk::delta::export(
        &std::fs::File::open(&image).unwrap(),
        &[Extent {
            offset: 0,
            length: size,
        }],
        &header,
        WriteOptions::default(),
        std::fs::File::create(&delta).unwrap(),
    )
    .unwrap();
    let store = d.join("store/host1");
    let (ok, _, err) = run(receiver()
        .args(["ingest", "--disk", "vm1", "--store"])
        .arg(&store)
        .arg(&delta));
    assert!(ok, "{err}");
    let out = d.join("restored.img");
    let (ok, _, err) = run(receiver()
        .args(["restore", "--disk", "vm1", "--point", "latest", "-o"])
        .arg(&out)
        .arg("--store")
        .arg(&store));
    assert!(ok, "{err}");
    assert!(
        std::fs::read(&out).unwrap() == bytes,
        "the restored image differs"
    );
    let allocated = std::fs::metadata(&out).unwrap().blocks() * 512;
    let data = (size / (256 << 10)) * 4096;
    eprintln!("{data} bytes of data, {allocated} allocated");
    assert!(
        allocated <= data * 2,
        "{allocated} bytes allocated for {data} of data"
    );
}

/// `restore -o` never overwrites a file unless asked (`--force`): an operator who names the
/// wrong path loses nothing.
#[test]
fn restore_refuses_to_overwrite_an_existing_file_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    two_points(&d.join("store"));
    let store = d.join("store/host1");
    let out = d.join("precious.img");
    std::fs::write(&out, b"the only copy").unwrap();
    let (ok, _, err) = run(receiver()
        .args(["restore", "--disk", "vm1", "--point", "latest", "-o"])
        .arg(&out)
        .arg("--store")
        .arg(&store));
    assert!(
        !ok && err.contains("exists") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(std::fs::read(&out).unwrap(), b"the only copy");
    let (ok, _, err) = run(receiver()
        .args([
            "restore", "--force", "--disk", "vm1", "--point", "latest", "-o",
        ])
        .arg(&out)
        .arg("--store")
        .arg(&store));
    assert!(ok, "{err}");
    assert_ne!(std::fs::read(&out).unwrap(), b"the only copy");
    // Not at a terminal, progress is a line per quarter (a log keeps a few, not thousands).
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("restoring: "))
        .collect();
    assert!(
        lines.last() == Some(&"restoring: 100%") && lines.len() <= 5,
        "{err}"
    );
}

/// `points` gives times as people read them: RFC 3339 with the zone's offset and an age; in
/// `--json`, the RFC 3339 text beside each `*_unix_ms`.
#[test]
fn points_show_times_in_rfc_3339_and_as_ages() {
    let dir = tempfile::tempdir().unwrap();
    two_points(&dir.path().join("store"));
    let store = dir.path().join("store/host1");
    let (ok, out, err) = run(receiver().args(["points", "--store"]).arg(&store));
    assert!(ok, "{err}");
    let line = out.lines().find(|l| l.contains("committed ")).expect(&out);
    let at = line.split("committed ").nth(1).unwrap();
    // 2026-12-07T14:01:00+00:00 (0 s ago)
    let stamp = &at[..25];
    assert!(
        stamp.as_bytes()[10] == b'T'
            && (stamp.as_bytes()[19] == b'+' || stamp.as_bytes()[19] == b'-'),
        "{line}"
    );
    assert!(
        at[25..].starts_with(" (") && at.contains(" s ago)"),
        "{line}"
    );
    assert!(!out.contains("unix ms"), "{out}");
    let (ok, out, _) = run(receiver().args(["points", "--json", "--store"]).arg(&store));
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let p = &v[0]["points"][0];
    assert!(p["committed_unix_ms"].as_u64().is_some());
    assert_eq!(p["committed"].as_str().map(str::len), Some(25), "{p}");
}

/// The exit codes `--help` and the README document: 2 for a bad command line, 1 for a failure.
#[test]
fn exit_codes_are_as_documented() {
    let (_, help, _) = run(receiver().arg("--help"));
    assert!(help.contains("Exit codes: 0 done; 1 failed"), "{help}");
    let out = receiver()
        .args(["points", "--no-such-flag"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = receiver()
        .args(["points", "--store", "/nonexistent/store"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
}

/// `init --json`: the fingerprint as one JSON line, the same on a second run (never
/// replaced), `created` telling the two apart.
#[test]
fn init_answers_in_json_and_never_replaces_an_identity() {
    let dir = tempfile::tempdir().unwrap();
    let id = dir.path().join("rid");
    let answer = |cmd: &mut Command| -> serde_json::Value {
        let (ok, out, err) = run(cmd);
        assert!(ok, "{err}");
        serde_json::from_str(out.trim()).unwrap()
    };
    let first = answer(receiver().args(["init", "--json", "--identity"]).arg(&id));
    let second = answer(receiver().args(["init", "--json", "--identity"]).arg(&id));
    assert_eq!(first["created"], true);
    assert_eq!(second["created"], false);
    assert_eq!(first["fingerprint"], second["fingerprint"]);
    assert!(
        first["fingerprint"]
            .as_str()
            .unwrap()
            .starts_with("sha256:")
    );
}

/// `restore -o` onto something that is not a regular file (a device) is refused, even with
/// --force: the rename into place would replace the device node.
#[test]
fn restore_refuses_a_target_that_is_not_a_file() {
    let dir = tempfile::tempdir().unwrap();
    two_points(&dir.path().join("store"));
    let store = dir.path().join("store/host1");
    let (ok, _, err) = run(receiver()
        .args([
            "restore",
            "--force",
            "--disk",
            "vm1",
            "--point",
            "latest",
            "-o",
            "/dev/null",
        ])
        .arg("--store")
        .arg(&store));
    assert!(
        !ok && err.contains("neither a regular file nor a block device"),
        "{err}"
    );
    use std::os::unix::fs::FileTypeExt;
    assert!(
        std::fs::metadata("/dev/null")
            .unwrap()
            .file_type()
            .is_char_device(),
    );
}

/// `restore -o -` writes a point's image to stdout, byte for byte what a restore to a file
/// writes, its digest checked as it streams: a byte flipped in the store exits 3 (damage)
/// once the image is out. `--json` beside it is refused (both would go to stdout).
#[test]
fn restore_to_stdout_writes_the_image_and_checks_its_digest() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    two_points(&d.join("store"));
    let store = d.join("store/host1");
    let (ok, listed, err) = run(receiver().args(["points", "--json", "--store"]).arg(&store));
    assert!(ok, "{err}");
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let ids: Vec<String> = listed[0]["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["change_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 2, "{listed}");
    for id in &ids {
        let file = d.join("point.img");
        let (ok, _, err) = run(receiver()
            .args(["restore", "--force", "--disk", "vm1", "--point", id, "-o"])
            .arg(&file)
            .arg("--store")
            .arg(&store));
        assert!(ok, "{err}");
        let out = receiver()
            .args([
                "restore", "--disk", "vm1", "--point", id, "-o", "-", "--store",
            ])
            .arg(&store)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.stdout, std::fs::read(&file).unwrap(), "point {id}");
    }
    let (ok, _, err) = run(receiver()
        .args([
            "restore", "--json", "--disk", "vm1", "--point", "latest", "-o", "-",
        ])
        .arg("--store")
        .arg(&store));
    assert!(!ok && err.contains("--json"), "{err}");
    // A byte of the newest point flipped where it lives (the full): the image still comes
    // out, and the exit code says it is damaged.
    let full = store.join("vm1/full.img");
    let mut bytes = std::fs::read(&full).unwrap();
    bytes[100_000] ^= 0x40;
    std::fs::write(&full, &bytes).unwrap();
    let out = receiver()
        .args([
            "restore", "--disk", "vm1", "--point", "latest", "-o", "-", "--store",
        ])
        .arg(&store)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("damaged"), "{err}");
    assert_eq!(out.stdout.len(), 1 << 20);
}

/// `serve --config`: a file with every setting starts the receiver on its address, its
/// relative paths the file's; a bad value is refused naming the file and the line.
#[test]
fn serve_reads_its_settings_from_a_file_and_names_the_line_of_a_bad_one() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (ok, _, err) = run(receiver().args(["init", "--identity"]).arg(d.join("rid")));
    assert!(ok, "{err}");
    let agent_fp = format!("sha256:{}", "ab".repeat(32));
    let good = format!(
        "identity = \"rid\"\nstore = \"store\"\nlisten = \"127.0.0.1:0\"\nkeep = 5\n\
         tiers = \"1h:all\"\n[agents]\nhost1 = \"{agent_fp}\"\n[tiers_for]\ndb1 = \"1d:1h\"\n"
    );
    std::fs::write(d.join("receiver.toml"), good).unwrap();
    let mut child = receiver()
        .args(["serve", "--config"])
        .arg(d.join("receiver.toml"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(line.contains("ready: listening on 127.0.0.1:"), "{line:?}");
    assert!(
        d.join("store").is_dir(),
        "the store is the file's relative path"
    );
    let bad = "identity = \"rid\"\nstore = \"store\"\n\n[agents]\nhost1 = \"sha256:zz\"\n";
    std::fs::write(d.join("bad.toml"), bad).unwrap();
    let (ok, _, err) = run(receiver()
        .args(["serve", "--config"])
        .arg(d.join("bad.toml")));
    assert!(
        !ok && err.contains("bad.toml") && err.contains("line 5") && err.contains("host1"),
        "{err}"
    );
    // No identity from either source: said so, with both ways to give it.
    std::fs::write(d.join("none.toml"), "store = \"store\"\n").unwrap();
    let (ok, _, err) = run(receiver()
        .args(["serve", "--config"])
        .arg(d.join("none.toml")));
    assert!(
        !ok && err.contains("--identity") && err.contains("--config"),
        "{err}"
    );
}

/// At a terminal (a pseudo-terminal from util-linux's `script`), `restore` draws a bar with
/// bytes, rate and ETA, and clears it before its answer.
#[test]
fn restore_at_a_terminal_draws_a_progress_bar() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    two_points(&d.join("store"));
    let command = format!(
        "{} restore --disk vm1 --point latest -o {} --store {}",
        env!("CARGO_BIN_EXE_ctk-receiver"),
        d.join("out.img").display(),
        d.join("store/host1").display()
    );
    let (ok, out, err) = run(Command::new("script").args(["-qec", &command, "/dev/null"]));
    assert!(ok, "{out}{err} (script, from util-linux, is needed)");
    assert!(
        out.contains("restoring [") && out.contains("MiB") && out.contains("ETA"),
        "{out:?}"
    );
    assert!(out.contains("written to"), "{out:?}");
}
