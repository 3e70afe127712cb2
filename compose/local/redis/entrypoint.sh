#!/bin/sh
# Runs redis-server as the official image does: not in protected mode (which refuses every
# client but loopback when there is no password; the compose network is the boundary here),
# as the redis user, in /data. Any other command runs as given.
set -eu
if [ "${1:-}" = redis-server ]; then
	case "${2:-}" in -v | --version | -h | --help) exec "$@" ;; esac
	shift
	chown -R redis:redis /data
	exec setpriv --reuid=redis --regid=redis --init-groups \
		redis-server --protected-mode no "$@"
fi
exec "$@"
