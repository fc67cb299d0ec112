#!/usr/bin/env bash
# Installs the system packages Gatehouse needs, when missing.
#   deps.sh build   what the build needs
#   deps.sh dev     the build, plus a PostgreSQL server for `gatehouse dev`
#   deps.sh test    the build, plus everything the tests run
#
# Whether a package is present is asked of the package manager, by the
# package's exact name: a look-alike library (libclang-cpp for libclang, say)
# never counts. Only the exact file the build loads is checked as well.
set -euo pipefail
mode="${1:-build}"

sudo=""
if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi

# pg_query (PostgreSQL's own parser, for guardrails) generates its bindings
# with bindgen, which loads libclang.so.
# samael (SAML) checks XML signatures with xmlsec, on libxml2 and OpenSSL.
build_pkgs=(libclang-dev pkg-config libxmlsec1-dev libxml2-dev libssl-dev)
# `gatehouse dev` starts a throwaway PostgreSQL server and prints psql lines.
dev_pkgs=(postgresql postgresql-contrib postgresql-client)
# The tests: pgbench (in the client package), runuser for initdb as a
# non-root user, network namespaces and a MASQUERADE NAT for the
# agent-behind-NAT test.
# xmlsec1 signs the SAML responses of the tests' identity provider.
# OpenSSH's server and client: the SSH tests' real target and real clients
# (ssh, scp, sftp, ssh-keygen); tmux drives an interactive ssh session in a
# real terminal.
test_pkgs=(util-linux coreutils iproute2 iptables conntrack xmlsec1 openssh-server openssh-client tmux)

case "$mode" in
  build) want=("${build_pkgs[@]}") ;;
  dev) want=("${build_pkgs[@]}" "${dev_pkgs[@]}") ;;
  test) want=("${build_pkgs[@]}" "${dev_pkgs[@]}" "${test_pkgs[@]}") ;;
  *) echo "deps.sh: unknown mode '$mode' (build | dev | test)" >&2; exit 2 ;;
esac

installed() {
  [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]
}

need=()
for p in "${want[@]}"; do
  installed "$p" || need+=("$p")
done
# The exact library bindgen loads; libclang-dev provides it as a symlink.
if ! compgen -G '/usr/lib/llvm-*/lib/libclang.so' >/dev/null; then
  case " ${need[*]} " in *" libclang-dev "*) ;; *) need+=(libclang-dev) ;; esac
fi

if [ ${#need[@]} -gt 0 ]; then
  echo "deps.sh ($mode): installing ${need[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
case " ${need[*]} " in
  # The package starts a system sshd; the tests and the demo run their own.
  *" openssh-server "*) $sudo service ssh stop >/dev/null 2>&1 || true ;;
esac
# An sshd that is not root logs in only its own user: a root-started demo or
# test sshd runs as this unprivileged user, with a shell and a home.
if [ "$mode" != build ] && [ "$(id -u)" = 0 ]; then
  if ! id gatehouse-demo >/dev/null 2>&1; then
    useradd --system --create-home --home-dir /var/lib/gatehouse-demo --shell /bin/bash gatehouse-demo
  fi
  # No password, but not locked: sshd (without PAM) refuses a locked
  # account even a key would log in.
  if [ "$(passwd -S gatehouse-demo | awk '{print $2}')" = L ]; then
    usermod -p '*' gatehouse-demo
  fi
fi
if ! compgen -G '/usr/lib/llvm-*/lib/libclang.so' >/dev/null; then
  echo "deps.sh: libclang-dev is installed but no /usr/lib/llvm-*/lib/libclang.so exists; reinstall libclang-dev and its libclang-NN-dev" >&2
  exit 1
fi

if [ "$mode" = test ]; then
  # A real OpenID Provider for the identity tests (npm oidc-provider, run
  # with Node.js on loopback), at the version package-lock.json pins.
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    echo "deps.sh (test): installing nodejs npm"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends nodejs npm
  fi
  if [ ! -d "$root/tests/oidc/node_modules/oidc-provider" ]; then
    echo "deps.sh (test): installing the test OpenID Provider with npm"
    npm ci --prefix "$root/tests/oidc" --no-audit --no-fund --loglevel=error
  fi
  # asyncpg, a third-party driver (not libpq) the fidelity tests and the
  # benchmark's executemany drive through the gateway: from PyPI at a pinned
  # version, into tests/drivers/pylib for the python3 on PATH.
  pylib="$root/tests/drivers/pylib"
  if ! PYTHONPATH="$pylib" python3 -c 'import asyncpg' 2>/dev/null; then
    echo "deps.sh (test): installing asyncpg 0.30.0 with pip"
    if ! python3 -m pip --version >/dev/null 2>&1; then
      $sudo apt-get update -qq
      DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends python3-pip
    fi
    PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
      --target "$pylib" asyncpg==0.30.0
  fi
  # A real S3-compatible server for the recording tests (keeps each bucket
  # as a directory; this version builds with the pinned Rust).
  if ! command -v s3s-fs >/dev/null; then
    echo "deps.sh (test): installing s3s-fs 0.14.1 with cargo"
    cargo install s3s-fs@0.14.1 --features binary --locked
  fi
fi
