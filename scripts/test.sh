#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what it needs, builds the static agent,
# checks formatting and lints, smoke-runs the fuzz targets, then runs every unit and end-to-end
# test against the real peer tools, the slow virtual-machine suites last.
#   QUICK=1 scripts/test.sh   skips the virtual-machine suites (and says so).
# The preparation (packages, the static build) stops the run at its first failure; after it
# every step runs even when an earlier one failed (a flaky test must not hide the others'
# results), each step's time is printed, and the run ends with the list of the steps that
# failed and a non-zero exit code if there is one.
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

failed=()
# step NAME COMMAND...: runs one step, prints its time, records it when it fails.
step() {
  local name=$1 t0=$SECONDS
  shift
  echo "== $name"
  if "$@"; then
    echo "== $name: ok ($((SECONDS - t0)) s)"
  else
    echo "== $name: FAILED (exit $?, $((SECONDS - t0)) s)"
    failed+=("$name")
  fi
}

step "formatting" cargo fmt --all --check
# Lint levels (clippy::undocumented_unsafe_blocks at deny, ...) are in Cargo.toml's
# [workspace.lints]; every crate opts in with `[lints] workspace = true`.
step "lints" cargo clippy --workspace --all-targets --locked -- -D warnings

# Build every fuzz target and run each briefly on its corpus.
step "fuzz targets" bash scripts/fuzz-smoke.sh

# The end-to-end suites run `img` as the release musl build made above, the binary that
# ships (tests/src/lib.rs: img_bin); a plain `cargo test` uses the debug build instead.
export IMG_BIN="$PWD/$bin" IMG_STATIC_BIN="$PWD/$bin"
# Two test threads: the machine has two cores and the end-to-end suites run real tools.
step "unit and end-to-end tests" \
  cargo test --locked --workspace --no-fail-fast -- --test-threads=2

# The QEMU suites are #[ignore]d so that a plain `cargo test` stays fast and a skip is shown
# as a skip ("ignored"), never as a pass. They run test by test, two at a time.
if [ -n "${QUICK:-}" ]; then
  echo "== virtual-machine suites SKIPPED (QUICK is set): $(cd tests/tests && ls qemu_*.rs | tr '\n' ' ')"
else
  step "virtual-machine suites" bash scripts/vm-suites.sh
fi

echo "== total: $SECONDS s"
if [ ${#failed[@]} -gt 0 ]; then
  echo "== FAILED steps: ${failed[*]}" >&2
  exit 1
fi
echo "== every step passed"
