//! Child process of the SIGKILL crash test: writes through the tracker until killed.
//!
//! Usage: ctk-crash-child JOURNAL IMAGE DISK_SIZE SEED
//! Prints `G <id>` once the tracker is open, `W <offset> <length>` after a write's intent is
//! durable and before the data write is issued, and `C <id>` after each cut is durable.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::FileExt;

use ctk::{FileStorage, Generation, Tracker, TrackerConfig};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 {
        eprintln!("usage: ctk-crash-child JOURNAL IMAGE DISK_SIZE SEED");
        std::process::exit(2);
    }
    let disk_size: u64 = args[3].parse().expect("DISK_SIZE");
    let mut x: u64 = args[4].parse::<u64>().expect("SEED") | 1;
    let mut rand = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let image = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&args[2])
        .expect("image");
    let config = TrackerConfig::new("crash-disk", disk_size);
    let (mut tracker, outcome) =
        Tracker::open(FileStorage::new(&args[1]), config, Generation::random).expect("open");
    if std::env::var("CTK_CRASH_DEBUG").is_ok() {
        eprintln!("child open: {outcome:?}");
    }
    if tracker.map().cursors().next().is_none() {
        tracker
            .register_cursor("crash-test", tracker.latest())
            .expect("cursor");
    }
    let out = std::io::stdout();
    let say = |line: String| {
        // One write per line, so a line in the pipe is whole or absent.
        let mut lock = out.lock();
        lock.write_all(line.as_bytes()).expect("stdout");
        lock.flush().expect("stdout");
    };
    say(format!("G {}\n", tracker.latest()));
    let data = vec![0xA5u8; 256 * 1024];
    loop {
        let r = rand();
        if r % 50 == 0 {
            let id = tracker.cut().expect("cut");
            say(format!("C {id}\n"));
            continue;
        }
        let length = 1 + rand() % (if r % 7 == 0 { 256 * 1024 } else { 16 * 1024 });
        let offset = rand() % (disk_size - length);
        let intent = tracker.intend(offset, length).expect("intend");
        say(format!("W {offset} {length}\n"));
        image
            .write_all_at(&data[..length as usize], offset)
            .expect("data write");
        tracker.record(intent);
    }
}
