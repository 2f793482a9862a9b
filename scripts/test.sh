#!/usr/bin/env bash
# Installs what the tests need, then runs the whole suite: unit and property
# tests, format checks, and the QEMU boot tests (qemu-tests/).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo test --workspace --locked
