#!/usr/bin/env bash
# A push spread over several QUIC streams, on a long link: a first full of a random image
# through `udp-delay` (a fixed delay each way; this machine has no tc netem), with
# `--streams 1` and with `--streams N`, alternating, in one run.
#
#   cargo build --release -p ctk-agent -p ctk-receiver -p ctk-benches --bins &&
#     benches/scripts/streams_wan.sh [SIZE_MIB] [ONE_WAY_MS] [STREAMS] [RUNS]
#                                     (default 256 MiB, 20 ms each way, 4 streams, 3 runs)
#
# Prints the medians and two ratios: N streams against 1, and 1 stream against the limit one
# stream's flow-control window sets (quinn's default receive window, 1.25 MB, per round
# trip).
set -euo pipefail
size_mib=${1:-256}
one_way_ms=${2:-20}
streams=${3:-4}
runs=${4:-3}
root=$(cd "$(dirname "$0")/../.." && pwd)
bin="$root/target/release"
for b in ctk-agent ctk-receiver udp-delay; do
  [ -x "$bin/$b" ] || { echo "build first: cargo build --release -p ctk-agent -p ctk-receiver -p ctk-benches --bins" >&2; exit 1; }
done
work=$(mktemp -d -p "${TMPDIR:-/var/tmp}")
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
# shellcheck source=pair.sh
. "$root/benches/scripts/pair.sh"
bytes=$((size_mib << 20))
# Random data: zstd cannot shrink it, so the link carries the whole image.
head -c "$bytes" /dev/urandom > "$work/vm1.img"
start_receiver
port=$((20000 + RANDOM % 20000))
"$bin/udp-delay" "127.0.0.1:$port" "$addr" "$one_way_ms" 2>/dev/null &
direct=$addr
addr="127.0.0.1:$port"

median() { sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
one=(); many=()
for run in $(seq "$runs"); do
  for n in 1 "$streams"; do
    # A fresh journal and store each time: every run is a first full of the whole image.
    kill "${apid:-}" 2>/dev/null || true
    wait "${apid:-}" 2>/dev/null || true
    rm -rf "$work/store"/bench "$work"/vm1.img.ctk* "$work"/*.sock "$work/a.out"
    serve_agent
    start=$(date +%s.%N)
    replicate "$work/rep.json" --streams "$n"
    end=$(date +%s.%N)
    rate=$(python3 -c "print($bytes / ($end - $start) / 1e6)")
    echo "run $run, $n stream(s): $rate MB/s" >&2
    if [ "$n" = 1 ]; then one+=("$rate"); else many+=("$rate"); fi
  done
done
m1=$(printf '%s\n' "${one[@]}" | median)
mn=$(printf '%s\n' "${many[@]}" | median)
rtt_ms=$((2 * one_way_ms))
echo "image ${size_mib} MiB random, RTT ${rtt_ms} ms added (receiver at $direct behind udp-delay)"
echo "1 stream: median ${m1} MB/s (runs: ${one[*]})"
echo "${streams} streams: median ${mn} MB/s (runs: ${many[*]})"
python3 -c "print('ratio ${streams} streams / 1 stream: %.2f' % ($mn / $m1))"
if [ "$rtt_ms" -gt 0 ]; then
  limit=$(python3 -c "print(1.25e6 / ($rtt_ms / 1000) / 1e6)")
  echo "one stream's window limit: ${limit} MB/s"
  python3 -c "print('ratio 1 stream / window limit: %.2f; ${streams} streams / ${streams} windows: %.2f' % ($m1 / $limit, $mn / ($limit * $streams)))"
fi
