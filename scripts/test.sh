#!/usr/bin/env bash
# Installs what the tests need, then runs the whole suite: unit and property
# tests, format checks, and the QEMU boot tests (qemu-tests/).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh

# On a fresh machine every kernel compiles once (then it comes from the cache,
# keyed by content). The amd64 kernel compiles in the foreground, in the first
# test that builds an image; the other arches' kernels compile meanwhile in
# the background, at low priority, on the core a TCG guest leaves idle. A
# test that needs one waits on the kernel's build lock, so nothing is built
# twice. A failure here is only logged: the test that needs the kernel builds
# it again and reports the error.
cargo build --locked -q -p kiln
mkdir -p target
prebuild_log=target/kernel-prebuild.log
(
  for p in profiles/qemu-arm64.toml profiles/qemu-armv7.toml; do
    nice -n 10 target/debug/kiln kernel build "$p" || echo "prebuild of $p's kernel failed; the tests will build it"
  done
) >"$prebuild_log" 2>&1 &
prebuild=$!

# Every test binary runs even when one fails, so one run reports every
# failure. Everything is compiled first; then two lanes run side by side on
# the two cores: the workspace's own tests (unit, property and format tests,
# and the reproducibility experiment, which compiles a kernel from scratch,
# niced) in the background, and the QEMU tests in the foreground, whose
# guests often wait on timers. The QEMU tests for the other arches and the
# real boards run last, so that their kernels compile in the background
# while the amd64 guests run. Then the second core is free: the armv7 tests
# (one-CPU guests, the longest binary) run beside the other late ones.
late_side=(armv7)
late=(arm64 boards containers real_size)
early=()
for f in qemu-tests/tests/*.rs; do
  n=$(basename "$f" .rs)
  [[ " ${late[*]} ${late_side[*]} " == *" $n "* ]] || early+=(--test "$n")
done
late_args=()
for n in "${late[@]}"; do late_args+=(--test "$n"); done
side_args=()
for n in "${late_side[@]}"; do side_args+=(--test "$n"); done
cargo test --workspace --locked --no-run -q
status=0
lane_log=target/test-workspace.log
( nice -n 10 cargo test --workspace --locked --no-fail-fast --exclude kiln-qemu-tests ) >"$lane_log" 2>&1 &
lane=$!
cargo test -p kiln-qemu-tests --locked --no-fail-fast --bins "${early[@]}" || status=$?
lane_status=0
wait "$lane" || lane_status=$?
echo "=== the workspace's own tests (ran beside the QEMU tests; $lane_log) ==="
cat "$lane_log"
[ "$lane_status" -eq 0 ] || status=$lane_status
side_log=target/test-qemu-side.log
( cargo test -p kiln-qemu-tests --locked --no-fail-fast "${side_args[@]}" ) >"$side_log" 2>&1 &
side=$!
cargo test -p kiln-qemu-tests --locked --no-fail-fast "${late_args[@]}" || status=$?
side_status=0
wait "$side" || side_status=$?
echo "=== ${late_side[*]} (ran beside the late QEMU tests; $side_log) ==="
cat "$side_log"
[ "$side_status" -eq 0 ] || status=$side_status
if [ "$status" -ne 0 ]; then
  pkill -P "$prebuild" 2>/dev/null || true
fi
wait "$prebuild" || true
exit "$status"
