#!/usr/bin/env bash
# Real data, changed by file operations (the synthetic mix of incremental.sh flatters
# compression and hides costs):
#
#   1. An ext4 image of SIZE MiB is filled with files copied from this machine's own /usr
#      (up to FILL_MIB of them), then protected by the agent.
#   2. First full: `ctk-agent replicate` of the image, against the disk read alone (cold,
#      direct) and against the one disk doing both jobs at once (the image read directly
#      while as many bytes as the full holds are written beside it), in the same run.
#   3. ROUNDS times, through the agent's NBD front (nbdfuse + loop device + mount): a tree
#      copied in (a /usr/share subdirectory of 8-40 MiB), 300 files appended to, 2,000
#      deleted; `sync`; then the replica brought up to date by ctk (`replicate`), rsync
#      (`--inplace --no-whole-file` into a daemon on loopback whose copy was in sync) and
#      restic (an incremental backup of the image), each reading cold. changed_B is what ctk
#      found changed (whole blocks), the other byte columns what each tool sent or added.
#
#   cargo build --release -p ctk-agent -p ctk-receiver -p ctk-benches --bins &&
#     benches/scripts/realdata.sh [SIZE_MIB] [ROUNDS] [FILL_MIB]   (default 4096, 3, 2700)
#
# Needs root (loop devices, mount), nbdfuse, rsync, restic, mkfs.ext4. Prints one line per
# round, the medians, and the receiver's merge steps (where the time goes) on stderr.
set -euo pipefail
size_mib=${1:-4096}
rounds=${2:-3}
fill_mib=${3:-2700}
root=$(cd "$(dirname "$0")/../.." && pwd)
bin="$root/target/release"
for b in ctk-agent ctk-receiver ctk-stages; do
  [ -x "$bin/$b" ] || { echo "build first: cargo build --release -p ctk-agent -p ctk-receiver -p ctk-benches --bins" >&2; exit 1; }
done
for t in rsync restic nbdfuse mkfs.ext4 losetup; do
  command -v $t > /dev/null || { echo "$t is needed (apt-get install rsync restic libnbd-bin e2fsprogs)" >&2; exit 1; }
