#!/bin/sh
# Entry point of docker/test/postgres.Dockerfile: on first start (empty PGDATA) create the
# cluster with POSTGRES_USER and POSTGRES_PASSWORD, create POSTGRES_DB, run the scripts of
# /docker-entrypoint-initdb.d on a server reachable only through its Unix socket; then run
# the server in the foreground. `postgres -c k=v ...` (the official image's command form)
# or bare `-c k=v ...` both pass settings to the server. PGPORT sets the port.
set -eu

: "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}"
user="${POSTGRES_USER:-postgres}"
db="${POSTGRES_DB:-$user}"
[ "${1:-}" = "postgres" ] && shift

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    pwfile=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
    # local (socket) connections trusted, TCP ones need the password (scram-sha-256)
    initdb -D "$PGDATA" -U "$user" --pwfile="$pwfile" --auth-local=trust \
        --auth-host=scram-sha-256 -E UTF8 --no-locale >/dev/null
    rm -f "$pwfile"
    pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
    if [ "$db" != "postgres" ]; then
        psql -v ON_ERROR_STOP=1 -U "$user" -d postgres -qc "CREATE DATABASE \"$db\""
    fi
    for f in /docker-entrypoint-initdb.d/*; do
        case "$f" in
            *.sh) echo "postgres-entrypoint: running $f"; POSTGRES_USER="$user" sh "$f" ;;
            *.sql) echo "postgres-entrypoint: running $f"; psql -v ON_ERROR_STOP=1 -U "$user" -d "$db" -f "$f" ;;
            *) [ -e "$f" ] && echo "postgres-entrypoint: ignoring $f" ;;
        esac
    done
    pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
fi
exec postgres -D "$PGDATA" "$@"
