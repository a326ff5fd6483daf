#!/usr/bin/env bash
# For CI: installs cargo-deb when `cargo deb --version` fails, then builds the
# Debian package and checks it (packaging/build-deb.sh). Installs nothing
# else on the machine: the package is checked from its contents, not
# installed.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo deb --version >/dev/null 2>&1; then
    echo "== cargo install cargo-deb" >&2
    # The 3.x series is what the [package.metadata.deb] section was written
    # for; --locked builds it with the dependency versions it was released with.
    cargo install cargo-deb --version '^3.8' --locked
fi

bash packaging/build-deb.sh
