#!/usr/bin/env bash
# A drill's writable overlay, and a failover's tracked one, against qemu-nbd writing a qcow2
# overlay backed by the same raw image, in one run: random 4 KiB writes at QD16 (fio, nbd engine), SECONDS each, RUNS runs
# alternating the servers, each run on a fresh overlay. Medians and ratios drill/qemu-nbd.
#
#   cargo build --release -p ctk-agent -p ctk-receiver -p ctk-benches --bins &&
#     benches/scripts/drill_vs_qcow2.sh [SIZE_MIB] [SECONDS] [RUNS]   (4096 10 3)
set -euo pipefail
size_mib=${1:-4096}
secs=${2:-10}
runs=${3:-3}
root=$(cd "$(dirname "$0")/../.." && pwd)
bin="$root/target/release"
for b in ctk-agent ctk-receiver ctk-stages; do
  [ -x "$bin/$b" ] || { echo "build first: cargo build --release -p ctk-agent -p ctk-receiver -p ctk-benches --bins" >&2; exit 1; }
done
for t in fio qemu-nbd qemu-img python3; do
  command -v $t > /dev/null || { echo "$t is needed (apt-get install fio qemu-utils)" >&2; exit 1; }
done
work=$(mktemp -d -p "${TMPDIR:-/var/tmp}")
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
. "$(dirname "$0")/pair.sh"

echo "generating a ${size_mib} MiB mixed image and its first point..." >&2
"$bin/ctk-stages" gen "$work/vm1.img" "$size_mib"
start_receiver
serve_agent
replicate "$work/rep.json"
kill $apid; wait $apid 2>/dev/null || true
store="$work/store/bench"
"$bin/ctk-receiver" restore --store "$store" --disk vm1 --point latest -o "$work/base.raw" > /dev/null 2>&1

# fio job: $1 socket -> "iops bw_bytes p99_ns"
job() {
  fio --name=j --ioengine=nbd --uri="nbd+unix:///vm1?socket=$1" --rw=randwrite --bs=4k --iodepth=16 \
      --numjobs=1 --size="${size_mib}M" --time_based --runtime="$secs" --output-format=json 2>/dev/null |
    python3 -c 'import json,sys; t=sys.stdin.read(); j=json.loads(t[t.index("{"):])["jobs"][0]["write"]; print(j["iops"], j["bw_bytes"], j["clat_ns"]["percentile"]["99.000000"])'
}
med_cols() { python3 -c '
import sys, statistics
rows=[list(map(float,l.split())) for l in sys.stdin if l.strip()]
print(*[statistics.median(c) for c in zip(*rows)])'; }

ds=(); qs=(); fs=(); ms=()
for _ in $(seq "$runs"); do
  # A failover's tracked overlay: every first write of a 1 MiB region copies it up and syncs
  # it before the write's intent is durable.
  rm -f "$work/f.out" "$work/f.sock"
  "$bin/ctk-receiver" failover start --store "$store" --disk vm1 --listen "unix:$work/f.sock" > "$work/f.out" 2>/dev/null &
  fpid=$!
  until grep -q ready "$work/f.out" 2>/dev/null; do sleep 0.05; done
  fs+=("$(job "$work/f.sock")")
  kill $fpid; wait $fpid 2>/dev/null || true
  "$bin/ctk-receiver" failover rollback --store "$store" --disk vm1 --discard-writes > /dev/null
  # The same once --materialize has copied the whole point in: no copy-ups left.
  rm -f "$work/f.out" "$work/f.sock" "$work/m.img"
  "$bin/ctk-receiver" failover start --store "$store" --disk vm1 --listen "unix:$work/f.sock" \
      --materialize "$work/m.img" > "$work/f.out" 2>/dev/null &
  fpid=$!
  until "$bin/ctk-receiver" failover status --store "$store" --disk vm1 --json 2>/dev/null |
      grep -q '"materialized_percent":100.0'; do sleep 0.2; done
  ms+=("$(job "$work/f.sock")")
  kill $fpid; wait $fpid 2>/dev/null || true
  "$bin/ctk-receiver" failover rollback --store "$store" --disk vm1 --discard-writes > /dev/null
  rm -f "$work/d.out" "$work/d.sock"
  "$bin/ctk-receiver" drill start --store "$store" --disk vm1 --listen "unix:$work/d.sock" > "$work/d.out" &
  dpid=$!
  until grep -q ready "$work/d.out" 2>/dev/null; do sleep 0.05; done
  ds+=("$(job "$work/d.sock")")
  "$bin/ctk-receiver" drill stop --store "$store" --disk vm1 --result passed > /dev/null
  wait $dpid 2>/dev/null || true
  rm -f "$work/ov.qcow2" "$work/q.sock"
  qemu-img create -q -f qcow2 -b "$work/base.raw" -F raw "$work/ov.qcow2"
  qemu-nbd -t -f qcow2 -x vm1 --cache=writeback --aio=threads -k "$work/q.sock" "$work/ov.qcow2" &
  qpid=$!
  until [ -S "$work/q.sock" ]; do sleep 0.05; done
  qs+=("$(job "$work/q.sock")")
  kill $qpid; wait $qpid 2>/dev/null || true
done
read -r di db dp <<< "$(printf '%s\n' "${ds[@]}" | med_cols)"
read -r qi qb qp <<< "$(printf '%s\n' "${qs[@]}" | med_cols)"
read -r fi fb fp <<< "$(printf '%s\n' "${fs[@]}" | med_cols)"
read -r mi mb mp <<< "$(printf '%s\n' "${ms[@]}" | med_cols)"
echo "| overlay | randwrite 4k QD16 IOPS | p99 latency | IOPS / qemu-nbd |"
echo "|---|---|---|---|"
python3 - "$di" "$dp" "$fi" "$fp" "$mi" "$mp" "$qi" "$qp" <<'EOF'
import sys
di, dp, fi, fp, mi, mp, qi, qp = map(float, sys.argv[1:])
for name, i, p in [("drill", di, dp), ("failover, fresh", fi, fp),
                   ("failover, materialized", mi, mp), ("qemu-nbd, qcow2", qi, qp)]:
    print(f"| {name} | {i:,.0f} | {p/1e3:,.0f} us | {i/qi:.2f} |")
EOF
echo "runs: drill ${ds[*]} / failover ${fs[*]} / materialized ${ms[*]} / qemu ${qs[*]}" >&2
