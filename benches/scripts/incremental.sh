#!/usr/bin/env bash
# Bringing a replica up to date, side by side in one run (issue 5's benchmark):
#
#   1. Incremental: a SIZE image of mixed data is replicated once (not timed); then, ROUNDS
#      times, 2% of it is rewritten through the agent's NBD front in random 64 KiB extents,
#      and the replica is brought up to date by
#        - ctk: `ctk-agent replicate` (cut + export + QUIC on loopback + merge + commit);
#        - rsync: `rsync --inplace --no-whole-file` into an rsync daemon on loopback, whose
#          copy was in sync before the change;
#        - restic: an incremental `restic backup` of the image into a local repository.
#      Bytes on the wire: ctk's delta, rsync's "Total bytes sent", restic's data added,
#      against the changed data compressed with zstd 1 (its floor).
#   2. Resync: the agent's journal is deleted and 1% of the image rewritten while nothing
#      tracks it; ctk's digest-compare resync against rsync on the same two images.
#
#   cargo build --release -p ctk-agent -p ctk-receiver -p ctk-benches --bins &&
#     benches/scripts/incremental.sh [SIZE_MIB] [ROUNDS]      (default 4096 MiB, 3 rounds)
#
# Needs rsync, restic, nbdinfo (Debian: rsync restic libnbd-bin). Prints one line per round
# and the medians; each tool reads the image cold (its pages dropped first).
set -euo pipefail
size_mib=${1:-4096}
rounds=${2:-3}
root=$(cd "$(dirname "$0")/../.." && pwd)
bin="$root/target/release"
for b in ctk-agent ctk-receiver ctk-stages; do
  [ -x "$bin/$b" ] || { echo "build first: cargo build --release -p ctk-agent -p ctk-receiver -p ctk-benches --bins" >&2; exit 1; }
done
for t in rsync restic nbdinfo; do
  command -v $t > /dev/null || { echo "$t is needed (apt-get install rsync restic libnbd-bin)" >&2; exit 1; }
done
work=$(mktemp -d -p "${TMPDIR:-/var/tmp}")
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
export RESTIC_PASSWORD=bench RESTIC_PROGRESS_FPS=0.01
now() { date +%s.%N; }
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
jq_() { python3 -c "import json,sys; d=json.load(open('$1')); print($2)"; }
. "$(dirname "$0")/pair.sh"
# One timed ctk replication (c_s seconds, c_b bytes), cold (timed_rsync, timed_restic: pair.sh).
timed_ctk() {
  sync
  "$bin/ctk-stages" drop "$work/vm1.img"
  t0=$(now); replicate "$work/rep.json"; t1=$(now)
  c_s=$(python3 -c "print($t1 - $t0)"); c_b=$(jq_ "$work/rep.json" "d['delta_bytes']")
  # Where the receiver's merge spent it (seconds per step), to stderr.
  grep ' merged ' "$work/r.log" | tail -1 | sed -n 's/.*steps=\(.*\) merged.*/  merge steps: \1/p; s/.*steps=\(\[.*\]\).*/  merge steps: \1/p' | head -1 >&2
}

echo "generating a ${size_mib} MiB mixed image..." >&2
"$bin/ctk-stages" gen "$work/vm1.img" "$size_mib"
start_receiver
serve_agent

# The starting point, not timed: ctk's first full, rsync's copy, restic's first snapshot.
echo "first full, rsync copy, restic first backup..." >&2
replicate "$work/full.json"
start_rsyncd
start_restic

ctk_s=(); rsync_s=(); restic_s=(); ctk_b=(); rsync_b=(); restic_b=(); floor_b=()
printf '%-6s %10s %10s %10s   %12s %12s %12s %12s\n' round ctk_s rsync_s restic_s \
    zstd_floor_B ctk_B rsync_B restic_B
for r in $(seq "$rounds"); do
  "$bin/ctk-stages" scribble "$work/nbd.sock" vm1 2 "$r" > "$work/change.json"
  floor=$(jq_ "$work/change.json" "d['zstd_bytes']")
  timed_ctk
  timed_rsync   # the daemon's copy is the state before the change
  timed_restic
  printf '%-6s %10.2f %10.2f %10.2f   %12d %12d %12d %12d\n' "$r" "$c_s" "$s_s" "$e_s" "$floor" "$c_b" "$s_b" "$e_b"
  ctk_s+=("$c_s"); rsync_s+=("$s_s"); restic_s+=("$e_s")
  ctk_b+=("$c_b"); rsync_b+=("$s_b"); restic_b+=("$e_b"); floor_b+=("$floor")
  cmp -s "$work/vm1.img" "$work/rsync/vm1.img" || { echo "rsync's copy differs" >&2; exit 1; }
done
mc=$(printf '%s\n' "${ctk_s[@]}" | median); ms=$(printf '%s\n' "${rsync_s[@]}" | median)
me=$(printf '%s\n' "${restic_s[@]}" | median)
mcb=$(printf '%s\n' "${ctk_b[@]}" | median); mfb=$(printf '%s\n' "${floor_b[@]}" | median)
echo
echo "incremental, ${size_mib} MiB, 2% changed, medians of $rounds rounds:"
python3 - <<EOF
c, s, e = $mc, $ms, $me
print(f"  time: ctk {c:.2f} s; rsync {s:.2f} s ({s/c:.1f}x ctk); restic {e:.2f} s ({e/c:.1f}x ctk)")
print(f"  ctk bytes on the wire / zstd-1 size of the changed data: {$mcb / $mfb:.3f}")
EOF

# Resync: the journal lost, 1% changed while nothing tracked it.
kill $apid; wait $apid 2>/dev/null || true
rm -f "$work/vm1.img.ctk"*
"$bin/ctk-stages" scribble-file "$work/vm1.img" 1 99 > "$work/change.json"
serve_agent
timed_ctk
resync=$(jq_ "$work/rep.json" "d['resync']")
timed_rsync
floor=$(jq_ "$work/change.json" "d['zstd_bytes']"); changed=$(jq_ "$work/change.json" "d['changed_bytes']")
echo
echo "resync after a journal loss, ${size_mib} MiB, 1% changed (resync=$resync):"
python3 - <<EOF
print(f"  time: ctk {$c_s:.2f} s; rsync {$s_s:.2f} s ({$s_s/$c_s:.2f}x ctk)")
print(f"  bytes: ctk {$c_b}, rsync {$s_b}, changed {$changed} (zstd-1 {$floor}); ctk/rsync {$c_b/$s_b:.3f}")
EOF
