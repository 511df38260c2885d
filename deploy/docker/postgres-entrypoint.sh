#!/usr/bin/env bash
# Entrypoint of the hpsearch-local/postgres stand-in (deploy/docker/build-base-images.sh): the part
# of the official postgres image's contract that docker-compose.yml uses. On an empty data volume
# it creates the cluster with POSTGRES_USER (superuser, default postgres) and POSTGRES_PASSWORD
# (required; scram-sha-256 for network clients, trust on the local socket) and the database
# POSTGRES_DB (default: the user's name), then runs postgres as the postgres user, as PID 1, so
# Docker's stop signal (SIGINT: fast shutdown) reaches it.
set -euo pipefail
: "${PGDATA:=/var/lib/postgresql/data}"

if [ "$(id -u)" = 0 ]; then
    # As root only to own the volume and the socket folder; then the same script as postgres.
    mkdir -p "$PGDATA" /var/run/postgresql
    chown postgres:postgres "$PGDATA" /var/run/postgresql
    chmod 700 "$PGDATA"
    chmod 3777 /var/run/postgresql
    export HOME=/var/lib/postgresql
    exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" "$@"
fi

if [ "${1:0:1}" = "-" ]; then set -- postgres "$@"; fi

if [ "$1" = postgres ] && [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -z "${POSTGRES_PASSWORD:-}" ]; then
        echo "postgres-entrypoint: POSTGRES_PASSWORD is empty; set it (the database is not initialised)" >&2
        exit 1
    fi
    user=${POSTGRES_USER:-postgres}
    db=${POSTGRES_DB:-$user}
    initdb --username="$user" --pwfile=<(printf '%s\n' "$POSTGRES_PASSWORD") \
        --auth-local=trust --auth-host=scram-sha-256 --encoding=UTF8 --locale=C.UTF-8 -D "$PGDATA"
    echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
    echo "listen_addresses = '*'" >> "$PGDATA/postgresql.conf"
    # The database is created on a server that listens on no network interface.
    pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start
    if [ "$db" != postgres ]; then
        # On standard input: psql quotes :"db" there, not in -c.
        psql -v ON_ERROR_STOP=1 --username="$user" --dbname=postgres -v db="$db" <<<'CREATE DATABASE :"db"'
    fi
    pg_ctl -D "$PGDATA" -m fast -w stop
    echo "postgres-entrypoint: database $db initialised"
fi

exec "$@"
