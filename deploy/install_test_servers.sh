#!/usr/bin/env bash
# The system servers the test suite starts itself (`make test` runs this first; so does .ci/run):
#   Mosquitto   (MQTT broker; tests/fixtures/serving.py starts one on a free loopback port)
#   Chromium    (/usr/bin/chromium, driven by Playwright in tests/integration/test_review_browser.py)
#   PostgreSQL  (server binaries; tests/integration/test_postgres_store.py runs a throwaway cluster)
# Checks each one and installs only what is missing, with apt-get (Debian/Ubuntu), as root or through sudo.
# Nothing is started or enabled here: the tests start and stop their own instances. Quiet when all are present.
set -euo pipefail

have_mosquitto() { command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; }
have_chromium() { [ -x /usr/bin/chromium ]; }  # the path the browser test launches
have_postgres() { command -v initdb >/dev/null 2>&1 || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; }

missing() {
  local need=()
  have_mosquitto || need+=(mosquitto)
  have_chromium || need+=(chromium)
  have_postgres || need+=(postgresql)
  echo "${need[@]}"
}

read -r -a need <<<"$(missing)"
[ ${#need[@]} -eq 0 ] && exit 0

echo "test servers missing: ${need[*]}; installing them with apt-get" >&2
if ! command -v apt-get >/dev/null 2>&1; then
  echo "error: no apt-get on this machine; install ${need[*]} (Chromium at /usr/bin/chromium) and run make test again" >&2
  exit 1
fi
as_root=()
if [ "$(id -u)" -ne 0 ]; then
  if ! command -v sudo >/dev/null 2>&1; then
    echo "error: installing ${need[*]} needs root; run: apt-get install ${need[*]} (as root), then make test" >&2
    exit 1
  fi
  as_root=(sudo)
fi
start=$SECONDS
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -qq
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null

read -r -a still <<<"$(missing)"
if [ ${#still[@]} -gt 0 ]; then
  echo "error: apt-get finished but ${still[*]} still not found (Chromium must be at /usr/bin/chromium)" >&2
  exit 1
fi
echo "installed ${need[*]} in $((SECONDS - start)) s" >&2
