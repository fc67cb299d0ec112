#!/usr/bin/env bash
# Installs the system packages Gatehouse needs, when missing.
#   deps.sh build   what the build needs (libclang for PostgreSQL's parser)
#   deps.sh dev     the build, plus a PostgreSQL server for `gatehouse dev`
#   deps.sh test    the build, plus everything the tests run
set -euo pipefail
mode="${1:-build}"

sudo=""
if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi

need=()
# pg_query (PostgreSQL's parser, for guardrails) generates its bindings with libclang.
ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 || need+=(libclang-dev)
if [ "$mode" = dev ] || [ "$mode" = test ]; then
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql postgresql-contrib)
  command -v psql >/dev/null || need+=(postgresql-client)
fi
if [ "$mode" = test ]; then
  command -v pgbench >/dev/null || need+=(postgresql-contrib)
  command -v runuser >/dev/null || need+=(util-linux)
  command -v sha256sum >/dev/null || need+=(coreutils)
  # Network namespaces and a MASQUERADE NAT for the agent-behind-NAT test.
  command -v ip >/dev/null || need+=(iproute2)
  command -v iptables >/dev/null || need+=(iptables)
  command -v conntrack >/dev/null || need+=(conntrack)
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
if [ "$mode" = test ]; then
  # A real S3-compatible server for the recording tests (keeps each bucket
  # as a directory; this version builds with the pinned Rust).
  command -v s3s-fs >/dev/null || cargo install s3s-fs@0.14.1 --features binary --locked
fi
