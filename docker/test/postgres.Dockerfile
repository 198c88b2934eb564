# PostgreSQL for the Docker tests, from Debian's postgresql package on the local base image
# (docker/base/build.sh): the public postgres image cannot be pulled where the tests run.
# It behaves as the subset of the official image that docker/compose.yaml relies on:
# POSTGRES_USER / POSTGRES_PASSWORD / POSTGRES_DB, first-start scripts in
# /docker-entrypoint-initdb.d, data in /var/lib/postgresql/data, pg_isready on PATH.
# Users keep postgres:16 (docker/compose.yaml); Debian bookworm's server is PostgreSQL 15.
#   docker build -f docker/test/postgres.Dockerfile --build-arg BASE_IMAGE=... .
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}
ARG PG_MAJOR=15
# The official image's uid/gid 999 for `postgres`; no cluster at install time (the entry
# point creates one in the volume at first start).
# hadolint ignore=DL3008
RUN groupadd --system --gid 999 postgres \
    && useradd --system --uid 999 --gid postgres --home-dir /var/lib/postgresql postgres \
    && apt-get update \
    && apt-get install -y --no-install-recommends postgresql-common \
    && sed -ri 's/#?\s*create_main_cluster\s*=.*/create_main_cluster = false/' \
        /etc/postgresql-common/createcluster.conf \
    && apt-get install -y --no-install-recommends "postgresql-${PG_MAJOR}" \
    && rm -rf /var/lib/apt/lists/* \
    && install -d -o postgres -g postgres -m 0700 /var/lib/postgresql/data \
    && install -d -o postgres -g postgres -m 2775 /var/run/postgresql /docker-entrypoint-initdb.d
COPY --chmod=0755 docker/test/postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint
ENV PATH=/usr/lib/postgresql/${PG_MAJOR}/bin:$PATH \
    PGDATA=/var/lib/postgresql/data
USER 999:999
STOPSIGNAL SIGINT
ENTRYPOINT ["postgres-entrypoint"]
CMD ["postgres"]
