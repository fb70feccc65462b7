#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what it needs, builds the static agent,
# checks formatting and lints, smoke-runs the fuzz targets, then runs every unit and end-to-end
# test against the real peer tools, the slow virtual-machine suites last.
#   QUICK=1 scripts/test.sh   skips the virtual-machine suites (and says so).
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

echo "== formatting and lints"
cargo fmt --all --check
# Lint levels (clippy::undocumented_unsafe_blocks at deny, ...) are in Cargo.toml's
# [workspace.lints]; every crate opts in with `[lints] workspace = true`.
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== fuzz targets (build, and a short fixed run on each corpus)"
bash scripts/fuzz-smoke.sh

echo "== unit and end-to-end tests"
# Two test threads: the machine has two cores and the end-to-end suites run real tools.
cargo test --locked --workspace --no-fail-fast -- --test-threads=2

# The QEMU suites are #[ignore]d so that a plain `cargo test` stays fast and a skip is shown
# as a skip ("ignored"), never as a pass.
qemu_names=()
qemu_suites=()
for f in tests/tests/qemu_*.rs; do
  qemu_names+=("$(basename "$f" .rs)")
  qemu_suites+=(--test "$(basename "$f" .rs)")
done
if [ -n "${QUICK:-}" ]; then
  echo "== virtual-machine suites SKIPPED (QUICK is set): ${qemu_names[*]}"
else
  echo "== virtual-machine suites"
  cargo test --locked -p e2e "${qemu_suites[@]}" --no-fail-fast -- --ignored --test-threads=2
fi
