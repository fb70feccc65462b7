#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what it needs, builds the static agent,
# then runs every unit and end-to-end test against the real peer tools.
#   QUICK=1 scripts/test.sh   skips the slow virtual-machine suites.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"

echo "== static musl build of the agent (release, size-tuned)"
cargo build --locked --release --target x86_64-unknown-linux-musl -p agent
bin=target/x86_64-unknown-linux-musl/release/img
# A static(-pie) binary has no program interpreter and needs no shared library.
if readelf -ld "$bin" | grep -qE "INTERP|\(NEEDED\)"; then
  echo "error: $bin is dynamically linked; it must be static" >&2
  exit 1
fi
echo "img (static musl): $(stat -c %s "$bin") bytes"

echo "== unit and end-to-end tests"
# Two test threads: the machine has two cores and the end-to-end suites run real tools.
cargo test --locked --workspace --no-fail-fast -- --test-threads=2
