#!/usr/bin/env bash
# Time to a usable NBD export of a restore point, by disk size, in one run: `expose` until its
# ready line, and `failover start` (fence, overlay created, served) until its ready line,
# against `restore` of the point to a raw file plus qemu-nbd started on it. Cold each time
# (page cache dropped), RUNS runs, medians.
#
#   For each SIZE_MIB: a sparse disk of that size whose first DATA_MIB hold mixed data is
#   replicated through the agent (first full), then 0.1% of it changed and replicated
#   POINTS-1 times (random 64 KiB extents over the whole disk, through the agent's NBD front).
#
#   cargo build --release -p ctk-agent -p ctk-receiver -p ctk-benches --bins &&
#     benches/scripts/export_time.sh ["SIZES_MIB"] [DATA_MIB] [POINTS] [RUNS]   ("4096 65536" 1024 5 3)
set -euo pipefail
sizes=${1:-4096 65536}
data_mib=${2:-1024}
npoints=${3:-5}
runs=${4:-3}
root=$(cd "$(dirname "$0")/../.." && pwd)
bin="$root/target/release"
for b in ctk-agent ctk-receiver ctk-stages; do
  [ -x "$bin/$b" ] || { echo "build first: cargo build --release -p ctk-agent -p ctk-receiver -p ctk-benches --bins" >&2; exit 1; }
done
for t in qemu-nbd python3; do
  command -v $t > /dev/null || { echo "$t is needed (apt-get install qemu-utils)" >&2; exit 1; }
done
now() { date +%s.%N; }
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
cold() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }
# $1 command (expose|failover), $2 point -> seconds until its ready line
ready_time() {
  rm -f "$work/x.out" "$work/x.sock"
  cold
  local t0 t1
  t0=$(now)
  if [ "$1" = expose ]; then
    "$bin/ctk-receiver" expose --store "$store" --disk vm1 --point "$2" --listen "unix:$work/x.sock" > "$work/x.out" &
  else
    "$bin/ctk-receiver" failover start --store "$store" --disk vm1 --point "$2" --listen "unix:$work/x.sock" > "$work/x.out" 2>/dev/null &
  fi
  local pid=$!
  until grep -q ready "$work/x.out" 2>/dev/null; do sleep 0.005; done
  t1=$(now)
  kill $pid; wait $pid 2>/dev/null || true
  [ "$1" = failover ] && "$bin/ctk-receiver" failover rollback --store "$store" --disk vm1 --discard-writes > /dev/null
  python3 -c "print($t1 - $t0)"
}
restore_time() { # $1 point -> seconds until qemu-nbd serves the restored file
  rm -f "$work/p.raw" "$work/q.sock"
  cold
  local t0 t1
  t0=$(now)
  "$bin/ctk-receiver" restore --store "$store" --disk vm1 --point "$1" -o "$work/p.raw" > /dev/null 2>&1
  qemu-nbd -t -r -f raw -x vm1 -k "$work/q.sock" "$work/p.raw" &
  local pid=$!
  until [ -S "$work/q.sock" ]; do sleep 0.005; done
  t1=$(now)
  kill $pid; wait $pid 2>/dev/null || true
  rm -f "$work/p.raw"
  python3 -c "print($t1 - $t0)"
}

echo "| disk | point | expose | failover start | restore + qemu-nbd | restore / expose |"
echo "|---|---|---|---|---|---|"
for size_mib in $sizes; do
  work=$(mktemp -d -p "${TMPDIR:-/var/tmp}")
  trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
  . "$(dirname "$0")/pair.sh"
  echo "$size_mib MiB: $data_mib MiB of data, $npoints points..." >&2
  "$bin/ctk-stages" gen "$work/vm1.img" "$data_mib"
  truncate -s "${size_mib}M" "$work/vm1.img"
  start_receiver
  serve_agent
  replicate "$work/rep.json"
  for r in $(seq 2 "$npoints"); do
    "$bin/ctk-stages" scribble "$work/nbd.sock" vm1 0.1 "$r" > /dev/null
    replicate "$work/rep.json"
  done
  kill $apid; wait $apid 2>/dev/null || true
  store="$work/store/bench"
  ids=$("$bin/ctk-receiver" points --store "$store" --disk vm1 --json |
    python3 -c 'import json,sys; print(" ".join(p["change_id"] for p in json.load(sys.stdin)[0]["points"]))')
  read -r -a ids <<< "$ids"
  for which in newest oldest; do
    if [ $which = newest ]; then p=${ids[-1]}; else p=${ids[0]}; fi
    xs=(); fs=(); rs=()
    for _ in $(seq "$runs"); do
      xs+=("$(ready_time expose "$p")")
      fs+=("$(ready_time failover "$p")")
      rs+=("$(restore_time "$p")")
    done
    x=$(printf '%s\n' "${xs[@]}" | median); f=$(printf '%s\n' "${fs[@]}" | median)
    r=$(printf '%s\n' "${rs[@]}" | median)
    python3 -c "print(f'| {$size_mib//1024} GiB | {\"$which\"} | {$x:.2f} s | {$f:.2f} s | {$r:.2f} s | {$r/$x:,.0f}x |')"
    echo "runs $size_mib $which: expose ${xs[*]} failover ${fs[*]} restore ${rs[*]}" >&2
  done
  kill $(jobs -p) 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
done
