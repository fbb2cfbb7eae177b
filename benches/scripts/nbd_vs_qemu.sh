#!/usr/bin/env bash
# fio through ctk-agent's NBD front versus qemu-nbd serving the same kind of file, side by
# side in one run. Prints medians of RUNS runs and the ctk/qemu-nbd ratios.
#
#   cargo build --release -p ctk-agent && benches/scripts/nbd_vs_qemu.sh [SECONDS] [RUNS]
#
# COLD=1 restarts both servers on fresh files before every run, so each run pays the
# agent's first-write intent fsync for every region it touches (the worst case); otherwise
# the servers live across runs and later runs find every intent region live.
set -euo pipefail
secs=${1:-10}
runs=${2:-3}
root=$(cd "$(dirname "$0")/../.." && pwd)
agent="${AGENT:-$root/target/release/ctk-agent}"
[ -x "$agent" ] || { echo "build first: cargo build --release -p ctk-agent" >&2; exit 1; }
for t in fio qemu-nbd python3; do command -v $t >/dev/null || { echo "$t is required" >&2; exit 1; }; done
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
size=4G

start_ctk() {
  rm -f "$work/ctk.img" "$work/ctk.img.ctk"*
  truncate -s $size "$work/ctk.img"
  "$agent" serve --disk d0="$work/ctk.img" --listen "unix:$work/ctk.sock" --control "$work/ctl.sock" > "$work/ctk.out" &
  ctk_pid=$!
  until grep -q ready "$work/ctk.out" 2>/dev/null; do sleep 0.05; done
}
start_qemu() {
  rm -f "$work/qemu.img"
  truncate -s $size "$work/qemu.img"
  qemu-nbd -t -f raw -x d0 --cache=writeback --aio=threads -k "$work/qemu.sock" "$work/qemu.img" &
  qemu_pid=$!
  until [ -S "$work/qemu.sock" ]; do sleep 0.05; done
}
restart() {
  kill "$ctk_pid" "$qemu_pid" 2>/dev/null || true
  wait "$ctk_pid" "$qemu_pid" 2>/dev/null || true
  rm -f "$work/ctk.sock" "$work/qemu.sock" "$work/ctk.out"
  start_ctk; start_qemu
}
# fio job: $1 socket, $2 rw, $3 bs, $4 iodepth -> "iops bw_bytes p99_ns"
job() {
  fio --name=j --ioengine=nbd --uri="nbd+unix:///d0?socket=$1" --rw=$2 --bs=$3 --iodepth=$4 \
      --numjobs=1 --size=$size --time_based --runtime=$secs --output-format=json 2>/dev/null |
    python3 -c 'import json,sys; t=sys.stdin.read(); j=json.loads(t[t.index("{"):])["jobs"][0]["write"]; print(j["iops"], j["bw_bytes"], j["clat_ns"]["percentile"]["99.000000"])'
}
start_ctk; start_qemu
declare -A res
for w in "randwrite 4k 16" "write 1M 16"; do
  set -- $w
  for peer in ctk qemu; do
    vals=()
    for _ in $(seq "$runs"); do
      [ "${COLD:-}" = 1 ] && restart
      vals+=("$(job "$work/$peer.sock" "$1" "$2" "$3")")
    done
    res["$1 $peer"]=$(printf '%s\n' "${vals[@]}" | python3 -c '
import sys, statistics
rows=[list(map(float,l.split())) for l in sys.stdin if l.strip()]
print(*[statistics.median(c) for c in zip(*rows)])')
  done
done
echo "| workload | ctk-agent | qemu-nbd | ratio ctk/qemu |"
echo "|---|---|---|---|"
for w in randwrite write; do
  read ci cb cp <<<"${res["$w ctk"]}"; read qi qb qp <<<"${res["$w qemu"]}"
  python3 - "$w" "$ci" "$cb" "$cp" "$qi" "$qb" "$qp" <<'PY'
import sys
w,ci,cb,cp,qi,qb,qp=sys.argv[1],*map(float,sys.argv[2:])
print(f"| {w} IOPS | {ci:,.0f} | {qi:,.0f} | {ci/qi:.2f} |")
print(f"| {w} throughput | {cb/1e9:.2f} GB/s | {qb/1e9:.2f} GB/s | {cb/qb:.2f} |")
print(f"| {w} p99 latency | {cp/1e3:.0f} us | {qp/1e3:.0f} us | {cp/qp:.2f} |")
PY
done
