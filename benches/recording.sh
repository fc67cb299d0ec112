#!/usr/bin/env bash
# Recording throughput for a large result set: the agent's recorder into the
# spool (events/s, MB/s), the uploader to a real S3-compatible server (MB/s),
# and psql fetching a large result directly and through the gateway with
# every row recorded, in one run. Builds release binaries first.
#   bash benches/recording.sh            (GATEHOUSE_BENCH_ROWS=N for the recorder part)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v s3s-fs >/dev/null || cargo install s3s-fs@0.14.1 --features binary --locked
cargo build --release --workspace --bins -q
cargo bench -q -p gatehouse-e2e --bench recording
