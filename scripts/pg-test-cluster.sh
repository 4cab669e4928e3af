#!/usr/bin/env bash
# A throwaway PostgreSQL cluster on loopback for the tests (Debian's postgresql package).
#   scripts/pg-test-cluster.sh start DIR   initdb in DIR, start it on a free port, print its URL
#   scripts/pg-test-cluster.sh stop DIR    stop it (immediately: the data is thrown away)
# PostgreSQL refuses to run as root, so the cluster runs as the `postgres` user; durability is
# off (fsync=off): a test's cluster does not outlive the machine.
set -euo pipefail
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[ -x "$bin/initdb" ] || { echo "PostgreSQL is not installed; scripts/test.sh installs it" >&2; exit 1; }
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
dir=$2
case "$1" in
stop)
  as_pg "$bin/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true
  exit 0
  ;;
start) ;;
*) echo "usage: $0 start|stop DIR" >&2; exit 2 ;;
esac
mkdir -p "$dir"
[ "$(id -u)" = 0 ] && chown postgres: "$dir"
as_pg test -w "$dir" || { echo "$dir: the postgres user cannot reach it (a parent directory is private)" >&2; exit 1; }
as_pg "$bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --no-sync >"$dir/initdb.log" 2>&1 ||
  { cat "$dir/initdb.log" >&2; exit 1; }
for _ in 1 2 3 4 5; do
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  if as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w -t 30 start -o \
    "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off -c max_connections=300" \
    >/dev/null; then
    echo "postgresql://postgres@127.0.0.1:$port/postgres"
    exit 0
  fi
done
cat "$dir/log" >&2
exit 1
