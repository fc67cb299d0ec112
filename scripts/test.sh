#!/usr/bin/env bash
# Installs every system package the build and the tests need (when missing),
# then builds the workspace and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."

sudo=""
if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi

need=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql postgresql-contrib)
command -v psql >/dev/null || need+=(postgresql-client)
command -v pgbench >/dev/null || need+=(postgresql-contrib)
command -v runuser >/dev/null || need+=(util-linux)
command -v sha256sum >/dev/null || need+=(coreutils)
# Network namespaces and a MASQUERADE NAT for the agent-behind-NAT test.
command -v ip >/dev/null || need+=(iproute2)
command -v iptables >/dev/null || need+=(iptables)
command -v conntrack >/dev/null || need+=(conntrack)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
cargo nextest --version >/dev/null 2>&1 || cargo install cargo-nextest --locked

# The end-to-end tests run the workspace's binaries.
cargo build --workspace --all-targets
cargo nextest run --workspace --no-fail-fast "$@"
