#!/usr/bin/env bash
# End-to-end scan figures for ferry, on throwaway data under a temp dir:
#   (a) 10,000 files totalling about 300 MB in nested dirs: the first scan, which
#       reads and hashes everything;
#   (b) 100,000 small files: the first scan, then a rescan with nothing changed
#       (target: well under 2 s), which only walks and stats.
# Prints a table with the machine it ran on. Needs python3 (to make the data) and
# uses /usr/bin/time -v for peak memory when it is installed. Takes under a
# minute once built; everything it creates is removed at the end.
#
#   bash benches/scan.sh            # warm page cache (the data was just written)
#   bash benches/scan.sh --cold     # as root: drop the page cache before the
#                                   # marked runs (machine-wide, hence opt-in)
# Honours CARGO_TARGET_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."

cold=0
case "${1:-}" in
  --cold) cold=1 ;;
  "") ;;
  *) echo "usage: bash benches/scan.sh [--cold]" >&2; exit 2 ;;
esac

command -v python3 >/dev/null || { echo "scan.sh: python3 is needed to make test data" >&2; exit 1; }

echo "building release binary..." >&2
cargo build --release --quiet
ferry="${CARGO_TARGET_DIR:-$PWD/target}/release/ferry"
[[ -x "$ferry" ]] || { echo "scan.sh: no binary at $ferry" >&2; exit 1; }

work=$(mktemp -d /tmp/ferry-scanbench.XXXXXX)
trap 'rm -rf "$work"' EXIT

gnu_time=""
if /usr/bin/time -v true >/dev/null 2>&1; then gnu_time=/usr/bin/time; fi

# With --cold, tries to empty the page cache so the next scan reads from disk.
# Prints "cold" if that worked, otherwise "warm" (the data was just written, so
# it is cached). In a VM the host may still cache the disk below the guest.
cache_state() {
  if ((cold)) && sync && { echo 3 >/proc/sys/vm/drop_caches; } 2>/dev/null; then
    echo cold
  else
    echo warm
  fi
}

# make_tree DIR FILES TOTAL_BYTES MIN MAX SEED: FILES files of random content
# with seeded log-uniform sizes in [MIN, MAX], scaled to about TOTAL_BYTES in
# all (0: no scaling), spread over 1,000 directories three levels deep.
make_tree() {
  python3 - "$@" <<'PY'
import math, os, random, sys
root, files, total, lo, hi, seed = sys.argv[1], *map(int, sys.argv[2:])
rng = random.Random(seed)
sizes = [int(math.exp(rng.uniform(math.log(lo), math.log(hi)))) for _ in range(files)]
if total:
    scale = total / sum(sizes)
    sizes = [max(1, int(s * scale)) for s in sizes]
for i, size in enumerate(sizes):
    d = os.path.join(root, f"d{i % 10}", f"e{i // 10 % 10}", f"f{i // 100 % 10}")
    os.makedirs(d, exist_ok=True)
    # Fresh random bytes for every file, so no chunk repeats across files.
    with open(os.path.join(d, f"file{i}.bin"), "wb") as f:
        f.write(os.urandom(size))
PY
}

# timed LABEL CMD...: runs CMD and appends "LABEL wall_s max_rss_kib user_s sys_s"
# to $work/times (RSS is "-" without GNU time). CMD's stdout goes to $work/LABEL.out.
timed() {
  local label=$1; shift
  if [[ -n "$gnu_time" ]]; then
    "$gnu_time" -v -o "$work/$label.time" "$@" >"$work/$label.out"
    awk -v l="$label" -F': ' '
      /Elapsed \(wall clock\)/ { n = split($2, p, ":"); w = 0; for (i = 1; i <= n; i++) w = w * 60 + p[i] }
      /Maximum resident set size/ { rss = $2 }
      /User time/ { u = $2 } /System time/ { s = $2 }
      END { printf "%s %.2f %d %.2f %.2f\n", l, w, rss, u, s }' "$work/$label.time" >>"$work/times"
  else
    local t0 t1
    t0=$(date +%s.%N)
    "$@" >"$work/$label.out"
    t1=$(date +%s.%N)
    echo "$label $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }') - - -" >>"$work/times"
  fi
}

