#!/usr/bin/env bash
# Runs the virtual-machine suites (tests/tests/qemu_*.rs, #[ignore]d so that a plain
# `cargo test` stays fast) test by test, VM_JOBS at a time (default 2: one QEMU per core).
# `cargo test` runs one test binary after the other, so a suite with one long test left a
# core idle; here every test of every suite is one job in one queue, the longest suites first.
#   scripts/vm-suites.sh                  every test of every qemu_* suite
#   scripts/vm-suites.sh qemu_life ...    only those suites
#   VM_JOBS=1 scripts/vm-suites.sh        one at a time (a busy machine)
# Each test's output goes to target/vm-suites/<suite>.<test>.log; a failure prints its log's
# tail. Exit code: 0 when every test passed, 1 otherwise (the failed ones are listed).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

jobs=${VM_JOBS:-2}
if [ $# -gt 0 ]; then
  suites=("$@")
else
  # Longest first (measured): the queue ends with short tests, so both cores stay busy.
  suites=()
  for s in qemu_autogenic qemu_life qemu_guest qemu_pxe qemu_flash qemu_boot; do
    [ -f "tests/tests/$s.rs" ] && suites+=("$s")
  done
  for f in tests/tests/qemu_*.rs; do
    s=$(basename "$f" .rs)
    [[ " ${suites[*]} " == *" $s "* ]] || suites+=("$s")
  done
fi

# The kernel cache is filled once here, not by two tests at the same moment.
bash scripts/fetch-kernel.sh target/kernel >/dev/null

args=()
for s in "${suites[@]}"; do args+=(--test "$s"); done
# Build the suites and learn each one's executable.
declare -A exe
while IFS=' ' read -r name path; do
  exe[$name]=$path
done < <(cargo test --locked -p e2e "${args[@]}" --no-run --message-format=json 2>/dev/null \
  | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"], m["executable"])
')

logs=target/vm-suites
rm -rf "$logs"
mkdir -p "$logs"
queue=$logs/queue
: >"$queue"
for s in "${suites[@]}"; do
  bin=${exe[$s]:-}
  if [ -z "$bin" ]; then
    echo "error: suite $s did not build (run: cargo test -p e2e --test $s --no-run)" >&2
    exit 1
  fi
  # Only the #[ignore]d tests: the others ran in the unit and end-to-end step.
  "$bin" --ignored --list --format terse | sed -n 's/: test$//p' | while read -r t; do
    echo "$s $bin $t" >>"$queue"
  done
done
echo "vm-suites: $(wc -l <"$queue") tests from ${#suites[@]} suites, $jobs at a time"

# One test: its own process, its own log, one line with its result and time.
one() {
  local suite=$1 bin=$2 test=$3 log="$logs/$1.$3.log" t0=$SECONDS
  if "$bin" --ignored --exact "$test" --test-threads=1 >"$log" 2>&1; then
    echo "vm-suites: ok     $suite::$test ($((SECONDS - t0)) s)"
  else
    echo "vm-suites: FAILED $suite::$test ($((SECONDS - t0)) s); the end of $log:"
    tail -n 40 "$log" | sed 's/^/    /'
    echo "$suite::$test" >>"$logs/failed"
  fi
}
export -f one
export logs
start=$SECONDS
xargs -P "$jobs" -L 1 bash -c 'one "$@"' _ <"$queue"
echo "vm-suites: $((SECONDS - start)) s"
if [ -s "$logs/failed" ]; then
  echo "vm-suites: FAILED: $(tr '\n' ' ' <"$logs/failed")" >&2
  exit 1
fi
echo "vm-suites: every test passed"
