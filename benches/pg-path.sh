#!/usr/bin/env bash
# PostgreSQL path benchmark: pgbench directly, through pgbouncer (session
# mode) and through Gatehouse's full path with audit on, interleaved in one
# run. Prints TPS ratios to direct, added p50/p99 latency at 1 client and
# the gateway's CPU time per transaction. Usage:
#   bash benches/pg-path.sh [seconds per run=10] [rounds=1]
# PROFILE=debug uses the debug build instead of building release binaries.
# GATEHOUSE_BENCH_POLICY=benches/policy-mask.yaml runs the gateway under a
# policy document (guardrails decided on every statement, masking on).
# GATEHOUSE_BENCH_ONLY=<regex> runs only the workloads whose name matches
# ("executemany" names the asyncpg one).
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${PROFILE:-release}
if [ "$profile" = release ]; then cargo build --release --workspace --bins -q; else cargo build --workspace --bins -q; fi
if ! command -v pgbouncer >/dev/null; then
  apt-get update -q >/dev/null && apt-get install -y -q pgbouncer >/dev/null
  # The package starts a system instance; the benchmark runs its own.
  systemctl stop pgbouncer 2>/dev/null || service pgbouncer stop 2>/dev/null || true
fi
# asyncpg (a third-party driver) for the executemany workload, where the
# tests' set-up puts it.
bash scripts/deps.sh test >/dev/null
export PYTHONPATH="$PWD/tests/drivers/pylib${PYTHONPATH:+:$PYTHONPATH}"
exec python3 benches/pg-path.py "${1:-10}" "${2:-1}" "target/$profile"
