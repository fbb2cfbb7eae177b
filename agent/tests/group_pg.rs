//! A real database across a consistency group: PostgreSQL with its data directory on one
//! ext4 and its WAL (`pg_wal`) on another, each on one of the agent's disks through its NBD
//! front (nbdfuse and a loop device), while one session inserts rows 1, 2, 3, ... each
//! committed before the next. Crash-consistent group exports taken meanwhile are restored as
//! pairs of images; each pair must start PostgreSQL, whose crash recovery replays the WAL,
//! and hold rows 1..k with no gap and every row committed before the cut. (A pair cut at two
//! instants can hold a data page newer than the WAL it must be replayed with, or lose
//! commits the data directory's control file already counts.)

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::nbd::apply;
use common::{Agent, Stack, disk_image, require_root, require_tools, sh};

/// The newest PostgreSQL's programs (Debian keeps them in /usr/lib/postgresql/N/bin).
fn pg_bin() -> PathBuf {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found
        .pop()
        .map(|(_, bin)| bin)
        .expect("PostgreSQL is required (apt-get install postgresql; scripts/test installs it)")
}

/// Runs a PostgreSQL program as the postgres user.
fn as_postgres(bin: &Path, program: &str, args: &[&str]) -> String {
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(bin.join(program))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A server on `data` listening only on a socket in `sock`.
struct Server<'a> {
    bin: &'a Path,
    data: PathBuf,
    sock: PathBuf,
}

