#!/usr/bin/env bash
# An increment on a long link, merged by this build's receiver (the undo written while the
# delta arrives) and by another build's (e.g. one before that change: the undo written in a
# pass after the delta), alternating, one run each at a time.
#
#   git worktree add /tmp/before 1da64d3 &&
#     (cd /tmp/before && cargo build --release -p ctk-receiver --target-dir /tmp/before-target) &&
#     cargo build --release -p ctk-agent -p ctk-receiver -p ctk-benches --bins &&
#     benches/scripts/undo_overlap.sh /tmp/before-target/release/ctk-receiver [SIZE_MIB] [ONE_WAY_MS] [RUNS]
#                                     (default 1024 MiB, 20 ms each way, 5 runs)
#
# Each run: a fresh store and journal, a first full of a mixed image, 2% of it rewritten
# through NBD in random 64 KiB extents, then the timed `replicate` of that change through
# `udp-delay`. Prints each run's time and the receiver's merge steps, and the medians.
set -euo pipefail
other=${1:?"usage: undo_overlap.sh OTHER_RECEIVER [SIZE_MIB] [ONE_WAY_MS] [RUNS]"}
size_mib=${2:-1024}
one_way_ms=${3:-20}
runs=${4:-5}
root=$(cd "$(dirname "$0")/../.." && pwd)
bin="$root/target/release"
for b in ctk-agent ctk-receiver ctk-stages udp-delay; do
  [ -x "$bin/$b" ] || { echo "build first: cargo build --release -p ctk-agent -p ctk-receiver -p ctk-benches --bins" >&2; exit 1; }
done
[ -x "$other" ] || { echo "$other: not an executable receiver" >&2; exit 1; }
work=$(mktemp -d -p "${TMPDIR:-/var/tmp}")
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
# shellcheck source=pair.sh
. "$root/benches/scripts/pair.sh"
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
"$bin/ctk-stages" gen "$work/base.img" "$size_mib"
this_s=(); other_s=()
for run in $(seq "$runs"); do
  for which in this other; do
    kill $(jobs -p) 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$work/store" "$work"/vm1.img* "$work"/*.sock "$work"/*.out "$work/r.log"
    cp --sparse=always "$work/base.img" "$work/vm1.img"
    if [ "$which" = this ]; then unset receiver_bin; else receiver_bin=$other; fi
    start_receiver
    port=$((20000 + RANDOM % 20000))
    "$bin/udp-delay" "127.0.0.1:$port" "$addr" "$one_way_ms" 2>/dev/null &
    addr="127.0.0.1:$port"
    serve_agent
    replicate "$work/full.json"
    "$bin/ctk-stages" scribble "$work/nbd.sock" vm1 2 "$run" > /dev/null
    sync
    "$bin/ctk-stages" drop "$work/vm1.img"
    t0=$(date +%s.%N); replicate "$work/rep.json"; t1=$(date +%s.%N)
    s=$(python3 -c "print(round($t1 - $t0, 3))")
    steps=$(grep ' merged ' "$work/r.log" | tail -1 | sed -n 's/.*steps=\(\[.*\]\).*/\1/p')
    echo "run $run, $which receiver: $s s; merge steps $steps" >&2
    if [ "$which" = this ]; then this_s+=("$s"); else other_s+=("$s"); fi
  done
done
mt=$(printf '%s\n' "${this_s[@]}" | median); mo=$(printf '%s\n' "${other_s[@]}" | median)
echo "increment of 2% of ${size_mib} MiB, RTT $((2 * one_way_ms)) ms added, medians of $runs runs:"
echo "  this build: ${mt} s (runs: ${this_s[*]})"
echo "  other build ($other): ${mo} s (runs: ${other_s[*]})"
python3 -c "print('  this / other: %.2f' % ($mt / $mo))"
