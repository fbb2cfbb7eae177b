#!/usr/bin/env bash
# Failback after a failover (issue 21's benchmark), side by side in one run. Each round:
#
#   A SIZE image of mixed data is replicated (a first full, not timed); 1% of it is then
#   rewritten at the original site and never replicated (S), the disk is failed over at the
#   receiver (`ctk-receiver failover start`), and 2% is rewritten through the DR export (D),
#   all in random 64 KiB extents. Bringing the original disk equal to the DR disk:
#     - ctk: one `ctk-agent failback` pass (D u S, read from the DR disk, over QUIC on
#       loopback, written through the agent's tracker);
#     - rsync: the DR image (copied out of the export first, not timed) onto the original
#       through an rsync daemon on loopback (`--inplace --no-whole-file`);
#     - ctk's digest compare, the path taken when the agent cannot name S: a second cycle
#       of the same changes, `ctk-agent failback --compare` (both sides hash every unit).
#   Then 10 MiB more is written at the DR site and `failback --final` is timed: its
#   downtime runs from the command's start (the DR export is stopped first) to the
#   receiver's commit of the new point.
#   Bytes on the wire: ctk's pass, rsync's "Total bytes sent", against the floor: S's and
#   D's extents, each once, as the DR disk holds them, compressed with zstd 1 one by one.
#
#   cargo build --release -p ctk-agent -p ctk-receiver -p ctk-benches --bins &&
#     benches/scripts/failback.sh [SIZE_MIB] [ROUNDS]        (default 4096 MiB, 3 rounds)
#
# Needs rsync and nbdcopy (Debian: rsync libnbd-bin).
set -euo pipefail
size_mib=${1:-4096}
rounds=${2:-3}
root=$(cd "$(dirname "$0")/../.." && pwd)
bin="$root/target/release"
for b in ctk-agent ctk-receiver ctk-stages; do
  [ -x "$bin/$b" ] || { echo "build first: cargo build --release -p ctk-agent -p ctk-receiver -p ctk-benches --bins" >&2; exit 1; }
done
for t in rsync nbdcopy; do
  command -v $t > /dev/null || { echo "$t is needed (apt-get install rsync libnbd-bin)" >&2; exit 1; }
done
now() { date +%s.%N; }
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
jq_() { python3 -c "import json,sys; d=[json.loads(l) for l in open('$1') if l.strip()]; print($2)"; }
pct_10mib=$(python3 -c "print(10 * 100 / $size_mib)")

failback() {
  "$bin/ctk-agent" failback --identity "$work/aid" --receiver "$addr" --receiver-fingerprint "$rfp" \
      --control "$work/ctl.sock" --work-dir "$work" --disk vm1 --json "$@"
}
start_failover() {
  "$bin/ctk-receiver" failover start --store "$work/store/bench" --disk vm1 \
      --listen "unix:$work/fo.sock" > "$work/fo.out" 2> "$work/fo.log" &
  fopid=$!
  until grep -q ready "$work/fo.out" 2>/dev/null; do sleep 0.05; done
}
# S and D of one cycle (seeds from $1), their extents in s.json and d.json.
changes() {
  "$bin/ctk-stages" scribble "$work/nbd.sock" vm1 1 "$1" > "$work/s.json"
  start_failover
  "$bin/ctk-stages" scribble "$work/fo.sock" vm1 2 "$(($1 + 1))" > "$work/d.json"
  sleep 2.5   # the running failover seals its writes in a cut each second, trusted after the next
}
# The floor: D u S's extents as the DR disk ($1) holds them, zstd-1.
floor_of() {
  "$bin/ctk-stages" floor "$1" "$work/s.json" "$work/d.json" > "$work/floor.json"
  jq_ "$work/floor.json" "d[0]['zstd_bytes']"
}

printf '%-6s %9s %9s %9s %10s   %12s %12s %12s %12s\n' round ctk_s rsync_s compare_s downtime_s \
    floor_B ctk_B rsync_B compare_B
