#!/usr/bin/env bash
# The GPU cache's device checks in one run, on a machine with a CUDA GPU and CuPy: the kernel probe,
# the GPU tests (CuPy against NumPy, state array by state array; streams; the served path) beside the
# CPU cache tests, then bench/gpu_cache.py, whose JSON lands in bench/results/gpu_cache-<device>.json.
# With $OUT set, the test log, the benchmark's table and its JSON are copied there too.
#
#   bash bench/device_check.sh                    # on the GPU machine, from the repository root
#   bash bench/device_check.sh --prepare-wheels   # beforehand, where pip reaches PyPI (see below)
#
# A GPU machine that reaches no package registry has CuPy, NumPy, PyYAML, pytest and hypothesis, but
# not what node_agent.tiers imports (redis, rocksdict): --prepare-wheels downloads those as CPython
# 3.12 wheels into .whl/ (ignored by git), and this script installs whatever .whl/ holds into a private
# site directory first. The project itself runs from the checkout (PYTHONPATH), its compiled cache
# kernel built here with the machine's C compiler when it has one (the array version serves if not).
# Environment: PYTHON (default python3), DEVICE (default cuda), BENCH_ARGS (extra benchmark options).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare-wheels" ]; then
  PIP="${PIP:-.venv/bin/python -m pip}"
  rm -rf .whl && mkdir -p .whl
  $PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl redis rocksdict
  ls -l .whl
  exit 0
fi

PY="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}"
OUT_DIR="${OUT:-}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/hps-site .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/hps-site"
fi

# the compiled query/insert loops for this Python (pip install would build them; here there is no pip
# install, and a build from another machine is for another interpreter)
ext="$($PY -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')"
include="$($PY -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
if command -v gcc >/dev/null && [ -f "$include/Python.h" ]; then
  gcc -O3 -std=c11 -shared -fPIC -I"$include" node_agent/cache/native/setassoc.c \
    -o "node_agent/cache/native/_setassoc$ext" || echo "native cache kernel not built: the array version serves"
fi

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
label="$($PY - <<'PYEOF'
from node_agent.array_backend import get_xp, kernel_probe, cuda_device_count
import os, re
device = os.environ.get("DEVICE", "cuda")
if device == "cpu":
    print("cpu")
else:
    print("kernel probe on cuda:0:", kernel_probe(0) or "compiled and ran", file=__import__("sys").stderr)
    xp, name = get_xp(device)
    props = xp.cuda.runtime.getDeviceProperties(0)
    raw = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    print(re.sub(r"[^a-z0-9]+", "-", raw.lower()).strip("-"))
PYEOF
)"
echo "device: $label"
logs="bench/results"
mkdir -p "$logs"

set +e
$PY -m pytest -q -p no:cacheprovider --noconftest -rs tests/gpu tests/node_agent/test_cache.py \
  tests/node_agent/test_array_backend.py 2>&1 | tee "$logs/gpu_cache-$label-tests.txt"
tests_rc=${PIPESTATUS[0]}
# shellcheck disable=SC2086 # BENCH_ARGS is a list of options
$PY bench/gpu_cache.py --device "$DEVICE" ${BENCH_ARGS:-} 2>&1 | tee "$logs/gpu_cache-$label-bench.txt"
bench_rc=${PIPESTATUS[0]}
set -e

if [ -n "$OUT_DIR" ]; then
  cp "$logs/gpu_cache-$label-tests.txt" "$logs/gpu_cache-$label-bench.txt" "$OUT_DIR/"
  [ -f "$logs/gpu_cache-$label.json" ] && cp "$logs/gpu_cache-$label.json" "$OUT_DIR/"
fi
echo "tests exit $tests_rc, benchmark exit $bench_rc"
exit $(( tests_rc != 0 || bench_rc != 0 ))
