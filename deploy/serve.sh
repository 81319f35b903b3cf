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
export PREFECT_API_URL="http://127.0.0.1:${PORT}/api"
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 NO_ALBUMENTATIONS_UPDATE=1 HF_HUB_OFFLINE=1
mkdir -p var/log var/plant/incoming "$REGISTRY"

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

"$VENV/bin/prefect" server start --host 127.0.0.1 --port "$PORT" >var/log/prefect-server.log 2>&1 &
pids+=($!)
for _ in $(seq 1 120); do
  curl -fsS "http://127.0.0.1:${PORT}/api/health" >/dev/null 2>&1 && break
  sleep 1
done
curl -fsS "http://127.0.0.1:${PORT}/api/health" >/dev/null || { echo "prefect server did not start; see var/log/prefect-server.log" >&2; exit 1; }
echo "Prefect UI: http://127.0.0.1:${PORT}"

"$VENV/bin/python" deploy/serve_flows.py >var/log/prefect-serve.log 2>&1 &
pids+=($!)

echo "runner: http://127.0.0.1:${RUNNER_PORT} (station ${STATION}, registry ${REGISTRY})"
"$VENV/bin/inspection" runner serve --registry "$REGISTRY" --station "$STATION" --port "$RUNNER_PORT" &
pids+=($!)
wait -n "${pids[@]}"
