//! A UDP forwarder that delays every datagram by a fixed time each way: a long link for
//! benchmarks on a machine without `tc netem` (this one has no sch_netem module).
//!
//! `udp-delay LISTEN TARGET ONE_WAY_MS`: datagrams arriving at LISTEN go to TARGET, and
//! TARGET's answers go back to the last address LISTEN heard from, each ONE_WAY_MS later
//! (so the round trip grows by twice that; a datagram may leave up to 0.5 ms early). No bandwidth limit and no loss, except that a
//! direction drops datagrams while it already holds 200,000 in flight, as a router's queue
//! would. Plain threads and blocking sockets, two per direction (one receives, one sends
//! when due), so the forwarder itself is not what limits a benchmark.

use std::net::{SocketAddr, UdpSocket};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const IN_FLIGHT_MAX: usize = 200_000;

fn usage() -> ! {
    eprintln!("usage: udp-delay LISTEN_ADDR TARGET_ADDR ONE_WAY_DELAY_MS");
    std::process::exit(2)
}

/// Large socket buffers: a burst the forwarder is slow to drain waits instead of being
/// dropped (a loss would make this a lossy link, not only a long one).
fn grow_buffers(socket: &UdpSocket) {
    use std::os::fd::AsRawFd;
    let size: libc::c_int = 64 << 20;
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE] {
        // SAFETY: setsockopt on an open socket with a pointer to a live c_int and its size.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

type Datagram = (Instant, Vec<u8>);

/// How early a datagram may leave: one sleep per datagram (tens of microseconds each, at
/// best) would cap the forwarder near 20,000 datagrams a second, so those due within this
/// go at once, in a burst. 0.5 ms against round trips of tens of milliseconds.
const EARLY: Duration = Duration::from_micros(500);

fn wait_until(due: Instant) {
    let wait = due.saturating_duration_since(Instant::now());
    if wait > EARLY {
        std::thread::sleep(wait);
    }
}

/// Receives with `recv` and queues each datagram, due `delay` from now, on `queue`.
fn receiving(
    delay: Duration,
    queue: SyncSender<Datagram>,
    mut recv: impl FnMut(&mut [u8]) -> std::io::Result<usize>,
) {
    let mut buf = vec![0u8; 65536];
    while let Ok(n) = recv(&mut buf) {
        // Full: dropped, as a router drops.
        let _ = queue.try_send((Instant::now() + delay, buf[..n].to_vec()));
    }
}

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, target, delay] = args.as_slice() else {
        usage()
    };
    let (Ok(listen), Ok(target), Ok(delay)) = (
        listen.parse::<SocketAddr>(),
        target.parse::<SocketAddr>(),
        delay.parse::<u64>(),
    ) else {
        usage()
    };
    let delay = Duration::from_millis(delay);
    let front = Arc::new(UdpSocket::bind(listen)?);
    let back = Arc::new(UdpSocket::bind(SocketAddr::new(target.ip(), 0))?);
    back.connect(target)?;
    grow_buffers(&front);
    grow_buffers(&back);
    let client: Arc<Mutex<Option<SocketAddr>>> = Arc::new(Mutex::new(None));
    eprintln!(
        "udp-delay: {} -> {target}, {} ms each way",
        front.local_addr()?,
        delay.as_millis()
    );

    let (to_back, queued_back) = sync_channel::<Datagram>(IN_FLIGHT_MAX);
    let (to_front, queued_front) = sync_channel::<Datagram>(IN_FLIGHT_MAX);
    let b = back.clone();
    std::thread::spawn(move || {
        for (due, d) in queued_back {
            wait_until(due);
            let _ = b.send(&d);
        }
    });
    let (f, c) = (front.clone(), client.clone());
    std::thread::spawn(move || {
        for (due, d) in queued_front {
            wait_until(due);
            let to = *c.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(addr) = to {
                let _ = f.send_to(&d, addr);
            }
        }
    });
    let b = back.clone();
    std::thread::spawn(move || receiving(delay, to_front, |buf| b.recv(buf)));
    receiving(delay, to_back, |buf| {
        let (n, from) = front.recv_from(buf)?;
        *client.lock().unwrap_or_else(|p| p.into_inner()) = Some(from);
        Ok(n)
    });
    Ok(())
}
