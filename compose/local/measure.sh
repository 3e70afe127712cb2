#!/usr/bin/env bash
# Times the dev stack on the local images (compose/docker-compose.local.yml), RUNS times each
# (default 3), and prints every run and the median with its spread:
#   cold build   build-images.sh and `compose build` with nothing cached (NO_CACHE=1, and
#                --no-cache for tempomq's image, which the example services then reuse)
#   warm build   the same again with everything cached (what a second CI run does)
#   healthy      `compose up --wait` from no containers and no volumes until every
#                healthcheck passes (MariaDB initialising its data directory included)
# Needs a running Docker engine and Compose v2, as root; leaves no containers or volumes.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
RUNS=${RUNS:-3}
PROJECT=tempomq-measure
export STACK_PORT=${STACK_PORT:-18180}
COMPOSE=(docker compose --ansi never -p "$PROJECT" -f "$ROOT/compose/docker-compose.yml"
	-f "$ROOT/compose/docker-compose.local.yml" --profile example)

trap '"${COMPOSE[@]}" down --volumes --remove-orphans >/dev/null 2>&1' EXIT
make -C "$ROOT" -s compose-token  # the admin token's secret, which the stack needs to start

seconds() {  # seconds COMMAND...: run it quietly, print how long it took
	local start end
	start=$(date +%s.%N)
	"$@" >/dev/null 2>&1 || { echo "measure: $* failed" >&2; return 1; }
	end=$(date +%s.%N)
	echo "$start $end" | awk '{ printf "%.1f\n", $2 - $1 }'
}

cold_build() {
	NO_CACHE=1 "$HERE/build-images.sh"
	"${COMPOSE[@]}" build --no-cache tempomq
	"${COMPOSE[@]}" build
}
warm_build() { "$HERE/build-images.sh" && "${COMPOSE[@]}" build; }
healthy() {
	"${COMPOSE[@]}" down --volumes --remove-orphans >/dev/null 2>&1
	seconds "${COMPOSE[@]}" up --detach --wait mysql redis tempomq
}

summary() {  # summary NAME VALUES...: the runs, their median and spread
	local name=$1
	shift
	printf '%s\n' "$@" | sort -n | awk -v name="$name" '
		{ v[NR] = $1 }
		END { m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
		      printf "%-12s median %6.1f s  min %6.1f  max %6.1f  (%d runs)\n", name, m, v[1], v[NR], NR }'
}

declare -a cold=() warm=() up=()
for _ in $(seq "$RUNS"); do
	cold+=("$(seconds cold_build)")
	echo "cold build: ${cold[-1]} s" >&2
done
for _ in $(seq "$RUNS"); do
	warm+=("$(seconds warm_build)")
	echo "warm build: ${warm[-1]} s" >&2
done
for _ in $(seq "$RUNS"); do
	up+=("$(healthy | tail -1)")
	echo "healthy: ${up[-1]} s" >&2
done
summary "cold build" "${cold[@]}"
summary "warm build" "${warm[@]}"
summary "healthy" "${up[@]}"
