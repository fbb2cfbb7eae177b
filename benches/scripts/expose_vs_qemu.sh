#!/usr/bin/env bash
# Restore points served over NBD: `ctk-receiver expose` against qemu-nbd serving the same
# bytes as a raw file, in one run.
#
#   1. A SIZE image of mixed data is replicated through the agent (first full), then changed
#      POINTS-1 times (2% each, random 64 KiB extents, through the agent's NBD front) and
#      replicated after each change: POINTS points, the oldest 24 back when POINTS is 25.
#   2. Time to a usable export: `expose` until its ready line, against `restore` of the point
#      to a raw file and qemu-nbd started on it.
#   3. fio (nbd engine) against the newest point and the oldest, each through `expose` and
#      through qemu-nbd (read-only, on the restored raw file): random 4 KiB reads at QD16 and
#      sequential 1 MiB reads at QD16, SECONDS each, RUNS runs alternating the servers, page
#      cache warm for both (each file read once first). Medians and ratios ctk/qemu-nbd.
#
#   cargo build --release -p ctk-agent -p ctk-receiver -p ctk-benches --bins &&
#     benches/scripts/expose_vs_qemu.sh [SIZE_MIB] [POINTS] [SECONDS] [RUNS]   (4096 25 10 3)
set -euo pipefail
size_mib=${1:-4096}
npoints=${2:-25}
secs=${3:-10}
runs=${4:-3}
root=$(cd "$(dirname "$0")/../.." && pwd)
bin="$root/target/release"
for b in ctk-agent ctk-receiver ctk-stages; do
  [ -x "$bin/$b" ] || { echo "build first: cargo build --release -p ctk-agent -p ctk-receiver -p ctk-benches --bins" >&2; exit 1; }
done
for t in fio qemu-nbd python3; do
  command -v $t > /dev/null || { echo "$t is needed (apt-get install fio qemu-utils)" >&2; exit 1; }
done
work=$(mktemp -d -p "${TMPDIR:-/var/tmp}")
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
now() { date +%s.%N; }
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
. "$(dirname "$0")/pair.sh"

echo "generating a ${size_mib} MiB mixed image and $npoints points..." >&2
"$bin/ctk-stages" gen "$work/vm1.img" "$size_mib"
start_receiver
serve_agent
replicate "$work/rep.json"
for r in $(seq 2 "$npoints"); do
  "$bin/ctk-stages" scribble "$work/nbd.sock" vm1 2 "$r" > /dev/null
  replicate "$work/rep.json"
done
kill $apid; wait $apid 2>/dev/null || true
store="$work/store/bench"
ids=$("$bin/ctk-receiver" points --store "$store" --disk vm1 --json |
  python3 -c 'import json,sys; print(" ".join(p["change_id"] for p in json.load(sys.stdin)[0]["points"]))')
read -r -a ids <<< "$ids"
[ "${#ids[@]}" -ge "$npoints" ] || { echo "only ${#ids[@]} points" >&2; exit 1; }
newest=${ids[-1]}; oldest=${ids[0]}
echo "newest $newest, oldest $oldest ($(( ${#ids[@]} - 1 )) back)" >&2

start_expose() { # $1 point, $2 socket -> xpid
  rm -f "$work/x.out"
  "$bin/ctk-receiver" expose --store "$store" --disk vm1 --point "$1" --listen "unix:$2" > "$work/x.out" &
  xpid=$!
  until grep -q ready "$work/x.out" 2>/dev/null; do sleep 0.01; done
}
# fio job: $1 socket, $2 rw, $3 bs -> "iops bw_bytes p99_ns"
job() {
  fio --name=j --ioengine=nbd --uri="nbd+unix:///vm1?socket=$1" --rw=$2 --bs=$3 --iodepth=16 \
      --numjobs=1 --size="${size_mib}M" --time_based --runtime="$secs" --output-format=json 2>/dev/null |
    python3 -c 'import json,sys; t=sys.stdin.read(); j=json.loads(t[t.index("{"):])["jobs"][0]["read"]; print(j["iops"], j["bw_bytes"], j["clat_ns"]["percentile"]["99.000000"])'
}
med_cols() { python3 -c '
import sys, statistics
rows=[list(map(float,l.split())) for l in sys.stdin if l.strip()]
print(*[statistics.median(c) for c in zip(*rows)])'; }

echo "| point | workload | expose | qemu-nbd | ratio expose/qemu-nbd |"
echo "|---|---|---|---|---|"
for which in newest oldest; do
  p=${!which}
  # Time to a usable export, cold: expose until ready, against restore + qemu-nbd.
  sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
  t0=$(now); start_expose "$p" "$work/x.sock"; t1=$(now)
  te=$(python3 -c "print($t1 - $t0)")
  kill $xpid; wait $xpid 2>/dev/null || true
  sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
  t0=$(now)
  "$bin/ctk-receiver" restore --store "$store" --disk vm1 --point "$p" -o "$work/p.raw" > /dev/null 2>&1
  rm -f "$work/q.sock"
  qemu-nbd -t -r -f raw -x vm1 -k "$work/q.sock" "$work/p.raw" &
  qpid=$!
  until [ -S "$work/q.sock" ]; do sleep 0.01; done
  t1=$(now)
  tr=$(python3 -c "print($t1 - $t0)")
  python3 -c "print(f'| {\"$which\"} | time to a usable export | {$te:.2f} s | {$tr:.2f} s (restore + start) | {$te/$tr:.3f} |')"
  start_expose "$p" "$work/x.sock"
  # Warm both: each reads its files once.
  cat "$work/p.raw" > /dev/null
  job "$work/x.sock" read 1M > /dev/null
  for w in "randread 4k" "read 1M"; do
    set -- $w
    xs=(); qs=()
    for _ in $(seq "$runs"); do
      xs+=("$(job "$work/x.sock" "$1" "$2")")
      qs+=("$(job "$work/q.sock" "$1" "$2")")
    done
    read -r xi xb xp <<< "$(printf '%s\n' "${xs[@]}" | med_cols)"
    read -r qi qb qp <<< "$(printf '%s\n' "${qs[@]}" | med_cols)"
    python3 - "$which" "$1 $2" "$xi" "$xb" "$xp" "$qi" "$qb" "$qp" <<'EOF'
import sys
which, w = sys.argv[1], sys.argv[2]
xi, xb, xp, qi, qb, qp = map(float, sys.argv[3:])
print(f"| {which} | {w} QD16 IOPS | {xi:,.0f} | {qi:,.0f} | {xi/qi:.2f} |")
print(f"| {which} | {w} QD16 throughput | {xb/1e6:,.0f} MB/s | {qb/1e6:,.0f} MB/s | {xb/qb:.2f} |")
print(f"| {which} | {w} QD16 p99 latency | {xp/1e3:,.0f} us | {qp/1e3:,.0f} us | {xp/qp:.2f} |")
EOF
  done
  kill $xpid $qpid; wait $xpid $qpid 2>/dev/null || true
  rm -f "$work/p.raw"
done
