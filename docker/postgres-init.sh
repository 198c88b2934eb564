#!/bin/sh
# Runs once, when the PostgreSQL volume is first initialised (/docker-entrypoint-initdb.d):
# one database per store, owned by the stack's user.
set -eu
for db in ${POSTGRES_EXTRA_DATABASES:-mlflow mlflow_auth prefect}; do
    psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
        -c "CREATE DATABASE \"$db\" OWNER \"$POSTGRES_USER\""
done
