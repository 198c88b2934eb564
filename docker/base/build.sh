#!/bin/sh
# A local stand-in for python:3.11-slim-bookworm, made from Debian's own packages:
# debootstrap a minimal bookworm with Python 3.11 (and venv), then `docker import` it.
#
#   sudo docker/base/build.sh [TAG]          default TAG: genderclf-base:py3.11-bookworm
#   docker build --build-arg BASE_IMAGE=genderclf-base:py3.11-bookworm -f docker/Dockerfile .
#
# For machines that reach a Debian mirror but no image registry (the Docker tests run on
# one). Users build the images on the public python:3.11-slim-bookworm and never need this.
# Needs root, debootstrap and a running Docker engine. Settings (environment):
#   MIRROR     the Debian mirror debootstrap installs from (default: debootstrap's own)
#   SUITE      bookworm (the suite of python:3.11-slim-bookworm: Python 3.11)
#   WORKDIR    where the root filesystem is assembled (default: a temporary folder; removed)
#   CA_DIR     extra certificate authorities (*.crt) the image trusts, as this machine does
#              (default: /usr/local/share/ca-certificates, where Debian keeps local ones,
#              e.g. a TLS-inspecting proxy's that stands between this machine and PyPI)
set -eu

tag="${1:-genderclf-base:py3.11-bookworm}"
suite="${SUITE:-bookworm}"
# What the images need of the base beyond the minimal system: Python 3.11 with venv (the
# build stage installs uv into one), TLS roots, /etc/services and time zones (as the
# python:*-slim images have), and `python` on PATH.
packages="python3.11,python3.11-venv,python3-venv,python-is-python3,ca-certificates,netbase,tzdata"

[ "$(id -u)" -eq 0 ] || { echo "build.sh: run as root (debootstrap needs it)" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "build.sh: apt-get install debootstrap" >&2; exit 1; }
docker info >/dev/null 2>&1 || { echo "build.sh: no Docker engine answers" >&2; exit 1; }

work="${WORKDIR:-$(mktemp -d /tmp/genderclf-base.XXXXXX)}"
rootfs="$work/rootfs"
cleanup() { rm -rf "$work"; }
[ -n "${WORKDIR:-}" ] || trap cleanup EXIT INT TERM

debootstrap --variant=minbase --include="$packages" "$suite" "$rootfs" ${MIRROR:+"$MIRROR"}

# Trust what this machine trusts: its local CAs join the image's system bundle, and pip and
# uv are pointed at that bundle (they carry their own roots otherwise).
ca_dir="${CA_DIR:-/usr/local/share/ca-certificates}"
if ls "$ca_dir"/*.crt >/dev/null 2>&1; then
    mkdir -p "$rootfs/usr/local/share/ca-certificates"
    cp "$ca_dir"/*.crt "$rootfs/usr/local/share/ca-certificates/"
    chroot "$rootfs" update-ca-certificates --fresh >/dev/null
fi

# What python:*-slim leaves out too: package caches and lists, docs, man pages, logs.
chroot "$rootfs" apt-get clean
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
    "$rootfs"/var/log/*.log "$rootfs"/var/log/apt/* "$rootfs"/tmp/* "$rootfs"/root/.cache
# no leftovers from the machine that built it
: > "$rootfs/etc/hostname"
: > "$rootfs/etc/resolv.conf"
chroot "$rootfs" python3.11 -c 'import ssl, sqlite3, venv, ensurepip'

# The label lets the tests rebuild the image when this script changes.
script_sha=$(sha256sum "$0" | cut -c1-64)
tar --numeric-owner -C "$rootfs" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    --change 'CMD ["python3"]' \
    --change "LABEL org.genderclf.base.script-sha256=$script_sha" \
    --message "debootstrap $suite minbase + $packages" \
    - "$tag"
docker image inspect --format '{{.Id}} {{.Size}}' "$tag"
