#!/usr/bin/env bash
# pgbench -S directly against PostgreSQL and through the full Gatehouse path
# (ingress -> QUIC -> agent -> PostgreSQL, audit and recording on), interleaved,
# in one run. Prints TPS for each and the ratio. Usage:
#   bash benches/pgbench-path.sh [clients=4] [seconds=10] [rounds=2]
# PROFILE=debug uses the debug build instead of building release binaries.
set -euo pipefail
cd "$(dirname "$0")/.."
clients=${1:-4}; secs=${2:-10}; rounds=${3:-2}
profile=${PROFILE:-release}
if [ "$profile" = release ]; then cargo build --release --workspace --bins -q; else cargo build --workspace --bins -q; fi
bin=target/$profile
work=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
( cd "$work" && "$OLDPWD/$bin/gatehouse" dev --data-dir "$work/dev" > "$work/dev.out" 2>&1 ) &
for _ in $(seq 1 120); do [ -f "$work/dev/dev.env" ] && break; sleep 0.5; done
source "$work/dev/dev.env"
pgport=$(grep -o 'port = [0-9]*' "$work/dev/agent/agent.toml" | grep -o '[0-9]*')
pgpw=$(cat "$work/dev/agent/demo.password")
PGPASSWORD=$pgpw PGSSLMODE=disable pgbench -i -s 1 -q -h 127.0.0.1 -p "$pgport" -U gatehouse_agent app >/dev/null 2>&1
tps() { grep -o 'tps = [0-9.]*' | head -1 | grep -o '[0-9.]*'; }
for r in $(seq 1 "$rounds"); do
  d=$(PGPASSWORD=$pgpw PGSSLMODE=disable pgbench -S -n -c "$clients" -T "$secs" -h 127.0.0.1 -p "$pgport" -U gatehouse_agent app | tps)
  g=$(pgbench -S -n -c "$clients" -T "$secs" app | tps)
  echo "round $r: direct ${d} tps, gatehouse ${g} tps, ratio $(python3 -c "print(f'{$g/$d:.2f}')")"
done
