#!/usr/bin/env bash
# Three-node control-plane benchmark: committed audit events/s and failover
# time over repeated leader kills. Builds release binaries first.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --bins -q
cargo bench -q -p gatehouse-e2e --bench cluster