impl<'a> Server<'a> {
    fn start(bin: &'a Path, data: &Path, sock: &Path) -> Server<'a> {
        let opts = format!(
            "-c listen_addresses='' -c unix_socket_directories={} -c port=5499",
            sock.display()
        );
        let log = sock.join("server.log");
        as_postgres(
            bin,
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-o",
                &opts,
                "-l",
                log.to_str().unwrap(),
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
        Server {
            bin,
            data: data.to_owned(),
            sock: sock.to_owned(),
        }
    }

    /// psql's arguments to reach this server, then `more`.
    fn psql_args<'s>(&'s self, more: &[&'s str]) -> Vec<&'s str> {
        let mut args = vec![
            "-h",
            self.sock.to_str().unwrap(),
            "-p",
            "5499",
            "-d",
            "postgres",
        ];
        args.extend_from_slice(more);
        args
    }

    fn query(&self, sql: &str) -> String {
        as_postgres(self.bin, "psql", &self.psql_args(&["-Atqc", sql]))
    }

    /// One session inserting rows 1, 2, ... (each its own committed transaction) until
    /// killed.
    fn inserting(&self) -> Child {
        let script = "SELECT 1;\n".to_owned()
            + &(1..=200_000)
                .map(|i| format!("INSERT INTO t VALUES ({i});\n"))
                .collect::<String>();
        let path = self.sock.join("inserts.sql");
        std::fs::write(&path, script).unwrap();
        sh(&format!("chmod 644 {}", path.display()));
        Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("psql"))
            .args(self.psql_args(&["-q", "-f", path.to_str().unwrap()]))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }

    fn stop(self, mode: &str) {
        as_postgres(
            self.bin,
            "pg_ctl",
            &["-D", self.data.to_str().unwrap(), "-m", mode, "-w", "stop"],
        );
    }
}

#[test]
fn postgresql_across_two_disks_recovers_from_every_group_cut() {
    require_root();
    require_tools(&["runuser", "nbdfuse", "losetup", "mkfs.ext4"]);
    let bin = pg_bin();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    sh(&format!("chmod 755 {}", d.display()));
    let (data_img, wal_img) = (disk_image(d, "data", 256), disk_image(d, "wal", 128));
    let mut cmd = Command::new(common::agent_bin());
    cmd.arg("serve")
        .arg("--disk")
        .arg(format!("data={}", data_img.display()))
        .arg("--disk")
        .arg(format!("wal={}", wal_img.display()))
        .args(["--group", "pg=data,wal"]);
    let agent = Agent::launch_cmd(cmd, d);
    let (data_mnt, wal_mnt) = (d.join("data-mnt"), d.join("wal-mnt"));
    let sock = d.join("sock");
    std::fs::create_dir_all(&sock).unwrap();
    sh(&format!("chown postgres {}", sock.display()));
    let cuts = d.join("cuts");
    std::fs::create_dir_all(&cuts).unwrap();
    let mut floors = Vec::new();
    {
        let _data = Stack::mount(&agent.nbd, "data", &data_mnt, true);
        let _wal = Stack::mount(&agent.nbd, "wal", &wal_mnt, true);
        sh(&format!(
            "chown postgres {} {}",
            data_mnt.display(),
            wal_mnt.display()
        ));
        let pgdata = data_mnt.join("pg");
        // Synced (no --no-sync): a crash-consistent cut holds only what reached the disks.
        as_postgres(
            &bin,
            "initdb",
            &[
                "-D",
                pgdata.to_str().unwrap(),
                "-X",
                wal_mnt.join("pg_wal").to_str().unwrap(),
                "-A",
                "trust",
            ],
        );
        let server = Server::start(&bin, &pgdata, &sock);
        server.query("CREATE TABLE t (id int PRIMARY KEY)");
        let mut writer = server.inserting();
        let started = Instant::now();
        while server.query("SELECT count(*) FROM t") == "0" {
            assert!(started.elapsed() < Duration::from_secs(30), "no inserts");
            std::thread::sleep(Duration::from_millis(50));
        }
        for i in 0..4 {
            std::thread::sleep(Duration::from_millis(700));
            // Every row committed before the cut began must be in it.
            let floor: u64 = server.query("SELECT max(id) FROM t").parse().unwrap();
            let out = cuts.join(i.to_string());
            std::fs::create_dir_all(&out).unwrap();
            let exports: Vec<String> = ["data", "wal"]
                .iter()
                .map(|disk| {
                    format!(
                        r#"{{"disk":"{disk}","since":"all","path":"{}"}}"#,
                        out.join(format!("{disk}.ctkd")).display()
                    )
                })
                .collect();
            let request = format!(
                r#"{{"cmd":"group_export","group":"pg","consistency":"crash","members":[{}]}}"#,
                exports.join(",")
            );
            let answer = agent.call(&request);
            assert_eq!(answer["ok"], true, "{answer}");
            floors.push(floor);
        }
        let _ = writer.kill();
        let _ = writer.wait();
        // The original stops as a crash would leave it: no checkpoint at shutdown.
        server.stop("immediate");
    }
    drop(agent);
    // Each cut restored as a pair of images, mounted where the originals were (pg_wal is a
    // symlink into the WAL disk's mount point), and started: crash recovery, then the rows.
    let mut seen = Vec::new();
    for (i, floor) in floors.iter().enumerate() {
        let out = cuts.join(i.to_string());
        let (count, max) = recover(&bin, &out, &data_mnt, &wal_mnt, &sock, i);
        assert_eq!(
            count, max,
            "cut {i}: rows 1..{max} with gaps ({count} rows)"
        );
        assert!(
            max >= *floor,
            "cut {i}: {max} rows, but row {floor} was committed before the cut"
        );
        seen.push(max);
    }
    assert!(
        seen.windows(2).all(|w| w[0] <= w[1]) && seen.first() < seen.last(),
        "the cuts did not move with the writer: {seen:?}"
    );
    eprintln!(
        "{} group cuts of PostgreSQL (data + WAL disks) recovered: rows {seen:?}",
        seen.len()
    );
}

/// Restores cut `i`'s deltas in `out` as a pair of images, mounts them where the originals
/// were (pg_wal is a symlink into the WAL disk's mount point), starts PostgreSQL on them
/// (crash recovery) and counts the rows: (count, max id).
fn recover(
    bin: &Path,
    out: &Path,
    data_mnt: &Path,
    wal_mnt: &Path,
    sock: &Path,
    i: usize,
) -> (u64, u64) {
    for (disk, mib, mnt) in [("data", 256, data_mnt), ("wal", 128, wal_mnt)] {
        let image = disk_image(out, &format!("{disk}-restored"), mib);
        apply(&out.join(format!("{disk}.ctkd")), &image);
        sh(&format!(
            "mount -o loop {} {}",
            image.display(),
            mnt.display()
        ));
    }
    // The copy's lock file names the source's postmaster, not a server of this copy.
    let _ = std::fs::remove_file(data_mnt.join("pg/postmaster.pid"));
    let recovered = std::panic::catch_unwind(|| {
        let server = Server::start(bin, &data_mnt.join("pg"), sock);
        let count: u64 = server.query("SELECT count(*) FROM t").parse().unwrap();
        let max: u64 = server
            .query("SELECT coalesce(max(id), 0) FROM t")
            .parse()
            .unwrap();
        server.stop("fast");
        (count, max)
    });
    sh(&format!(
        "umount {} {}",
        data_mnt.display(),
        wal_mnt.display()
    ));
    let (count, max) = recovered.unwrap_or_else(|_| {
        panic!(
            "cut {i}: PostgreSQL did not start on the restored pair: {}",
            std::fs::read_to_string(sock.join("server.log")).unwrap_or_default()
        )
    });
    (count, max)
}