# hashed LABEL: "entries/hashed files/hashed MB" from a `scan --json` report.
hashed() {
  python3 -c '
import json, sys
r = json.load(open(sys.argv[1]))[0]["report"]
print("%d/%d/%.0f" % (r["entries"], r["hashed_files"], r["hashed_bytes"] / 1e6))' "$work/$1.out"
}

setup_home() { # HOME_DIR FOLDER_DIR
  "$ferry" --home "$1" init --name scanbench >/dev/null
  "$ferry" --home "$1" folder add "$2" --id bench >/dev/null
}

echo "(a) making 10,000 files, about 300 MB..." >&2
make_tree "$work/big" 10000 300000000 200 20000000 1
big_bytes=$(du -sb "$work/big" | cut -f1)
setup_home "$work/home-a" "$work/big"
cache_a=$(cache_state)
echo "(a) first scan..." >&2
timed a_first "$ferry" --home "$work/home-a" scan --json
# The same first scan again on a fresh home: the files are in the page cache now.
setup_home "$work/home-a2" "$work/big"
timed a_warm "$ferry" --home "$work/home-a2" scan --json
rm -rf "$work/big" "$work/home-a" "$work/home-a2"

echo "(b) making 100,000 small files..." >&2
make_tree "$work/small" 100000 0 100 4000 2
setup_home "$work/home-b" "$work/small"
echo "(b) first scan..." >&2
cache_b=$(cache_state)
timed b_first "$ferry" --home "$work/home-b" scan --json
echo "(b) no-change rescan..." >&2
cache_b2=$(cache_state)
timed b_rescan "$ferry" --home "$work/home-b" scan --json
timed b_rescan2 "$ferry" --home "$work/home-b" scan --json

cpu=$(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)
echo
echo "ferry $(git describe --always --dirty 2>/dev/null || echo '?') on $(nproc) cores, $cpu, $(awk '/MemTotal/ { printf "%.0f GiB RAM", $2 / 1048576 }' /proc/meminfo)"
echo "tree (a): 10,000 files, $((big_bytes / 1000000)) MB; tree (b): 100,000 files"
printf '%-28s %8s %9s %8s %8s %6s  %s\n' "run" "wall s" "maxRSS MB" "user s" "sys s" "cache" "entries/hashed files/MB"
row() { # LABEL NAME CACHE
  read -r _ wall rss user sys < <(grep "^$1 " "$work/times")
  [[ "$rss" == "-" ]] || rss=$((rss / 1024))
  printf '%-28s %8s %9s %8s %8s %6s  %s\n' "$2" "$wall" "$rss" "$user" "$sys" "$3" "$(hashed "$1")"
}
row a_first "(a) first scan, 10k files" "$cache_a"
row a_warm "(a) same, fresh home" "warm"
row b_first "(b) first scan, 100k files" "$cache_b"
row b_rescan "(b) no-change rescan" "$cache_b2"
row b_rescan2 "(b) no-change rescan again" "warm"
echo "MB = 10^6 bytes; (a) read and hashed at $(awk -v b="$big_bytes" '$1 == "a_first" { printf "%.0f", b / 1e6 / $2 }' "$work/times") MB/s ($cache_a), $(awk -v b="$big_bytes" '$1 == "a_warm" { printf "%.0f", b / 1e6 / $2 }' "$work/times") MB/s (warm)"
awk '$1 == "b_rescan" { printf "no-change rescan of 100k files: %s s (target: well under 2 s: %s)\n", $2, ($2 < 2 ? "met" : "MISSED") }' "$work/times"
