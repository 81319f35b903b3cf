#!/usr/bin/env bash
# `make serve`: a local Prefect server (127.0.0.1, SQLite), the scheduled deployments, and the line-side runner.
# Ctrl-C / SIGTERM stops all three.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PORT=${PREFECT_PORT:-4200}
RUNNER_PORT=${RUNNER_PORT:-8080}
STATION=${STATION:-station-1}
REGISTRY=${REGISTRY:-var/plant/registry}
STORE=${STORE:-var/plant/decisions}  # the runner's decision store (SQLite); the review app reads it
export PREFECT_API_URL="http://127.0.0.1:${PORT}/api"
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 NO_ALBUMENTATIONS_UPDATE=1 HF_HUB_OFFLINE=1
TOKEN_FILE=${RUNNER_TOKEN_FILE:-var/runner.token}
mkdir -p var/log var/plant/incoming "$REGISTRY"
# The runner refuses requests without a bearer token: INSPECTION_RUNNER_TOKEN if set, else the one in $TOKEN_FILE,
# created on the first start (mode 0600, its path printed once). Only the runner process gets it.
RUNNER_TOKEN="$("$VENV/bin/python" -m inspection.runner.token --file "$TOKEN_FILE")"

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

"$VENV/bin/prefect" server start --host 127.0.0.1 --port "$PORT" >var/log/prefect-server.log 2>&1 &
pids+=($!)
healthy() {  # the venv's Python, not curl: a fresh Debian box may have no curl
  "$VENV/bin/python" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "$1" >/dev/null 2>&1
}
for _ in $(seq 1 120); do
  healthy "http://127.0.0.1:${PORT}/api/health" && break
  sleep 1
done
healthy "http://127.0.0.1:${PORT}/api/health" || { echo "prefect server did not start; see var/log/prefect-server.log" >&2; exit 1; }
echo "Prefect UI: http://127.0.0.1:${PORT}"

"$VENV/bin/python" deploy/serve_flows.py >var/log/prefect-serve.log 2>&1 &
pids+=($!)

echo "runner: http://127.0.0.1:${RUNNER_PORT} (station ${STATION}, registry ${REGISTRY}, decisions ${STORE})"
INSPECTION_RUNNER_TOKEN="$RUNNER_TOKEN" "$VENV/bin/inspection" runner serve --registry "$REGISTRY" --station "$STATION" \
  --store "$STORE" --port "$RUNNER_PORT" &
pids+=($!)
wait -n "${pids[@]}"
