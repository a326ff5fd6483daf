#!/usr/bin/env bash
# End-to-end pairing and idle figures for ferry agents on loopback:
#   (a) the time from starting `ferry join` to both agents listing each other as
#       connected (`ferry devices --json`), median of 5 fresh pairs;
#   (b) each agent's resident memory (VmRSS) and CPU time over 30 s of idling,
#       first with one peer connected (two agents), then with two peers
#       connected (three agents, all paired). CPU time is shown twice: utime +
#       stime from /proc/PID/stat (clock ticks, 10 ms each: an idle agent often
#       shows 0) and the on-CPU nanoseconds of /proc/PID/task/*/schedstat summed
#       over the threads alive at both ends (threads that exit in between are
#       missed, so it is a lower bound).
# Agents run with `daemon --offline --listen 127.0.0.1:0` and mDNS off. Linux
# only (/proc). Takes about 75 s once built; everything it creates is removed.
#
#   bash benches/pairing.sh
#   FERRY_BIN=path/to/ferry bash benches/pairing.sh   # skip the build
# Honours CARGO_TARGET_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."

idle_secs=${IDLE_SECS:-30}
if [[ -n "${FERRY_BIN:-}" ]]; then
  ferry=$FERRY_BIN
else
  echo "building release binary..." >&2
  cargo build --release --quiet
  ferry="${CARGO_TARGET_DIR:-$PWD/target}/release/ferry"
fi
[[ -x "$ferry" ]] || { echo "pairing.sh: no binary at $ferry" >&2; exit 1; }

work=$(mktemp -d /tmp/ferry-pairbench.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

now_ms() { echo $(( $(date +%s%N) / 1000000 )); }

# new_home NAME: an initialised home under $work with mDNS off.
new_home() {
  local h=$work/$1
  "$ferry" --home "$h" init --name "$1" >/dev/null
  sed -i 's/^local_discovery = true/local_discovery = false/' "$h/config.toml"
}

# start NAME: starts its agent, waits until it answers; sets $started to its pid.
start() {
  local h=$work/$1
  "$ferry" --home "$h" daemon --offline --listen 127.0.0.1:0 2>>"$h.log" &
  started=$!
  pids+=("$started")
  for _ in $(seq 1 400); do
    "$ferry" --home "$h" status --json 2>/dev/null | grep -q '"pid"' && return 0
    sleep 0.05
  done
  echo "pairing.sh: agent $1 did not start; log:" >&2; cat "$h.log" >&2; exit 1
}

# connected A B: whether A lists B's id as connected.
connected() {
  "$ferry" --home "$work/$1" devices --json |
    tr -d ' \n' | grep -q "\"connected\":true,[^}]*\"id\":\"$2\"\|\"id\":\"$2\"[^}]*\"connected\":true"
}

# pair INVITER JOINER: joins and waits until both list each other as connected;
# prints the milliseconds from the start of `ferry join` until then.
pair() {
  local a=$1 b=$2 code a_id b_id t0
  a_id=$("$ferry" --home "$work/$a" id)
  b_id=$("$ferry" --home "$work/$b" id)
  code=$("$ferry" --home "$work/$a" invite 2>/dev/null)
  t0=$(now_ms)
  "$ferry" --home "$work/$b" join "$code" >/dev/null
  for _ in $(seq 1 3000); do
    if connected "$a" "$b_id" && connected "$b" "$a_id"; then
      echo $(( $(now_ms) - t0 ))
      return 0
    fi
  done
  echo "pairing.sh: $a and $b did not connect" >&2; exit 1
}

stop_all() {
  for p in "${pids[@]}"; do kill -TERM "$p"; done
  for p in "${pids[@]}"; do wait "$p"; done
  pids=()
}

cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
cpu_ns() { cat "/proc/$1"/task/*/schedstat 2>/dev/null | awk '{ s += $1 } END { printf "%d\n", s }'; }
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }

# idle LABEL NAME=PID…: RSS and CPU of each agent over $idle_secs seconds.
idle() {
  local label=$1; shift
  local hz; hz=$(getconf CLK_TCK)
  declare -A ticks ns
  sleep 5 # let the links settle after pairing
  for np in "$@"; do
    ticks[$np]=$(cpu_ticks "${np#*=}")
    ns[$np]=$(cpu_ns "${np#*=}")
  done
  sleep "$idle_secs"
  for np in "$@"; do
    local pid=${np#*=}
    awk -v l="$label" -v n="${np%%=*}" -v rss="$(rss_kib "$pid")" \
        -v t=$(( $(cpu_ticks "$pid") - ticks[$np] )) -v ns=$(( $(cpu_ns "$pid") - ns[$np] )) \
        -v hz="$hz" -v s="$idle_secs" 'BEGIN {
      printf "  %-20s %-2s RSS %5.1f MiB   utime+stime %d ticks (%.2f s)   on-CPU %6.1f ms (%.3f%% of a core)\n",
             l, n, rss / 1024, t, t / hz, ns / 1e6, 100 * ns / 1e9 / s }'
  done
}

echo "machine: $(nproc) cores, $(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo), $(uname -sr)"
echo "binary:  $ferry"

times=()
for i in 1 2 3 4 5; do
  new_home "a$i"; new_home "b$i"
  start "a$i"; start "b$i"
  times+=("$(pair "a$i" "b$i")")
  stop_all
done
median=$(printf '%s\n' "${times[@]}" | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }')
echo "join to both connected: median ${median} ms (runs: ${times[*]} ms)"

new_home a; new_home b; new_home c
start a; pa=$started
start b; pb=$started
pair a b >/dev/null
echo "idle for ${idle_secs} s:"
idle "one peer connected" a=$pa b=$pb
start c; pc=$started
pair a c >/dev/null
pair b c >/dev/null
idle "two peers connected" a=$pa b=$pb c=$pc
