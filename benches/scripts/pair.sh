# Sourced by the benchmark scripts: a receiver on loopback and an agent protecting
# "$work/vm1.img", paired. Needs $bin (release binaries) and $work (a scratch directory);
# $receiver_bin, when set, is the receiver to serve with (another build, for an A/B).
#   start_receiver      -> sets rfp, afp, addr
#   serve_agent         -> starts `ctk-agent serve` on vm1.img, sets apid
#   replicate OUT ARGS  -> `ctk-agent replicate --json ARGS` into OUT
#   start_rsyncd        -> a copy of vm1.img served by an rsync daemon on loopback, sets port
#   start_restic        -> a restic repository with a first snapshot of vm1.img
#   timed_rsync         -> rsync vm1.img into the daemon's copy, cold: s_s seconds, s_b bytes sent
#   timed_restic        -> an incremental restic backup of vm1.img, cold: e_s seconds, e_b added

start_receiver() {
  rfp=$("$bin/ctk-receiver" init --identity "$work/rid" 2>/dev/null)
  afp=$("$bin/ctk-agent" init --identity "$work/aid" 2>/dev/null)
  # The receiver's log says where each merge's time went ("merged ... steps=").
  RUST_LOG=${RUST_LOG:-info} NO_COLOR=1 "${receiver_bin:-$bin/ctk-receiver}" serve --identity "$work/rid" \
      --store "$work/store" --listen 127.0.0.1:0 --allow "bench=$afp" > "$work/r.out" 2> "$work/r.log" &
  until grep -q ready "$work/r.out" 2>/dev/null; do sleep 0.05; done
  addr=$(sed -n 's/.*listening on \([^ ]*\) as.*/\1/p' "$work/r.out")
}

serve_agent() {
  "$bin/ctk-agent" serve --disk "vm1=$work/vm1.img" --listen "unix:$work/nbd.sock" \
      --control "$work/ctl.sock" > "$work/a.out" 2>/dev/null &
  apid=$!
  until grep -q ready "$work/a.out" 2>/dev/null; do sleep 0.05; done
}

replicate() {
  local out=$1
  shift
  "$bin/ctk-agent" replicate --identity "$work/aid" --receiver "$addr" --receiver-fingerprint "$rfp" \
      --control "$work/ctl.sock" --work-dir "$work" --json "$@" > "$out"
}

start_rsyncd() {
  mkdir -p "$work/rsync"
  cp --sparse=always "$work/vm1.img" "$work/rsync/vm1.img"
  port=$((20000 + RANDOM % 20000))
  printf 'use chroot = no\nuid = %s\ngid = %s\n[bench]\npath = %s\nread only = false\n' \
      "$(id -u)" "$(id -g)" "$work/rsync" > "$work/rsyncd.conf"
  rsync --daemon --no-detach --config="$work/rsyncd.conf" --port=$port --address=127.0.0.1 &
  sleep 0.5
}

start_restic() {
  restic -r "$work/restic" init -q > /dev/null
  restic -r "$work/restic" backup -q "$work/vm1.img" > /dev/null
}

# Each tool starts with nothing dirty in the page cache: without the sync, the writeback of
# the tool before (restic's repository, 1 GB a round) lands in the next one's fsyncs.
timed_rsync() {
  sync
  "$bin/ctk-stages" drop "$work/vm1.img"; "$bin/ctk-stages" drop "$work/rsync/vm1.img"
  local t0 t1
  t0=$(date +%s.%N)
  rsync --inplace --no-whole-file --stats "$work/vm1.img" "rsync://127.0.0.1:$port/bench/vm1.img" > "$work/rsync.out"
  t1=$(date +%s.%N)
  s_s=$(python3 -c "print($t1 - $t0)")
  s_b=$(sed -n 's/^Total bytes sent: \([0-9,.]*\).*/\1/p' "$work/rsync.out" | tr -d ',.')
}

timed_restic() {
  sync
  "$bin/ctk-stages" drop "$work/vm1.img"
  local t0 t1
  t0=$(date +%s.%N); restic -r "$work/restic" backup --json "$work/vm1.img" > "$work/restic.out"; t1=$(date +%s.%N)
  e_s=$(python3 -c "print($t1 - $t0)")
  e_b=$(grep '"message_type":"summary"' "$work/restic.out" | python3 -c "import json,sys; print(json.loads(sys.stdin.read())['data_added'])")
}
