//! Running as a service: the systemd units shipped in `packaging/systemd` parse, both daemons
//! tell a service manager when they are ready and stopping and feed its watchdog, and
//! `--log-format json` writes one JSON object per line, a commit logged at info on both
//! sides.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// Every unit parses (`systemd-analyze verify`, all at once so that their dependencies
/// resolve), with its binaries pointed at this build's.
#[test]
fn the_systemd_units_parse() {
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/systemd");
    let dir = tempfile::tempdir().unwrap();
    let mut copies = Vec::new();
    for entry in std::fs::read_dir(&units).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let text = text
            .replace("/usr/bin/ctk-agent", &agent_bin().display().to_string())
            .replace(
                "/usr/bin/ctk-receiver",
                &receiver_bin().display().to_string(),
            );
        // A template is verified as one of its instances.
        let name = path
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .replace("@.", "@vm1.");
        let copy = dir.path().join(&name);
        std::fs::write(&copy, text).unwrap();
        copies.push(copy);
    }
    assert_eq!(
        copies.len(),
        3,
        "ctk-agent, ctk-replicate@ and ctk-receiver"
    );
    let (ok, out, err) = run(Command::new(tool("systemd-analyze"))
        .args(["verify", "--man=no"])
        .args(&copies));
    assert!(ok && err.trim().is_empty(), "{out}{err}");
}

/// The notices a daemon sends to `NOTIFY_SOCKET` until it has said `until` (or 10 s).
fn notices(socket: &UnixDatagram, until: &str) -> Vec<String> {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = socket.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            let done = text.contains(until);
            got.push(text);
            if done {
                break;
            }
        }
    }
    got
}

/// Starts `cmd` with a notify socket and a 400 ms watchdog; checks READY, the watchdog's
/// keep-alives, and STOPPING after SIGTERM.
fn check_notices(dir: &Path, cmd: &mut Command) {
    let path = dir.join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    // The watchdog is the daemon's only if WATCHDOG_PID names it: a shell that sets it to
    // its own pid, then becomes the daemon (as systemd sets it for its main process).
    let mut wrapped = Command::new("sh");
    wrapped
        .arg("-c")
        .arg(r#"WATCHDOG_PID=$$ exec "$0" "$@""#)
        .arg(cmd.get_program())
        .args(cmd.get_args())
        .env("NOTIFY_SOCKET", &path)
        .env("WATCHDOG_USEC", "400000")
        .stdout(Stdio::null());
    let child = Proc(wrapped.spawn().unwrap());
    let ready = notices(&socket, "READY=1");
    assert!(
        ready
            .last()
            .is_some_and(|n| n.contains("READY=1") && n.contains("STATUS=")),
        "{ready:?}"
    );
    std::thread::sleep(Duration::from_millis(1000));
    let mut fed = 0;
    let mut buf = [0u8; 4096];
    while let Ok(n) = socket.recv(&mut buf) {
        fed += usize::from(String::from_utf8_lossy(&buf[..n]).contains("WATCHDOG=1"));
    }
    assert!(
        fed >= 3,
        "{fed} watchdog notices in a second at a 400 ms watchdog"
    );
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
    let stopping = notices(&socket, "STOPPING=1");
    assert!(
        stopping.iter().any(|n| n.contains("STOPPING=1")),
        "{stopping:?}"
    );
    drop(child);
}

#[test]
fn both_daemons_tell_the_service_manager_ready_watchdog_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    init(&receiver_bin(), &d.join("rid"));
    let afp = init(&agent_bin(), &d.join("aid"));
    check_notices(
        d,
        Command::new(receiver_bin())
            .args(["serve", "--listen", "127.0.0.1:0", "--identity"])
            .arg(d.join("rid"))
            .arg("--store")
            .arg(d.join("store"))
            .arg("--allow")
            .arg(format!("host1={afp}")),
    );
    std::fs::remove_file(d.join("notify.sock")).unwrap();
    let image = d.join("vm1.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    check_notices(d, &mut serve_cmd(&agent_bin(), d, &image));
}

/// Every line of `log` as JSON: what `--log-format json` promises.
fn json_lines(log: &str) -> Vec<Value> {
    log.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
        .collect()
}

fn committed_at_info(lines: &[Value]) -> bool {
    lines
        .iter()
        .any(|l| l["level"] == "INFO" && l["fields"]["message"] == "committed")
}

#[test]
fn json_logs_are_one_object_per_line_and_a_commit_is_logged_on_both_sides() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let rfp = init(&receiver_bin(), &d.join("rid"));
    let afp = init(&agent_bin(), &d.join("aid"));
    let log = d.join("receiver.log");
    let (receiver, ready) = start_with(
        Command::new(receiver_bin())
            .args(["--log-format", "json", "serve", "--listen", "127.0.0.1:0"])
            .arg("--identity")
            .arg(d.join("rid"))
            .arg("--store")
            .arg(d.join("store"))
            .arg("--allow")
            .arg(format!("host1={afp}"))
            .env("RUST_LOG", "info"),
        Stdio::from(std::fs::File::create(&log).unwrap()),
    );
    let addr = ready.split_whitespace().nth(4).unwrap().parse().unwrap();
    let image = d.join("vm1.img");
    std::fs::write(&image, vec![7u8; 1 << 20]).unwrap();
    let _agent = start(&mut serve_cmd(&agent_bin(), d, &image));
    // The environment's form of the flag, as the units set it.
    let (ok, out, err) = run(replicate_cmd(&agent_bin(), d, addr, &rfp)
        .args(["--disk", "vm1"])
        .env("RUST_LOG", "info")
        .env("CTK_LOG_FORMAT", "json"));
    assert!(ok, "replicate: {err}");
    let answer: Value = serde_json::from_str(&out).unwrap();
    let agent_lines = json_lines(&err);
    assert!(committed_at_info(&agent_lines), "{err}");
    let line = agent_lines
        .iter()
        .find(|l| l["fields"]["message"] == "committed")
        .unwrap();
    assert_eq!(line["fields"]["point"], answer["committed"], "{line}");
    assert!(line["timestamp"].as_str().unwrap().ends_with('Z'), "{line}");
    drop(receiver);
    let receiver_log = std::fs::read_to_string(&log).unwrap();
    let receiver_lines = json_lines(&receiver_log);
    assert!(committed_at_info(&receiver_lines), "{receiver_log}");
    assert!(
        receiver_lines
            .iter()
            .any(|l| l["fields"]["message"] == "serving"),
        "{receiver_log}"
    );
}
