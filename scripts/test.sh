#!/usr/bin/env bash
# Installs every system package the build and the tests need (when missing),
# then builds the workspace and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh test
cargo nextest --version >/dev/null 2>&1 || cargo install cargo-nextest --locked

# The end-to-end tests run the workspace's binaries.
cargo build --workspace --all-targets
cargo nextest run --workspace --no-fail-fast "$@"
