#!/usr/bin/env bash
# How long a cut holds NBD writes (flush + seal, no user hooks) while fio writes at full
# speed, over N cuts; and the cost of copy-on-write: fio write throughput while an export of
# a 10% delta runs, against the throughput with no export, in the same run.
#
#   cargo build --release -p ctk-agent && benches/scripts/cut_latency.sh [CUTS]
set -euo pipefail
cuts=${1:-200}
root=$(cd "$(dirname "$0")/../.." && pwd)
agent="$root/target/release/ctk-agent"
[ -x "$agent" ] || { echo "build first: cargo build --release -p ctk-agent" >&2; exit 1; }
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
truncate -s 4G "$work/d.img"
"$agent" serve --disk d0="$work/d.img" --listen "unix:$work/nbd.sock" --control "$work/ctl.sock" > "$work/out" &
until grep -q ready "$work/out" 2>/dev/null; do sleep 0.05; done
uri="nbd+unix:///d0?socket=$work/nbd.sock"
fio_bw() { # $1 seconds -> write bytes/s
  fio --name=j --ioengine=nbd --uri="$uri" --rw=randwrite --bs=64k --iodepth=16 --size=4G \
      --time_based --runtime="$1" --output-format=json 2>/dev/null |
    python3 -c 'import json,sys; t=sys.stdin.read(); print(json.loads(t[t.index("{"):])["jobs"][0]["write"]["bw_bytes"])'
}

# 1. Cut hold time under load (COW_ONLY=1 skips it).
if [ "${COW_ONLY:-}" != 1 ]; then
fio --name=load --ioengine=nbd --uri="$uri" --rw=randwrite --bs=4k --iodepth=16 --size=4G \
    --time_based --runtime=3600 > /dev/null 2>&1 &
load=$!
sleep 1
for _ in $(seq "$cuts"); do
  "$agent" cut --control "$work/ctl.sock" --json |
    python3 -c 'import json,sys; a=json.load(sys.stdin); print(a["hold_ms"], a["drain_ms"], a["seal_ms"])'
  sleep 0.02
done > "$work/holds"
kill $load; wait $load 2>/dev/null || true
python3 - "$work/holds" <<'PY'
import sys
rows = [[float(x) for x in line.split()] for line in open(sys.argv[1])]
for i, what in enumerate(["hold (from asking to release)", "  of which drain", "  of which seal"]):
    v = sorted(r[i] for r in rows)
    p = lambda q: v[min(len(v) - 1, int(q * len(v)))]
    print(f"| cut {what}, 4 KiB random writes at QD16, {len(v)} cuts | p50 {p(0.5):.2f} ms | p99 {p(0.99):.2f} ms | max {v[-1]:.2f} ms |")
PY
fi
[ "${HOLD_ONLY:-}" = 1 ] && exit 0

# 2. Copy-on-write cost: write throughput alone, then while a 10% delta is exported.
fio --name=fill --ioengine=nbd --uri="$uri" --rw=write --bs=1M --iodepth=8 --size=4G > /dev/null 2>&1
# Throughput alone first: measured after the base it would dirty the whole disk.
alone=$(fio_bw 8)
base=$("$agent" cut --control "$work/ctl.sock")
# Keep the base answerable however many exports follow.
"$agent" cursor register bench --at "$base" --control "$work/ctl.sock" > /dev/null
fio --name=dirty --ioengine=nbd --uri="$uri" --rw=randwrite --bs=64k --iodepth=8 --size=4G --io_size=410M > /dev/null 2>&1
# Export the >= 10% delta back to back for the whole fio window: every write meets a running
# export.
( n=0; while [ ! -e "$work/stop" ]; do
    "$agent" export --since "$base" -o "$work/delta.ctkd" --control "$work/ctl.sock" --json > "$work/export.json"; python3 -c "import json; a=json.load(open(\"$work/export.json\")); print(a[\"to\"], a[\"changed_bytes\"])" >> "$work/exports.log"
    n=$((n+1)); echo $n > "$work/exports"
  done ) &
exp=$!
during=$(fio_bw 8)
touch "$work/stop"; wait $exp
echo "base $base"; head -3 "$work/exports.log"; tail -2 "$work/exports.log"
python3 - "$alone" "$during" "$work/export.json" <<'PY'
import json, sys
alone, during = float(sys.argv[1]), float(sys.argv[2])
e = json.load(open(sys.argv[3]))
print(f"| fio 64 KiB random writes while exports of >= {e['changed_bytes']/2**20:.0f} MiB changed run back to back | {during/1e6:.0f} MB/s vs {alone/1e6:.0f} MB/s alone | ratio {during/alone:.2f} | CoW peak of the last export {e['cow_peak_bytes']/2**20:.1f} MiB |")
PY
