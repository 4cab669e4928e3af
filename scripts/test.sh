#!/usr/bin/env bash
# Runs stately's whole test suite on a fresh Debian machine: installs the Debian packages the
# tests need when they are missing, builds once, and runs every test (in parallel where nextest
# is installed). The tests start their own real processes on loopback; nothing leaves the machine.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests drive, and a file that shows each is there.
declare -A PACKAGES=(
  [coreutils]=/bin/sleep
  [passwd]=/usr/sbin/nologin
  [haproxy]=/usr/sbin/haproxy
  [python3-aiosmtpd]=/usr/lib/python3/dist-packages/aiosmtpd
  [pebble]=/usr/bin/pebble-challtestsrv
  [systemd]=/usr/bin/systemd-analyze
  [prometheus]=/usr/bin/promtool
  [bind9]=/usr/sbin/named
  [bind9-dnsutils]=/usr/bin/dig
  [certbot]=/usr/bin/certbot
  [nginx]=/usr/sbin/nginx
  [chromium]=/usr/bin/chromium
  [postgresql]=/usr/lib/postgresql/15/bin/initdb
)
missing=()
for pkg in "${!PACKAGES[@]}"; do
  [ -e "${PACKAGES[$pkg]}" ] || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # bind9, nginx and postgresql would start system services (a recursive resolver on :53, a
  # web server on :80, a database on :5432); the tests start their own on free loopback
  # ports, so the packages' services stay off.
  policy=/usr/sbin/policy-rc.d
  made_policy=
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && made_policy=1
  fi
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}"
  [ -z "$made_policy" ] || rm -f "$policy"
fi
getent group nogroup >/dev/null || { echo "the tests need the Debian group 'nogroup'" >&2; exit 1; }

# The Python examples run in a venv with grpcio and grpcio-tools from PyPI (the stubs are
# generated from proto/ by the tests themselves).
venv=target/pyvenv
if ! "$venv/bin/python" -c 'import grpc, grpc_tools' 2>/dev/null; then
  python3 -m venv "$venv" || { apt-get install -y -qq python3-venv && python3 -m venv "$venv"; }
  "$venv/bin/pip" install --quiet grpcio grpcio-tools
fi

# buf (lint and breaking-change checks of proto/), from the npm package that ships it.
if [ ! -x target/buf/node_modules/.bin/buf ]; then
  mkdir -p target/buf
  npm install --prefix target/buf --silent --no-audit --no-fund @bufbuild/buf@1
fi

# playwright-core drives Debian's chromium headless in the console's browser test (it brings no
# browser of its own; the test points it at /usr/bin/chromium).
if [ ! -d target/console-node/node_modules/playwright-core ]; then
  mkdir -p target/console-node
  npm install --prefix target/console-node --silent --no-audit --no-fund playwright-core@1
fi

# cargo-deb builds the Debian package the tests install (scripts/package.sh).
if ! cargo deb --version 2>/dev/null | grep -q '^cargo-deb 3\.'; then
  cargo install cargo-deb --locked --version '^3.8' --quiet
fi

# The example programs are built too: the tests run them as a user would.
cargo build --examples --quiet

# One throwaway PostgreSQL cluster for the run (each test of the PostgreSQL ledger takes a
# schema of its own in it), stopped when the run ends.
pg_dir=$(mktemp -d /tmp/stately-pg.XXXXXX)
chmod 755 "$pg_dir"
trap 'scripts/pg-test-cluster.sh stop "$pg_dir/pg"; rm -rf "$pg_dir"' EXIT
STATELY_TEST_POSTGRES=$(scripts/pg-test-cluster.sh start "$pg_dir/pg")
export STATELY_TEST_POSTGRES

status=0
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --lib --bins --tests --no-fail-fast "$@" || status=$?
  # The integration suites again, with the job ledger on PostgreSQL.
  STATELY_TEST_STORE=postgres cargo nextest run --test integration --no-fail-fast "$@" ||
    status=$?
else
  cargo test --lib --bins --tests --no-fail-fast "$@" || status=$?
  STATELY_TEST_STORE=postgres cargo test --test integration --no-fail-fast "$@" || status=$?
fi
exit $status
