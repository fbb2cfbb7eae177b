#!/usr/bin/env bash
# RPO under a steady write load (issue 5's benchmark): fio writes random 4 KiB blocks through
# the agent's NBD front at RATE IOPS (default 2,000) for SECONDS (default 60) while
# `ctk-agent replicate --every 1s` keeps a receiver on loopback up to date.
#
#   cargo build --release -p ctk-agent -p ctk-receiver -p ctk-benches --bins &&
#     benches/scripts/rpo.sh [SIZE_MIB] [SECONDS] [RATE]       (default 4096 60 2000)
#
# The RPO at an instant is its age of the newest committed cut; it is sampled every 10 ms
# from the commit log (each cycle's cut and commit times), and p50/p99/max are printed with
# their ratio to the 1 s interval. CPU: user+system seconds of the agent daemon and of
# `replicate`, per MiB of changed data replicated. Needs fio (with its nbd engine).
set -euo pipefail
size_mib=${1:-4096}
seconds=${2:-60}
rate=${3:-2000}
root=$(cd "$(dirname "$0")/../.." && pwd)
bin="$root/target/release"
for b in ctk-agent ctk-receiver ctk-stages; do
  [ -x "$bin/$b" ] || { echo "build first: cargo build --release -p ctk-agent -p ctk-receiver -p ctk-benches --bins" >&2; exit 1; }
done
command -v fio > /dev/null || { echo "fio is needed (apt-get install fio)" >&2; exit 1; }
work=$(mktemp -d -p "${TMPDIR:-/var/tmp}")
trap 'kill $(jobs -p) 2>/dev/null || true; [ -n "${KEEP:-}" ] || rm -rf "$work"' EXIT
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }

echo "generating a ${size_mib} MiB mixed image..." >&2
"$bin/ctk-stages" gen "$work/vm1.img" "$size_mib"
. "$(dirname "$0")/pair.sh"
start_receiver
serve_agent
rep=(replicate --identity "$work/aid" --receiver "$addr" --receiver-fingerprint "$rfp"
     --control "$work/ctl.sock" --work-dir "$work" --json)
echo "first full..." >&2
"$bin/ctk-agent" "${rep[@]}" > /dev/null

"$bin/ctk-agent" "${rep[@]}" --every 1s > "$work/cycles.jsonl" 2> "$work/rep.err" &
ppid_rep=$!
sleep 3   # let it settle into its rhythm
a0=$(cpu $apid); p0=$(cpu $ppid_rep); start_ms=$(date +%s%3N)
fio --name=load --ioengine=nbd --uri="nbd+unix:///vm1?socket=$work/nbd.sock" \
    --rw=randwrite --bs=4k --rate_iops="$rate" --time_based --runtime="$seconds" \
    --iodepth=4 --output-format=json > "$work/fio.json"
end_ms=$(date +%s%3N)
a1=$(cpu $apid); p1=$(cpu $ppid_rep)
sleep 2
kill -TERM $ppid_rep; wait $ppid_rep 2>/dev/null || true
ticks=$(getconf CLK_TCK)
python3 - "$work/cycles.jsonl" "$work/fio.json" <<EOF
import json, sys
cycles = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
cycles = [c for c in cycles if "committed" in c]
text = open(sys.argv[2]).read()
fio = json.loads(text[text.index("{"):])  # fio may print a line before its JSON
iops = fio["jobs"][0]["write"]["iops"]
start, end = $start_ms, $end_ms
# RPO(t) = t - cut time of the newest point committed by t; sampled every 10 ms.
commits = sorted((c["committed_unix_ms"], c["cut_unix_ms"]) for c in cycles)
samples, i, newest = [], 0, None
for t in range(start, end, 10):
    while i < len(commits) and commits[i][0] <= t:
        newest = commits[i][1]; i += 1
    if newest is not None:
        samples.append((t - newest) / 1000)
samples.sort()
q = lambda p: samples[min(len(samples) - 1, int(p * len(samples)))]
during = [c for c in cycles if start <= c["committed_unix_ms"] <= end]
changed = sum(c["changed_bytes"] for c in during) / 2**20
agent_cpu = ($a1 - $a0) / $ticks
rep_cpu = ($p1 - $p0) / $ticks
print(f"fio: {iops:.0f} write IOPS (4 KiB random) for {(end - start)/1000:.0f} s; {len(during)} cycles committed")
print(f"RPO: p50 {q(0.5):.2f} s, p99 {q(0.99):.2f} s, max {samples[-1]:.2f} s "
      f"(p99 / interval = {q(0.99) / 1.0:.2f})")
print(f"changed data replicated: {changed:.1f} MiB; CPU per MiB: agent daemon "
      f"{agent_cpu / changed * 1000:.1f} ms, replicate {rep_cpu / changed * 1000:.1f} ms "
      f"(agent daemon {agent_cpu / ((end - start)/1000) * 100:.0f}% of a core, with the NBD writes)")
EOF
