#!/usr/bin/env bash
# Builds ferry's Debian package and checks what is in it.
#
#   bash packaging/build-deb.sh            # needs cargo-deb (cargo install cargo-deb --locked)
#   CARGO_TARGET_DIR=/tmp/t CARGO_BUILD_JOBS=1 bash packaging/build-deb.sh
#
# 1. builds the release binary (cargo build --release --locked);
# 2. generates the shell completions and the man pages from it into
#    $TARGET/release/packaging/ (the Cargo.toml assets name them as
#    target/release/packaging/..., which cargo-deb resolves to the real target
#    directory, CARGO_TARGET_DIR included);
# 3. runs `cargo deb --no-build`;
# 4. checks the package: every expected path is in it (`dpkg-deb -c`), its
#    control fields are there (`dpkg-deb -I`), and the packaged binary runs and
#    its man page is gzipped roff (extracted into a temp dir, not installed).
# Prints the .deb's path as the last line of standard output; exits 1 naming
# what is missing or wrong.
set -euo pipefail
cd "$(dirname "$0")/.."

fail() {
    echo "build-deb: $*" >&2
    exit 1
}

for tool in cargo dpkg-deb gzip; do
    command -v "$tool" >/dev/null || fail "$tool is missing (apt-get install dpkg gzip; cargo comes with rustup)"
done
cargo deb --version >/dev/null 2>&1 ||
    fail "cargo-deb is missing: cargo install cargo-deb --locked (or run packaging/check-deb.sh, which installs it)"

# Where cargo puts build products: CARGO_TARGET_DIR, a config's
# build.target-dir, or ./target; cargo metadata knows which.
target=$(cargo metadata --format-version 1 --no-deps --locked |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
[ -n "$target" ] || fail "cannot tell the cargo target directory (cargo metadata printed none)"

echo "== cargo build --release" >&2
cargo build --release --locked --bin ferry >&2
bin="$target/release/ferry"
[ -x "$bin" ] || fail "the build made no $bin"

echo "== completions and man pages" >&2
gen="$target/release/packaging"
rm -rf "$gen"
mkdir -p "$gen/completions" "$gen/man"
# They need no device home; an empty FERRY_HOME that does not exist makes
# sure the build machine's own is never looked at.
run_bin() { env FERRY_HOME="$gen/no-home" "$bin" "$@"; }
run_bin completions bash >"$gen/completions/ferry.bash"
run_bin completions zsh >"$gen/completions/_ferry"
run_bin completions fish >"$gen/completions/ferry.fish"
run_bin man --dir "$gen/man" >/dev/null
[ ! -e "$gen/no-home" ] || fail "generating completions or man pages created a device home at $gen/no-home"
# -n: no name or time stamp in the gzip header, so the pages are reproducible.
gzip -9n "$gen"/man/*.1

echo "== cargo deb --no-build" >&2
# cargo deb prints the path of each file it made: the .deb, and the
# ferry-dbgsym .ddeb with the binary's line tables (dbgsym in Cargo.toml).
made=$(cargo deb --no-build --locked)
deb=$(grep '\.deb$' <<<"$made" | tail -n 1) || true
if [ -z "$deb" ] || [ ! -f "$deb" ]; then
    fail "cargo deb reported no .deb (it printed: $made)"
fi

echo "== checking $deb" >&2
contents=$(dpkg-deb -c "$deb" | awk '{print $6}' | sed 's,^\./,/,')
expected=(
    /usr/bin/ferry
    /usr/lib/systemd/user/ferry.service
    /usr/lib/systemd/system/ferry@.service
    /usr/share/bash-completion/completions/ferry
    /usr/share/zsh/vendor-completions/_ferry
    /usr/share/fish/vendor_completions.d/ferry.fish
    /usr/share/doc/ferry/README.md
    /usr/share/doc/ferry/copyright
)
pages=0
for page in "$gen"/man/*.1.gz; do
    pages=$((pages + 1))
    expected+=("/usr/share/man/man1/$(basename "$page")")
done
missing=()
for path in "${expected[@]}"; do
    grep -qxF "$path" <<<"$contents" || missing+=("$path")
done
[ ${#missing[@]} -eq 0 ] || fail "$deb lacks ${missing[*]}"
for page in ferry.1.gz ferry-status.1.gz ferry-daemon.1.gz; do
    grep -qxF "/usr/share/man/man1/$page" <<<"$contents" || fail "$deb lacks the man page $page"
done

info=$(dpkg-deb -I "$deb")
for field in Package Version Architecture Maintainer Depends Section Priority Description; do
    grep -q "^ $field: " <<<"$info" || fail "$deb has no $field field in its control file"
done
grep -q '^ Package: ferry$' <<<"$info" || fail "$deb is not named ferry"
for script in postinst prerm postrm; do
    grep -qE "^ +[0-9]+ bytes, +[0-9]+ lines +\* +$script( |$)" <<<"$info" ||
        fail "$deb lacks its $script maintainer script"
done

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
dpkg-deb -x "$deb" "$root"
version=$(env FERRY_HOME="$root/no-home" "$root/usr/bin/ferry" --version) ||
    fail "the packaged /usr/bin/ferry does not run"
[ "$version" = "ferry $(dpkg-deb -f "$deb" Version | sed 's/-[^-]*$//')" ] ||
    fail "the packaged binary says '$version', the package is $(dpkg-deb -f "$deb" Version)"
if command -v readelf >/dev/null && readelf -S "$root/usr/bin/ferry" | grep -q '\.debug_line'; then
    fail "the packaged /usr/bin/ferry still has its line tables (they belong in the -dbgsym package)"
fi
gzip -dc "$root/usr/share/man/man1/ferry.1.gz" | grep -q '^\.TH FERRY 1' ||
    fail "/usr/share/man/man1/ferry.1.gz is not ferry's roff man page"
grep -q '^ExecStart=/usr/bin/ferry daemon$' "$root/usr/lib/systemd/system/ferry@.service" ||
    fail "ferry@.service does not start /usr/bin/ferry daemon"

grep -v '\.deb$' <<<"$made" | sed 's/^/build-deb: also made /' >&2
echo "build-deb: $deb ($(du -k "$deb" | cut -f1) KiB) has the binary, both units, three completions and $pages man pages" >&2
echo "$deb"
