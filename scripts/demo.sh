#!/usr/bin/env bash
# Builds ferry and shows its main job so far on a throwaway home and folder:
# init a device, add a folder, scan it, change things, scan again, and show what
# the index knows. Everything lives under a temp dir that is removed at the end
# (pass --keep to keep it).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --locked --quiet
ferry="$PWD/target/release/ferry"

work=$(mktemp -d /tmp/ferry-demo.XXXXXX)
if [[ "${1:-}" == "--keep" ]]; then
  echo "(keeping $work)"
else
  trap 'rm -rf "$work"' EXIT
fi
export FERRY_HOME="$work/home"
docs="$work/Documents"

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

mkdir -p "$docs/notes" "$docs/photos"
echo "shopping: milk, bread" > "$docs/notes/todo.txt"
head -c 3000000 /dev/urandom > "$docs/photos/holiday.jpg"
ln -s notes/todo.txt "$docs/todo-link"
printf '*.tmp\n' > "$docs/.ferryignore"
echo "scratch" > "$docs/draft.tmp"

step "$ferry" init --name demo-laptop
step "$ferry" folder add "$docs" --id docs --label Documents
step "$ferry" scan
step "$ferry" status
step "$ferry" ls docs

echo; echo "# now edit a file, delete one, and scan again: only the edited file is hashed"
echo "shopping: milk, bread, eggs" > "$docs/notes/todo.txt"
rm "$docs/todo-link"
step "$ferry" scan
step "$ferry" ls docs --deleted
