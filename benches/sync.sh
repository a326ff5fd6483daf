#!/usr/bin/env bash
# End-to-end sync figures: two local agents on 127.0.0.1 (fresh homes each
# run), a deterministic corpus of 10,000 files of 1-64 KiB (about 334 MB) and
# one 1 GiB file, generated once under the work dir and reused:
#   small   initial sync of the small files: seconds from `ferry join` until
#           B's index has every file and nothing is needed (then the whole
#           tree is checked against the corpus' checksum), wire bytes (B's
#           QUIC UDP bytes in + out on the link), peak RSS (VmHWM, read as the
#           sync completes) and CPU seconds of each agent; then each agent's
#           CPU over 3 s of quiet (should be about zero);
#   large   the same for the 1 GiB file alone, then
#   insert  100 bytes inserted mid-way into it on A (the new version, made
#           once, swapped in with one rename): seconds until B's copy is the
#           new one (checked by sha256 afterwards) and the wire bytes that took.
# With --compare the same scenarios run side by side in each run with
#   rsync      a daemon on loopback and `rsync -a --stats` (delta transfer for
#              the insert, timed from its start; bytes from its own counts;
#              note it does not fsync, ferry and Syncthing do);
#   Syncthing  two instances with discovery, relays, NAT and usage reports
#              off, connected directly; timed from adding the folder on B
#              until B's db/status is idle and complete; for the insert a scan
#              is requested at once over REST (its watcher would wait 10 s);
#              bytes from /rest/system/connections; CPU and RSS of the real
#              process (the Debian build's monitor parent is left out).
# Each scenario starts from the same state: sync, the page cache dropped (as
# root; earlier runs' files otherwise fill RAM and later runs pay for reclaim),
# and the scenario's corpus read back in (figures are for a warm cache).
# Also shown: "other CPU", the machine's busy CPU in each timed window beyond
# both sides' own (the bench's polling, plus anything else running: other
# builds on the machine disturb the figures). Prints medians over the runs,
# the issue's targets (against the peers measured here, and the issue's own
# figures), and writes every figure to WORK/results.json.
#
#   bash benches/sync.sh [--runs N] [--small-only|--large-only] [--compare]
#                        [--work DIR] [--keep] [--tools ferry,ferry-holder,rsync,rsync-fsync,syncthing]
#
# rsync-fsync is rsync --fsync, for context: ferry and Syncthing fsync every
# file they write, plain rsync does not.
# --tools ferry,ferry-holder measures encryption's overhead: the same scenarios
# with B holding A's folder as an encrypted backup (sealed on A, stored on B
# unreadable; done when A counts the holder up to date), and what B stores.
#
# FERRY=/path/to/ferry uses that binary; otherwise ferry is built in release
# mode (honouring CARGO_TARGET_DIR). Needs python3 and, under the work dir
# (default /tmp/ferry-bench; the corpus stays there for the next invocation),
# about 1.5 GiB for the corpus plus 2.5 GiB per tool and run: run directories
# are removed only after all runs, so one run's mass delete does not slow the
# next one's file creation; --compare needs the Debian packages rsync and syncthing
# (apt-get install -y rsync syncthing). On 2 cores: about 2 minutes for the
# default (ferry, 3 runs) and 4 with --compare, after the one-off corpus.
set -euo pipefail
cd "$(dirname "$0")/.."

runs=3 only="" compare=0 work=/tmp/ferry-bench keep=0 tools=""
cmdline="benches/sync.sh $*"
usage() {
  echo "usage: bash benches/sync.sh [--runs N] [--small-only|--large-only] [--compare]" >&2
  echo "                            [--work DIR] [--keep] [--tools ferry,ferry-holder,rsync,rsync-fsync,syncthing]" >&2
  exit 2
}
while (($#)); do
  case "$1" in
    --runs) runs=${2:?}; shift ;;
    --runs=*) runs=${1#*=} ;;
    --small-only|--large-only) [[ -z "$only" ]] || usage; only=$1 ;;
    --compare) compare=1 ;;
    --work) work=${2:?}; shift ;;
    --work=*) work=${1#*=} ;;
    --keep) keep=1 ;;
    --tools) tools=${2:?}; shift ;;
    --tools=*) tools=${1#*=} ;;
    -h|--help) usage ;;
    *) echo "sync.sh: unknown argument $1" >&2; usage ;;
  esac
  shift
done
[[ "$runs" =~ ^[1-9][0-9]*$ ]] || { echo "sync.sh: --runs wants a positive number" >&2; exit 2; }

command -v python3 >/dev/null || { echo "sync.sh: python3 is needed" >&2; exit 1; }
if ((compare)) || [[ "$tools" == *rsync* || "$tools" == *syncthing* ]]; then
  for t in rsync syncthing; do
    if ((compare)) || [[ "$tools" == *$t* ]]; then
      command -v "$t" >/dev/null || {
        echo "sync.sh: $t is not installed (apt-get update && apt-get install -y rsync syncthing)" >&2; exit 1; }
    fi
  done
fi

# Disk: the corpus (about 1.4 GB) once, plus per scenario at most one
# receiving copy (at most 1.1 GB; the sending side is a hardlinked copy) and
# the receiver's temp file; each run's directories are removed after it.
mkdir -p "$work"
need_kib=$((3 * 1024 * 1024))
if [[ -f "$work/corpus/manifest.json" ]]; then need_kib=$((need_kib - 1400 * 1024)); fi
avail_kib=$(df -Pk "$work" | awk 'NR == 2 { print $4 }')
if ((avail_kib < need_kib)); then
  echo "sync.sh: $work has $((avail_kib / 1024)) MiB free; needs about $((need_kib / 1024)) MiB" >&2
  exit 1
fi

if [[ -z "${FERRY:-}" ]]; then
  echo "building release binary..." >&2
  cargo build --release --locked --quiet
  FERRY="${CARGO_TARGET_DIR:-$PWD/target}/release/ferry"
fi
[[ -x "$FERRY" ]] || { echo "sync.sh: no ferry binary at $FERRY" >&2; exit 1; }

args=(--runs "$runs" --work "$work" --ferry "$FERRY" --cmdline "$cmdline")
[[ -z "$only" ]] || args+=("$only")
((compare)) && args+=(--compare)
((keep)) && args+=(--keep)
[[ -z "$tools" ]] || args+=(--tools "$tools")
exec python3 benches/sync/bench.py "${args[@]}"
