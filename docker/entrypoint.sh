#!/bin/sh
# Entry point of the genderclf images (docker/Dockerfile, docker/Dockerfile.gpu).
#
#   worker --pool cpu [...]   `prefect worker start` in the pipeline checkout
#   repro [stage ...]         `dvc repro` in the pipeline checkout
#   pipeline [-S k=v ...]     the gender-pipeline Prefect flow (flows/pipeline.py)
#   mlflow-server [...]       the MLflow tracking server (docker/mlflow-server.sh)
#   prefect-server [...]      `prefect server start` (database from PREFECT_API_DATABASE_CONNECTION_URL)
#   anything else             run as a command (`dvc push`, `genderclf compare`, `bash`)
#
# The pipeline checkout is GENDERCLF_REPO (/workspace): mount a clone there, or set
# GENDERCLF_GIT_URL (and GENDERCLF_GIT_REF, default: its HEAD) to clone one into it at start. With
# DVC_REMOTE_URL set (s3://bucket/prefix), it becomes the checkout's default DVC remote in
# .dvc/config.local (never committed), with DVC_REMOTE_ENDPOINT_URL for S3-compatible
# stores; credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.
set -eu

repo="${GENDERCLF_REPO:-/workspace}"

usage() {
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
}

checkout() {
    if [ -n "${GENDERCLF_GIT_URL:-}" ] && [ ! -d "$repo/.git" ]; then
        git clone ${GENDERCLF_GIT_REF:+--branch "$GENDERCLF_GIT_REF"} "$GENDERCLF_GIT_URL" "$repo"
    fi
    if [ ! -f "$repo/dvc.yaml" ]; then
        echo "genderclf: no pipeline checkout in $repo (mount a clone there or set GENDERCLF_GIT_URL)" >&2
        exit 2
    fi
    cd "$repo"
    if [ -n "${DVC_REMOTE_URL:-}" ]; then
        dvc remote add --local --force --default s3 "$DVC_REMOTE_URL"
        if [ -n "${DVC_REMOTE_ENDPOINT_URL:-}" ]; then
            dvc remote modify --local s3 endpointurl "$DVC_REMOTE_ENDPOINT_URL"
        fi
    fi
}

cmd="${1:-help}"
[ "$#" -gt 0 ] && shift
case "$cmd" in
    worker)
        checkout
        exec prefect worker start "$@"
        ;;
    repro)
        checkout
        exec dvc repro "$@"
        ;;
    pipeline)
        checkout
        exec python flows/pipeline.py "$@"
        ;;
    mlflow-server)
        exec mlflow-server "$@"
        ;;
    prefect-server)
        exec prefect server start --host "${PREFECT_SERVER_API_HOST:-0.0.0.0}" "$@"
        ;;
    help | -h | --help)
        usage
        ;;
    *)
        exec "$cmd" "$@"
        ;;
esac
