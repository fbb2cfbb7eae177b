#!/usr/bin/env bash
# First full of a mixed image over QUIC on loopback, against the slowest stage measured alone
# in the same run: disk read, delta encoding (zero detection, CRC32, zstd 1), QUIC.
#
#   cargo build --release -p ctk-agent -p ctk-receiver -p ctk-benches --bins &&
#     benches/scripts/replicate_full.sh [SIZE_MIB] [RUNS]      (default 4096 MiB, 3 runs)
#
# The disk read stage is the faster of a cold read through the page cache and a direct
# (O_DIRECT) read, each alone: the most the disk gives, whichever way ctk reads it.
# STORE_DIR=DIR puts the receiver's store there instead of beside the image: on this one-disk
# machine, /dev/shm stands in for a receiver with a disk of its own (the replica's writes
# then no longer share the device with the agent's reads).
#
# A last row, not one of the issue's stages, measures the one disk doing both of its jobs at
# once: the image read directly while the replica's non-zero bytes are written directly
# beside it. On a machine where agent and receiver share one device, that is the ceiling.
#
# Prints the medians and the ratio ctk / slowest stage (issue 4's goal: >= 0.8).
set -euo pipefail
size_mib=${1:-4096}
runs=${2:-3}
root=$(cd "$(dirname "$0")/../.." && pwd)
bin="$root/target/release"
for b in ctk-agent ctk-receiver ctk-stages; do
  [ -x "$bin/$b" ] || { echo "build first: cargo build --release -p ctk-agent -p ctk-receiver -p ctk-benches --bins" >&2; exit 1; }
done
work=$(mktemp -d -p "${TMPDIR:-/var/tmp}")
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
bytes=$((size_mib << 20))

echo "generating a ${size_mib} MiB mixed image..." >&2
"$bin/ctk-stages" gen "$work/src.img" "$size_mib"
rfp=$("$bin/ctk-receiver" init --identity "$work/rid" 2>/dev/null)
afp=$("$bin/ctk-agent" init --identity "$work/aid" 2>/dev/null)

median() { sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

store=${STORE_DIR:-$work}/ctk-bench-store.$$
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work" "$store"' EXIT
read_bps=(); dread_bps=(); rw_bps=(); enc_bps=(); quic_bps=(); ctk_bps=(); write_bps=(); ratios=(); busy=()
# The share of the machine's CPU time (all cores) spent busy between two /proc/stat samples.
cpu_sample() { awk '/^cpu /{print $2+$3+$4+$7+$8, $2+$3+$4+$5+$6+$7+$8}' /proc/stat; }
# The non-zero part of the image: what the replica's disk must take.
nonzero=$(python3 -c "
import sys
z=bytes(4096); n=0
with open('$work/src.img','rb') as f:
    while (b := f.read(1<<20)):
        n += sum(4096 for i in range(0, len(b), 4096) if b[i:i+4096] != z)
print(n)")
for run in $(seq "$runs"); do
  buffered=$("$bin/ctk-stages" read "$work/src.img")
  direct=$("$bin/ctk-stages" read-direct "$work/src.img")
  dread_bps+=("$direct")
  read_bps+=("$(python3 -c "print(max($buffered, $direct))")")
  enc_bps+=("$("$bin/ctk-stages" encode "$work/src.img")")
  quic_bps+=("$("$bin/ctk-stages" quic "$bytes")")
  write_bps+=("$("$bin/ctk-stages" write "${STORE_DIR:-$work}/ctk-bench-w.$$" "$nonzero")")
  rw_bps+=("$("$bin/ctk-stages" read-write "$work/src.img" "${STORE_DIR:-$work}/ctk-bench-rw.$$" "$nonzero")")
  # ctk: a fresh receiver store and a fresh journal each run, the image cold.
  rm -rf "$store" "$work/src.img.ctk"* "$work"/*.sock
  "$bin/ctk-receiver" serve --identity "$work/rid" --store "$store" --listen 127.0.0.1:0 \
      --allow "bench=$afp" > "$work/r.out" 2>/dev/null &
  rpid=$!
  until grep -q ready "$work/r.out" 2>/dev/null; do sleep 0.05; done
  addr=$(sed -n 's/.*listening on \([^ ]*\) as.*/\1/p' "$work/r.out")
  "$bin/ctk-agent" serve --disk "vm1=$work/src.img" --listen "unix:$work/nbd.sock" \
      --control "$work/ctl.sock" > "$work/a.out" 2>/dev/null &
  apid=$!
  until grep -q ready "$work/a.out" 2>/dev/null; do sleep 0.05; done
  "$bin/ctk-stages" drop "$work/src.img"
  cpu0=$(cpu_sample)
  start=$(date +%s.%N)
  "$bin/ctk-agent" replicate --identity "$work/aid" --receiver "$addr" --receiver-fingerprint "$rfp" \
      --control "$work/ctl.sock" --work-dir "$work" --json > "$work/rep.json"
  end=$(date +%s.%N)
  cpu1=$(cpu_sample)
  busy+=("$(python3 -c "b0,t0,b1,t1 = map(int, '$cpu0 $cpu1'.split()); print((b1-b0)/(t1-t0))")")
  ctk_bps+=("$(python3 -c "print($bytes / ($end - $start))")")
  sent=$(python3 -c "import json; print(json.load(open('$work/rep.json'))['delta_bytes'])")
  kill $apid $rpid; wait $apid $rpid 2>/dev/null || true
  # This run's ratio against its own slowest stage (the disk is noisy from run to run).
  ratios+=("$(python3 -c "print(${ctk_bps[-1]} / min(${read_bps[-1]}, ${enc_bps[-1]}, ${quic_bps[-1]} * $bytes / $sent))")")
  echo "run $run: read ${read_bps[-1]} (direct $direct, buffered $buffered) encode ${enc_bps[-1]} quic ${quic_bps[-1]} write ${write_bps[-1]} read+write ${rw_bps[-1]} ctk ${ctk_bps[-1]} B/s; sent $sent bytes; ratio ${ratios[-1]}; CPU busy ${busy[-1]}" >&2
done
r=$(printf '%s\n' "${read_bps[@]}" | median); dr=$(printf '%s\n' "${dread_bps[@]}" | median); e=$(printf '%s\n' "${enc_bps[@]}" | median)
q=$(printf '%s\n' "${quic_bps[@]}" | median); c=$(printf '%s\n' "${ctk_bps[@]}" | median)
w=$(printf '%s\n' "${write_bps[@]}" | median); rr=$(printf '%s\n' "${ratios[@]}" | median)
cb=$(printf '%s\n' "${busy[@]}" | median); rw=$(printf '%s\n' "${rw_bps[@]}" | median)
python3 - "$r" "$e" "$q" "$c" "$size_mib" "$runs" "$sent" "$w" "$nonzero" "$rr" "$cb" "$dr" "${STORE_DIR:-beside the image}" "$rw" <<'PY'
import sys
r, e, q, c = map(float, sys.argv[1:5]); size, runs, sent = sys.argv[5], sys.argv[6], int(sys.argv[7])
w, nonzero, rr = float(sys.argv[8]), int(sys.argv[9]), float(sys.argv[10])
cb = float(sys.argv[11])
dr, store, rw = float(sys.argv[12]), sys.argv[13], float(sys.argv[14])
image = int(size) << 20
# Every rate is in image bytes per second: QUIC only has to carry the delta (zeros skipped,
# the rest compressed), so its rate is scaled by image / sent.
q_image = q * image / sent
slowest = min(("disk read", r), ("delta encoding", e), ("QUIC, carrying the delta", q_image), key=lambda x: x[1])
print(f"| stage ({size} MiB mixed image, medians of {runs} runs) | image MB/s |")
print("|---|---|")
print(f"| disk read (the faster of cold buffered and direct; direct alone {dr/1e6:.0f}) | {r/1e6:.0f} |")
print(f"| delta encoding (zero detection, CRC32, zstd 1) | {e/1e6:.0f} |")
print(f"| QUIC on loopback, ctk transport ({q/1e6:.0f} MB/s raw; the delta is {sent/image:.2f} of the image) | {q_image/1e6:.0f} |")
print(f"| **ctk first full, end to end** (export, QUIC, stage, verify, merge, fsync) | **{c/1e6:.0f}** |")
print(f"| replica disk: sequential write + fsync of the {nonzero/2**20:.0f} MiB of non-zero data (not one of the issue's stages) | {w*image/nonzero/1e6:.0f} |")
print(f"| one disk, both jobs: the image read directly while the {nonzero/2**20:.0f} MiB are written directly beside it (not one of the issue's stages) | {rw/1e6:.0f} |")
print(f"receiver store: {store}")
print(f"CPU busy during ctk's runs (share of both cores, all processes), median: {cb:.2f}")
print(f"ratio ctk / slowest stage ({slowest[0]}), of the medians: {c/slowest[1]:.2f}; median of the per-run ratios: {rr:.2f} (goal >= 0.8); delta sent {sent/2**20:.0f} MiB")
print(f"ratio ctk / one disk doing both jobs: {c/rw:.2f}")
PY