done
work=$(mktemp -d -p "${TMPDIR:-/var/tmp}")
mnt="$work/mnt"; fuse="$work/fuse"; loopdev=""
cleanup() {
  umount "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null || true
  [ -n "$loopdev" ] && losetup -d "$loopdev" 2>/dev/null || true
  fusermount3 -u -z "$fuse" 2>/dev/null || true
  kill $(jobs -p) 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
export RESTIC_PASSWORD=bench RESTIC_PROGRESS_FPS=0.01
now() { date +%s.%N; }
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
jq_() { python3 -c "import json,sys; d=json.load(open('$1')); print($2)"; }
. "$(dirname "$0")/pair.sh"
merge_steps() {
  { grep ' merged ' "$work/r.log" || true; } | tail -1 | sed -n 's/.*steps=\(\[.*\]\).*/  merge steps: \1/p' >&2
}

echo "making a ${size_mib} MiB ext4 image with up to ${fill_mib} MiB of /usr..." >&2
truncate -s "${size_mib}M" "$work/vm1.img"
mkfs.ext4 -q -F "$work/vm1.img"
mkdir -p "$mnt" "$fuse"
mount -o loop "$work/vm1.img" "$mnt"
python3 - "$mnt/usr" "$fill_mib" <<'EOF'
import os, shutil, sys
dst, budget = sys.argv[1], int(sys.argv[2]) << 20
used = 0
for top, dirs, files in os.walk('/usr'):
    dirs.sort(); files.sort()
    for f in files:
        src = os.path.join(top, f)
        if os.path.islink(src) or not os.path.isfile(src):
            continue
        size = os.path.getsize(src)
        if used + size > budget:
            continue
        out = os.path.join(dst, os.path.relpath(src, '/usr'))
        os.makedirs(os.path.dirname(out), exist_ok=True)
        try:
            shutil.copy2(src, out)
        except OSError:
            continue
        used += size
print(f"  copied {used >> 20} MiB of /usr", file=sys.stderr)
EOF
umount "$mnt"
used_mib=$(( $(du -B1 "$work/vm1.img" | cut -f1) >> 20 ))

start_receiver
serve_agent

echo "first full..." >&2
sync
"$bin/ctk-stages" drop "$work/vm1.img"
t0=$(now); replicate "$work/full.json"; t1=$(now)
full_s=$(python3 -c "print($t1 - $t0)")
full_b=$(jq_ "$work/full.json" "d['delta_bytes']")
merge_steps
sync
read_bps=$("$bin/ctk-stages" read-direct "$work/vm1.img")
written=$(du -B1 "$work/store/bench/vm1/full.img" | cut -f1)
"$bin/ctk-stages" drop "$work/vm1.img"
both_bps=$("$bin/ctk-stages" read-write "$work/vm1.img" "$work/scratch" "$(( written >> 20 << 20 ))")
image_bytes=$(stat -c %s "$work/vm1.img")
python3 - <<EOF
s, size, used = $full_s, $image_bytes, $used_mib
print(f"first full of a {size >> 20} MiB ext4 image ({used} MiB allocated): {s:.2f} s, {$full_b} bytes sent")
print(f"  / cold direct read of the image: {(size / s) / $read_bps:.2f}")
print(f"  / the one-disk limit (reading the image while writing the full's bytes): {(size / s) / $both_bps:.2f}")
EOF

# The baselines for the rounds: rsync's copy and restic's first snapshot (not timed).
start_rsyncd
start_restic

# The filesystem through the agent's NBD front.
nbdfuse -P "$work/nbdfuse.pid" "$fuse" "nbd+unix:///vm1?socket=$work/nbd.sock" &
until [ -e "$work/nbdfuse.pid" ]; do sleep 0.05; done
loopdev=$(losetup -f --show "$fuse/nbd")
mount "$loopdev" "$mnt"
trees=$(cd /usr/share && { du -s --block-size=1M -- */ 2>/dev/null || true; } | awk '$1 >= 8 && $1 <= 40 {print $2}' | sed -n "1,${rounds}p")

ctk_s=(); rsync_s=(); restic_s=(); ctk_b=(); changed_b=()
printf '%-6s %10s %10s %10s   %12s %12s %12s %12s\n' round ctk_s rsync_s restic_s \
    changed_B ctk_B rsync_B restic_B
r=0
for tree in $trees; do
  r=$((r + 1))
  # A tree copied in, 300 files appended to, 2,000 deleted (each round its own tenth).
  cp -a "/usr/share/$tree" "$mnt/new-$r"
  find "$mnt/usr/lib" -type f -size +4k | awk "NR % 10 == $r" | sed -n '1,300p' > "$work/append"
  while read -r f; do head -c 8192 /dev/urandom >> "$f"; done < "$work/append"
  find "$mnt/usr/share" -type f | awk "NR % 10 == $r" | sed -n '1,2000p' | xargs -r rm -f
  sync -f "$mnt"
  sync
  "$bin/ctk-stages" drop "$work/vm1.img"
  t0=$(now); replicate "$work/rep.json"; t1=$(now)
  c_s=$(python3 -c "print($t1 - $t0)"); c_b=$(jq_ "$work/rep.json" "d['delta_bytes']")
  changed=$(jq_ "$work/rep.json" "d['changed_bytes']")
  merge_steps
  timed_rsync
  timed_restic
  printf '%-6s %10.2f %10.2f %10.2f   %12d %12d %12d %12d\n' "$r" "$c_s" "$s_s" "$e_s" "$changed" "$c_b" "$s_b" "$e_b"
  ctk_s+=("$c_s"); rsync_s+=("$s_s"); restic_s+=("$e_s"); ctk_b+=("$c_b"); changed_b+=("$changed")
done
[ "$r" -gt 0 ] || { echo "no /usr/share tree of 8-40 MiB to copy in" >&2; exit 1; }
# The replica is the disk: after the unmount (which writes too) and one more push, the
# newest point restored equals the image.
umount "$mnt"
replicate "$work/last.json"
"$bin/ctk-receiver" restore --store "$work/store/bench" --disk vm1 --point latest -o "$work/check.img" > /dev/null
cmp -s "$work/check.img" "$work/vm1.img" || { echo "the replica differs from the disk" >&2; exit 1; }
mc=$(printf '%s\n' "${ctk_s[@]}" | median); ms=$(printf '%s\n' "${rsync_s[@]}" | median)
me=$(printf '%s\n' "${restic_s[@]}" | median)
mcb=$(printf '%s\n' "${ctk_b[@]}" | median); mch=$(printf '%s\n' "${changed_b[@]}" | median)
echo
echo "file-level changes on real data, ${size_mib} MiB ext4, medians of $r rounds:"
python3 - <<EOF
c, s, e = $mc, $ms, $me
print(f"  time: ctk {c:.2f} s; rsync {s:.2f} s ({s/c:.1f}x ctk); restic {e:.2f} s ({e/c:.1f}x ctk)")
print(f"  ctk: {$mch:.0f} bytes in changed blocks, {$mcb:.0f} bytes sent")
EOF
