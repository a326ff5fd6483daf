#!/usr/bin/env bash
# Builds ferry and shows its main job: two devices (two homes on this machine,
# each with its own background agent, offline on 127.0.0.1) are paired with a
# one-time code and keep a folder in sync both ways, keep what remote edits
# replace in their history (restorable), and make a conflict copy when both
# edit the same file while apart. Everything lives under a temp dir that
# is removed at the end (pass --keep to keep it).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --locked --quiet
ferry="$PWD/target/release/ferry"

work=$(mktemp -d /tmp/ferry-demo.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [[ "${keep:-}" != 1 ]]; then rm -rf "$work"; fi
}
trap cleanup EXIT
if [[ "${1:-}" == "--keep" ]]; then keep=1; echo "(keeping $work)"; fi

laptop="$work/laptop"
desktop="$work/desktop"
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }
wait_for() { # wait_for DESCRIPTION COMMAND...: poll up to 30 s
  local what=$1; shift
  for _ in $(seq 300); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "demo: gave up waiting for $what" >&2; exit 1
}
start_agent() { # start_agent HOME: run the agent in the background, offline, on loopback
  "$ferry" --home "$1" daemon --offline --listen 127.0.0.1:0 2>>"$1.log" &
  pids+=($!)
  wait_for "the agent of $1" "$ferry" --home "$1" devices
}

mkdir -p "$work/laptop-docs/notes" "$work/laptop-docs/photos"
echo "shopping: milk, bread" > "$work/laptop-docs/notes/todo.txt"
head -c 3000000 /dev/urandom > "$work/laptop-docs/photos/holiday.jpg"

for dev in laptop desktop; do
  step "$ferry" --home "$work/$dev" init --name "$dev"
  # No multicast on a sandbox loopback: find each other by the invite's address.
  sed -i 's/^local_discovery = true/local_discovery = false/' "$work/$dev/config.toml"
done
step "$ferry" --home "$laptop" folder add "$work/laptop-docs" --id docs --label Documents
start_agent "$laptop"
start_agent "$desktop"

printf '\n\033[1m$ ferry --home laptop invite --folder docs\033[0m\n'
code=$("$ferry" --home "$laptop" invite --folder docs --expires 5m 2>/dev/null)
echo "$code"
step "$ferry" --home "$desktop" join "$code" --into "$work/desktop-docs"

wait_for "the first sync" cmp "$work/laptop-docs/photos/holiday.jpg" "$work/desktop-docs/photos/holiday.jpg"
step "$ferry" --home "$desktop" devices
step "$ferry" --home "$desktop" status
step ls -R "$work/desktop-docs"

echo; echo "# an edit on the desktop reaches the laptop within about a second"
echo "shopping: milk, bread, eggs" > "$work/desktop-docs/notes/todo.txt"
wait_for "the edit" grep -q eggs "$work/laptop-docs/notes/todo.txt"
step cat "$work/laptop-docs/notes/todo.txt"

echo; echo "# the laptop kept the version the desktop's edit replaced, and can bring it back"
step "$ferry" --home "$laptop" history docs:notes/todo.txt
step "$ferry" --home "$laptop" restore docs:notes/todo.txt --to "$work/todo-before.txt"
step cat "$work/todo-before.txt"

echo; echo "# both edit the same file while the desktop's agent is stopped: nothing is lost"
kill "${pids[1]}"; wait "${pids[1]}" 2>/dev/null || true
echo "laptop's version" > "$work/laptop-docs/notes/todo.txt"
sleep 0.1
echo "desktop's version" > "$work/desktop-docs/notes/todo.txt"
start_agent "$desktop"
wait_for "the conflict copy" bash -c "ls '$work/laptop-docs/notes' | grep -q sync-conflict"
wait_for "the same tree" diff -r --exclude=.ferry "$work/laptop-docs" "$work/desktop-docs"
step ls "$work/laptop-docs/notes"
step "$ferry" --home "$laptop" conflicts
echo; echo "Done: both folders hold the same files."
