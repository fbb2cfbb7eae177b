#!/usr/bin/env bash
# How long a consistency group's cut holds writes, beside a one-disk cut, under the same load
# in the same run: one agent serving 4 disks as group g, fio writing random 4 KiB blocks at
# iodepth 16 to every disk, and N cuts of each kind alternating (a one-disk cut of d0, then a
# cut of the whole group). The hold is timed from asking for the first gate to releasing the
# last (every member's writes wait that long at most).
#
#   cargo build --release -p ctk-agent && benches/scripts/group_cut.sh [CUTS]
set -euo pipefail
cuts=${1:-150}
root=$(cd "$(dirname "$0")/../.." && pwd)
agent="$root/target/release/ctk-agent"
[ -x "$agent" ] || { echo "build first: cargo build --release -p ctk-agent" >&2; exit 1; }
command -v fio > /dev/null || { echo "fio is needed (apt-get install fio)" >&2; exit 1; }
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
disks=() jobs=()
for i in 0 1 2 3; do
  truncate -s 1G "$work/d$i.img"
  disks+=(--disk "d$i=$work/d$i.img")
  jobs+=(--name="d$i" --uri="nbd+unix:///d$i?socket=$work/nbd.sock")
done
"$agent" serve "${disks[@]}" --group g=d0,d1,d2,d3 --listen "unix:$work/nbd.sock" \
  --control "$work/ctl.sock" > "$work/out" 2> "$work/err" &
until grep -q ready "$work/out" 2>/dev/null; do sleep 0.05; done
fio --ioengine=nbd --rw=randwrite --bs=4k --iodepth=16 --size=1G --time_based --runtime=3600 \
  "${jobs[@]}" > /dev/null 2>&1 &
load=$!
sleep 2
writes() { "$agent" status --control "$work/ctl.sock" --json |
  python3 -c 'import json,sys; print(" ".join(str(d["writes"]) for d in json.load(sys.stdin)["disks"]))'; }
before=$(writes); t0=$(date +%s.%N)
for _ in $(seq "$cuts"); do
  "$agent" cut --disk d0 --consistency crash --control "$work/ctl.sock" --json |
    python3 -c 'import json,sys; print("disk", json.load(sys.stdin)["hold_ms"])'
  sleep 0.02
  "$agent" cut --group g --consistency crash --control "$work/ctl.sock" --json |
    python3 -c 'import json,sys; a=json.load(sys.stdin); assert len(a["members"]) == 4; print("group", a["hold_ms"])'
  sleep 0.02
done > "$work/holds"
after=$(writes); t1=$(date +%s.%N)
kill $load; wait $load 2>/dev/null || true
python3 - "$work/holds" "$before" "$after" "$t0" "$t1" <<'PY'
import sys
before, after = [int(x) for x in sys.argv[2].split()], [int(x) for x in sys.argv[3].split()]
secs = float(sys.argv[5]) - float(sys.argv[4])
iops = [(a - b) / secs for a, b in zip(after, before)]
# The load is real on every disk, or the holds say nothing.
assert all(i > 100 for i in iops), f"fio did not write to every disk: {iops}"
print("write IOPS per disk during the cuts:", " ".join(f"{i:.0f}" for i in iops))
rows = [line.split() for line in open(sys.argv[1])]
res = {}
for kind, label in [("disk", "one disk (d0)"), ("group", "group of 4 disks")]:
    v = sorted(float(ms) for k, ms in rows if k == kind)
    p = lambda q: v[min(len(v) - 1, int(q * len(v)))]
    res[kind] = p(0.99)
    print(f"| cut of {label}, 4 KiB random writes at QD16 on each of 4 disks, {len(v)} cuts | p50 {p(0.5):.2f} ms | p99 {p(0.99):.2f} ms | max {v[-1]:.2f} ms |")
print(f"group p99 / one-disk p99: {res['group'] / res['disk']:.2f}")
PY
