#!/usr/bin/env bash
# SSH path benchmark: 1 GiB through scp and through `ssh … cat`, each way,
# directly to a real sshd and through the whole gateway path, interleaved in
# one run; prints throughput, the ratio to direct, the gateway's CPU per GiB
# and its processes' peak resident set. Builds release binaries first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh test >/dev/null
cargo build --release --workspace --bins -q
cargo bench -q -p gatehouse-e2e --bench ssh
