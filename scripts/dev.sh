#!/usr/bin/env bash
# Installs what the build and a local PostgreSQL need (when missing), builds
# the workspace, and runs the whole system locally: `gatehouse dev`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh dev
cargo build --workspace
exec ./target/debug/gatehouse dev "$@"
