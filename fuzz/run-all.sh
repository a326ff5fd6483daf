#!/usr/bin/env bash
# Runs every fuzz target for SECS seconds each (default 75) with libFuzzer
# through cargo-fuzz, starting from the seed corpus in fuzz/corpus/<target>/;
# new inputs go to WORK/<target> (default /tmp/ferry-fuzz) so the committed
# seeds stay small. Prints each target's final line (executions, coverage);
# a crash leaves its input in fuzz/artifacts/<target>/ and a non-zero exit.
#   cargo install cargo-fuzz && bash fuzz/run-all.sh [SECS] [WORK]
set -uo pipefail
cd "$(dirname "$0")/.."
secs=${1:-75}
work=${2:-/tmp/ferry-fuzz}
export RUSTC_BOOTSTRAP=1 # cargo-fuzz needs nightly flags; this is the stable toolchain
failed=0
for t in $(sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v ferry-fuzz); do
  mkdir -p "$work/$t"
  if ! cargo fuzz run -O "$t" "$work/$t" "fuzz/corpus/$t" -- \
      -max_total_time="$secs" -rss_limit_mb=2048 >"$work/$t.log" 2>&1; then
    echo "$t: FAILED (see $work/$t.log and fuzz/artifacts/$t/)"
    failed=1
    continue
  fi
  echo "$t: $(grep -E '^#[0-9]+.*DONE' "$work/$t.log" | tail -1)"
done
exit $failed
