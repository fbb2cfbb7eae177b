#!/usr/bin/env bash
# Crash campaign: the tests that SIGKILL real processes at random moments, run with many
# trials on a release build, each ending by checking every point byte for byte (or every
# write and cut against the reference) as in the normal test run:
#   - a tracker in a child process, killed while writing and cutting (no write missing);
#   - `ctk-receiver ingest`, killed at every merge step and at random moments (no store
#     diverged);
#   - the receiver and `ctk-agent replicate`, killed at random moments of a replication
#     over QUIC (every committed point equals the source as of its cut).
#
#   - continuous replication under a steady write load for SOAK seconds (every kept point
#     restored and compared with the source at its cut).
#
#   tests/campaign.sh [TRIALS] [SOAK]  (default 100 per test, 600 s; the tests read
#                                       CTK_TRIALS and CTK_SOAK_SECS)
#
# Prints each test's own summary line; any violation fails the test, and this script.
set -euo pipefail
n=${1:-100}
soak=${2:-600}
cd "$(dirname "$0")/.."
export CTK_TRIALS=$n CTK_SOAK_SECS=$soak
run() {
  local started=$SECONDS
  cargo test --release --locked -q -p "$1" --test "$2" "$3" -- --nocapture --test-threads 1 \
    > "/tmp/ctk-campaign-$2.log" 2>&1 || { tail -n 40 "/tmp/ctk-campaign-$2.log"; exit 1; }
  echo "$2/$3 ($((SECONDS - started)) s): $(grep -E "$4" "/tmp/ctk-campaign-$2.log" | tail -n 1)"
}
run ctk-tests crash_sigkill sigkill 'SIGKILL trials'
run ctk-receiver store_crash a_merge_killed_at_any_step 'crash trials'
run ctk-tests replication replication_survives_either_side 'trials:'
run ctk-tests continuous continuous_mode_under_a_steady 'writes;'
