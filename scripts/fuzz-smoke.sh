#!/usr/bin/env bash
# Builds every fuzz target (every */fuzz package) and runs each for a short, fixed number of
# iterations on its corpus, so a parser change that breaks a target, or an input that now
# panics, is caught by scripts/test.sh and not months later.
#   FUZZ_RUNS=N scripts/fuzz-smoke.sh   iterations per target (default 2000)
#   scripts/fuzz-smoke.sh grub          only the packages under the named crates
# Longer runs are done by hand: `cd imgengine/fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run fat`.
#
# cargo-fuzz needs nightly compiler flags; RUSTC_BOOTSTRAP=1 enables them on the pinned
# stable toolchain. The smoke run builds without a sanitizer (the parsers are safe Rust, and
# AddressSanitizer doubles the build time) and without optimisation (`--dev`: the server's
# fuzz package pulls in the whole server, which took 1,201 s to build optimised against 687 s unoptimised,
# and a few thousand runs per target need no speed), with debug assertions, so integer
# overflow and out-of-bounds slicing panic as they would in a debug build. The corpus is each package's
# fuzz/corpus/<target> (kept between runs, not committed); a fixed seed makes a run repeatable.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
export RUSTC_BOOTSTRAP=1

runs=${FUZZ_RUNS:-2000}
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "error: cargo-fuzz is not installed: run scripts/install-deps.sh" >&2
  exit 1
fi

if [ $# -gt 0 ]; then
  pkgs=()
  for c in "$@"; do pkgs+=("$c/fuzz"); done
else
  # Every crate's fuzz package (not target/fuzz, the build folder below).
  mapfile -t pkgs < <(ls -d */fuzz/Cargo.toml | sed 's,/Cargo.toml$,,')
fi

# One target folder for all fuzz packages: the crates they share (serde, sha2, ...) are
# built once.
target_dir="$PWD/target/fuzz"
flags=(--dev --sanitizer none --debug-assertions --target-dir "$target_dir")
start=$SECONDS
for pkg in "${pkgs[@]}"; do
  echo "== fuzz: $pkg (build)"
  (cd "$pkg" && cargo fuzz build "${flags[@]}")
  for t in $(cd "$pkg" && cargo fuzz list); do
    corpus="$pkg/corpus/$t"
    mkdir -p "$corpus" "$pkg/artifacts/$t"
    echo "== fuzz: $pkg $t ($runs runs on $(find "$corpus" -type f | wc -l) corpus inputs)"
    # -timeout: one input that takes 10 s is a hang, and fails the run.
    (cd "$pkg" && cargo fuzz run "${flags[@]}" "$t" -- \
      -runs="$runs" -seed=1 -max_len=65536 -timeout=10 -verbosity=0) \
      || { echo "error: fuzz target $pkg $t failed; the input is in $pkg/artifacts/$t" >&2; exit 1; }
  done
done
echo "fuzz smoke: ${#pkgs[@]} packages in $((SECONDS - start)) s"
