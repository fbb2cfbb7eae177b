# Sourced by the benchmark scripts: a receiver on loopback and an agent protecting
# "$work/vm1.img", paired. Needs $bin (release binaries) and $work (a scratch directory);
# $receiver_bin, when set, is the receiver to serve with (another build, for an A/B).
#   start_receiver      -> sets rfp, afp, addr
#   serve_agent         -> starts `ctk-agent serve` on vm1.img, sets apid
#   replicate OUT ARGS  -> `ctk-agent replicate --json ARGS` into OUT

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
