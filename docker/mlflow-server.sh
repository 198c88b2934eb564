#!/bin/sh
# The MLflow tracking server of the scaled-out stack: PostgreSQL backend store, artifacts
# proxied to S3 (clients need no S3 credentials), basic authentication whose users are kept
# in PostgreSQL too. docker/compose.yaml runs it in the `mlflow` service, and
# tests/integration/test_backends.py runs it on loopback against a real PostgreSQL server
# and a local S3 server.
#
# Settings (environment):
#   MLFLOW_BACKEND_STORE_URI      postgresql+psycopg2://user:password@host:5432/mlflow
#   MLFLOW_AUTH_DATABASE_URI      postgresql+psycopg2://user:password@host:5432/mlflow_auth
#   MLFLOW_ARTIFACTS_DESTINATION  s3://bucket/prefix
#   MLFLOW_AUTH_ADMIN_USERNAME    the admin created on first start (default: admin)
#   MLFLOW_AUTH_ADMIN_PASSWORD    its password (only read while no admin exists yet)
#   MLFLOW_FLASK_SERVER_SECRET_KEY  signs the auth app's CSRF tokens
#   MLFLOW_S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY: the object store
#   MLFLOW_HOST (0.0.0.0), MLFLOW_PORT (5000), MLFLOW_WORKERS (2)
#   MLFLOW_AUTH (on): `off` serves without authentication (and needs no auth settings);
#                    `on` needs Flask-WTF (`mlflow[auth]`) in the image
# Extra arguments are passed on to `mlflow server`.
set -eu

: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI (postgresql+psycopg2://...)}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION (s3://bucket/prefix)}"

# MLflow's server-side job runner (GenAI features) starts a pool of consumer processes the
# pipeline never uses; leave it off unless asked for.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"

set -- --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
    --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" \
    --host "${MLFLOW_HOST:-0.0.0.0}" \
    --port "${MLFLOW_PORT:-5000}" \
    --workers "${MLFLOW_WORKERS:-2}" \
    "$@"

if [ "${MLFLOW_AUTH:-on}" = "off" ]; then
    exec mlflow server "$@"
fi

: "${MLFLOW_AUTH_DATABASE_URI:?set MLFLOW_AUTH_DATABASE_URI (postgresql+psycopg2://...)}"
: "${MLFLOW_FLASK_SERVER_SECRET_KEY:?set MLFLOW_FLASK_SERVER_SECRET_KEY}"

# The auth app reads its user database from an ini file only; write one from the
# environment, readable by this user alone (it holds the database password). The `%` of a
# URL-encoded password would be read as configparser interpolation, hence the doubling.
umask 077
auth_ini="${TMPDIR:-/tmp}/mlflow-basic-auth.ini"
auth_db=$(printf '%s' "$MLFLOW_AUTH_DATABASE_URI" | sed 's/%/%%/g')
cat > "$auth_ini" <<INI
[mlflow]
default_permission = ${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}
database_uri = ${auth_db}
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
export MLFLOW_AUTH_CONFIG_PATH="$auth_ini"

exec mlflow server --app-name basic-auth "$@"
