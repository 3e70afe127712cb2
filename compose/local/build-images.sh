#!/usr/bin/env bash
# Builds, from Debian's packages alone, the images that compose/docker-compose.local.yml puts in
# place of the official ones (python:3.11-slim, mysql:8.4, redis:7), for a Docker engine that
# cannot pull from an image registry:
#
#   tempomq-local/debian:bookworm   debootstrap of Debian bookworm, `docker import`ed
#   tempomq-local/python:3.11       Debian's Python 3.11 in a virtualenv on PATH, with a wheelhouse
#                                   of tempomq's dependencies that pip installs from offline
#   tempomq-local/mariadb:bookworm  Debian's MariaDB, set up from MYSQL_* like the mysql image
#   tempomq-local/redis:bookworm    Debian's Redis 7, run like the redis image
#   tempomq-local/nats:bookworm     Debian's nats-server, run like the nats image (profile nats)
#
# Run as root (debootstrap). Each image is built only when missing or out of date, so a second
# run takes seconds: the base image is kept once imported, the wheelhouse is rebuilt when the
# requirements change, the rest is Docker's build cache. NO_CACHE=1 builds everything anew.
# DEBIAN_MIRROR chooses the mirror (default: deb.debian.org).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PYTHON=${PYTHON:-python3}
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PREFIX=tempomq-local
BASE_IMAGE=$PREFIX/debian:$SUITE
PYTHON_IMAGE=$PREFIX/python:3.11
WHEELHOUSE_LABEL=org.tempomq.wheelhouse
HOST_CA_BUNDLE=${HOST_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
NO_CACHE=${NO_CACHE:-0}
BUILD_OPTS=(--quiet --build-arg "BASE_IMAGE=$BASE_IMAGE")
if [ "$NO_CACHE" = 1 ]; then
	BUILD_OPTS+=(--no-cache)
fi
# Installed into the image besides pyproject.toml's dependencies: the build backend that
# `pip install -e .` needs, and what compose/Dockerfile names on its own pip line.
EXTRA_REQUIREMENTS=(wheel "cryptography>=42")

log() { echo "build-images: $*" >&2; }

WORK=$(mktemp -d)
# --one-file-system: an interrupted debootstrap may leave /proc or /sys mounted in its rootfs.
trap 'rm -rf --one-file-system "$WORK"' EXIT
trap 'exit 1' INT TERM

build_base() {
	if [ "$NO_CACHE" != 1 ] && docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
		log "$BASE_IMAGE: present"
		return
	fi
	log "$BASE_IMAGE: debootstrap $SUITE from $MIRROR"
	debootstrap --variant=minbase "$SUITE" "$WORK/rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
		|| { tail -20 "$WORK/debootstrap.log" >&2; return 1; }
	# The downloaded packages and lists are dead weight in every image built on this one.
	rm -rf "$WORK"/rootfs/var/cache/apt/archives/*.deb "$WORK"/rootfs/var/lib/apt/lists/*
	tar -C "$WORK/rootfs" -c . | docker import - "$BASE_IMAGE" >/dev/null
	rm -rf --one-file-system "$WORK/rootfs"
}

requirements() {
	"$PYTHON" - "$ROOT/pyproject.toml" <<'PY'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)
print(*project["project"]["dependencies"], *project["build-system"]["requires"], sep="\n")
PY
	printf '%s\n' "${EXTRA_REQUIREMENTS[@]}"
}

build_python() {
	local digest current
	requirements >"$WORK/requirements.txt"
	digest=$(cat "$WORK/requirements.txt" "$HERE/python/Dockerfile" | sha256sum | cut -c1-16)
	current=$(docker image inspect -f "{{ index .Config.Labels \"$WHEELHOUSE_LABEL\" }}" \
		"$PYTHON_IMAGE" 2>/dev/null || true)
	if [ "$NO_CACHE" != 1 ] && [ "$current" = "$digest" ]; then
		log "$PYTHON_IMAGE: present, requirements unchanged"
		return
	fi
	log "$PYTHON_IMAGE: building the wheelhouse and the image"
	mkdir -p "$WORK/python/wheels"
	cp "$HERE/python/Dockerfile" "$WORK/python/"
	docker build "${BUILD_OPTS[@]}" --target interpreter \
		-t "$PYTHON_IMAGE-interpreter" "$WORK/python" >/dev/null
	# The wheels are resolved by the image's own pip, so that environment markers (such as
	# python_full_version) are those of the image's Python, not of whatever runs this script.
	# The container trusts the certificate authorities the host trusts, so a TLS-inspecting
	# proxy the host goes through works for it too.
	local trust=()
	if [ -f "$HOST_CA_BUNDLE" ]; then
		trust=(-v "$HOST_CA_BUNDLE:/etc/ssl/certs/host-ca.crt:ro" -e PIP_CERT=/etc/ssl/certs/host-ca.crt)
	fi
	docker run --rm "${trust[@]}" -v "$WORK:/work" "$PYTHON_IMAGE-interpreter" \
		pip wheel --quiet --disable-pip-version-check --wheel-dir /work/python/wheels \
		-r /work/requirements.txt
	docker build "${BUILD_OPTS[@]}" \
		--label "$WHEELHOUSE_LABEL=$digest" -t "$PYTHON_IMAGE" "$WORK/python" >/dev/null
}

build_service() {  # build_service NAME: tempomq-local/NAME:bookworm from compose/local/NAME/
	log "$PREFIX/$1:$SUITE: building"
	docker build "${BUILD_OPTS[@]}" -t "$PREFIX/$1:$SUITE" "$HERE/$1" \
		>/dev/null
}

build_base
build_python
build_service mariadb
build_service redis
build_service nats
log "done"
