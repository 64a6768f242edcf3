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
echo "== pytest"; .venv/bin/python -m pytest -q -p no:cacheprovider tests e2e "$@"