ctk_s=(); rsync_s=(); cmp_s=(); down_s=(); ctk_r=(); rsync_r=(); cmp_r=()
for r in $(seq "$rounds"); do
  work=$(mktemp -d -p "${TMPDIR:-/var/tmp}")
  trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
  . "$(dirname "$0")/pair.sh"
  "$bin/ctk-stages" gen "$work/vm1.img" "$size_mib"
  start_receiver
  serve_agent
  replicate "$work/full.json"

  changes $((r * 10))
  # rsync's starting point: the original as it is, and the DR disk as a file.
  start_rsyncd
  nbdcopy "nbd+unix:///vm1?socket=$work/fo.sock" "$work/dr.img"
  floor=$(floor_of "$work/dr.img")
  sync; "$bin/ctk-stages" drop "$work/dr.img"; "$bin/ctk-stages" drop "$work/rsync/vm1.img"
  t0=$(now)
  rsync --inplace --no-whole-file --stats "$work/dr.img" "rsync://127.0.0.1:$port/bench/vm1.img" > "$work/rsync.out"
  t1=$(now)
  s_s=$(python3 -c "print($t1 - $t0)")
  s_b=$(sed -n 's/^Total bytes sent: \([0-9,.]*\).*/\1/p' "$work/rsync.out" | tr -d ',.')
  cmp -s "$work/dr.img" "$work/rsync/vm1.img" || { echo "rsync's copy differs" >&2; exit 1; }
  kill %?rsync 2>/dev/null || true
  rm -rf "$work/rsync"

  sync; "$bin/ctk-stages" drop "$work/vm1.img"
  t0=$(now); failback > "$work/pass.json"; t1=$(now)
  f_s=$(python3 -c "print($t1 - $t0)"); f_b=$(jq_ "$work/pass.json" "d[0]['delta_bytes']")
  cmp -s "$work/dr.img" "$work/vm1.img" || { echo "ctk's pass left the disk unlike the DR disk" >&2; exit 1; }
  rm -f "$work/dr.img"

  # The cutover, 10 MiB written at the DR site since the pass.
  "$bin/ctk-stages" scribble "$work/fo.sock" vm1 "$pct_10mib" $((r * 10 + 5)) > /dev/null
  sleep 2.5
  failback --final > "$work/final.json"
  wait $fopid || true
  down=$(jq_ "$work/final.json" "d[1]['downtime_seconds']")
  # Where the cutover's time went: the final pass, the commit (the receiver's merge steps).
  echo "  cutover: final pass $(jq_ "$work/final.json" "round(d[0]['seconds'], 2)") s, commit $(jq_ "$work/final.json" "round(d[1]['commit_seconds'], 2)") s" >&2
  grep ' merged ' "$work/r.log" | tail -1 | sed -n 's/.*steps=\(\[[^]]*\]\).*/  merge steps: \1/p' >&2
  grep 'failback commit' "$work/r.log" | tail -2 | sed 's/^.*INFO/ /' >&2
  "$bin/ctk-receiver" restore --store "$work/store/bench" --disk vm1 --point latest -o "$work/check.img" > /dev/null 2>&1
  cmp -s "$work/check.img" "$work/vm1.img" || { echo "the new point is not the disk" >&2; exit 1; }
  rm -f "$work/check.img"

  # The digest compare on a second cycle of the same size of change.
  changes $((r * 10 + 6))
  sync; "$bin/ctk-stages" drop "$work/vm1.img"
  t0=$(now); failback --compare > "$work/cmp.json"; t1=$(now)
  c_s=$(python3 -c "print($t1 - $t0)"); c_b=$(jq_ "$work/cmp.json" "d[0]['delta_bytes']")
  c_floor=$(floor_of "$work/vm1.img")
  failback --final > /dev/null
  wait $fopid || true

  printf '%-6s %9.2f %9.2f %9.2f %10.2f   %12d %12d %12d %12d\n' "$r" "$f_s" "$s_s" "$c_s" "$down" \
      "$floor" "$f_b" "$s_b" "$c_b"
  ctk_s+=("$f_s"); rsync_s+=("$s_s"); cmp_s+=("$c_s"); down_s+=("$down")
  ctk_r+=("$(python3 -c "print($f_b / $floor)")"); rsync_r+=("$(python3 -c "print($s_b / $floor)")")
  cmp_r+=("$(python3 -c "print($c_b / $c_floor)")")
  kill $(jobs -p) 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
done
m() { printf '%s\n' "$@" | median; }
echo
echo "failback, ${size_mib} MiB, 1% changed at the source and 2% at the DR site, medians of $rounds rounds:"
python3 - <<EOF
f, s, c, d = $(m "${ctk_s[@]}"), $(m "${rsync_s[@]}"), $(m "${cmp_s[@]}"), $(m "${down_s[@]}")
print(f"  time: ctk pass {f:.2f} s; rsync {s:.2f} s ({s/f:.1f}x ctk); digest compare {c:.2f} s ({c/f:.1f}x ctk)")
print(f"  bytes on the wire / zstd-1 of D u S: ctk {$(m "${ctk_r[@]}"):.3f}, rsync {$(m "${rsync_r[@]}"):.3f}, digest compare {$(m "${cmp_r[@]}"):.3f}")
print(f"  cutover downtime with 10 MiB changed since the last pass: {d:.2f} s")
EOF
