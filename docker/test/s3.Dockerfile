# An S3-protocol server for the Docker tests: moto's server mode (`moto[server]`, the
# version uv.lock pins for the dev group) on the local base image. It stands in for MinIO,
# whose image cannot be pulled where the tests run; users keep MinIO (docker/compose.yaml).
# Build from the repository root (it reads uv.lock):
#   docker build -f docker/test/s3.Dockerfile --build-arg BASE_IMAGE=... .
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}
ARG UV_VERSION=0.13.9
WORKDIR /src
COPY pyproject.toml uv.lock README.md ./
# Every version from uv.lock: the locked requirements are the constraints of the install.
RUN python3 -m venv /opt/uv \
    && /opt/uv/bin/pip install --no-cache-dir --disable-pip-version-check "uv==${UV_VERSION}" \
    && /opt/uv/bin/uv export --frozen --no-emit-project --no-hashes --quiet -o /src/locked.txt \
    && /opt/uv/bin/uv venv --quiet /opt/s3 \
    && /opt/uv/bin/uv pip install --quiet --python /opt/s3/bin/python \
        --constraint /src/locked.txt "moto[server]" \
    && rm -rf /opt/uv /root/.cache
ENV PATH=/opt/s3/bin:$PATH
USER 65534:65534
ENTRYPOINT ["moto_server"]
CMD ["-H", "127.0.0.1", "-p", "9000"]
