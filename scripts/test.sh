#!/usr/bin/env bash
# The whole test suite from a fresh checkout: set-up (idempotent), lint, types, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# the real control plane e2e/ runs against: built from the Go module proxy once, then cached by version
echo "== control plane"; bash scripts/build-control-plane.sh
export PATH="$PWD/.tools/bin:$PATH"
echo "== ruff"; .venv/bin/ruff check .
echo "== mypy"; .venv/bin/mypy
pytest=(.venv/bin/python -m pytest -q -p no:cacheprovider)
if [ "$#" -gt 0 ]; then
  echo "== pytest"; exec "${pytest[@]}" "$@"
fi
# The whole suite, in three groups. The real-control-plane scenarios mostly wait on the cluster's
# controllers, so they run beside the unit tests (two processes sharing nothing); the embedded-default
# e2e times recoveries under traffic, so it runs after them, alone. Every group runs; any failure fails.
status=0
cluster_log=$(mktemp)
cluster=""
# interrupted: stop the scenarios running beside (their fixtures stop the control plane)
trap '[ -n "$cluster" ] && kill "$cluster" 2>/dev/null; rm -f "$cluster_log"' EXIT
echo "== pytest: tests/, with e2e/test_cluster_operator.py beside it"
"${pytest[@]}" e2e/test_cluster_operator.py > "$cluster_log" 2>&1 &
cluster=$!
"${pytest[@]}" tests || status=1
wait "$cluster" || status=1
cluster=""
echo "== pytest: e2e/test_cluster_operator.py (the real control plane)"; cat "$cluster_log"
echo "== pytest: the rest of e2e/ (the embedded default)"
"${pytest[@]}" e2e --ignore=e2e/test_cluster_operator.py || status=1
exit "$status"
