#!/usr/bin/env bash
# The first command of the README: sets up this checkout, generates the demo tables, starts the whole
# stack on this machine (redis-server + an agent), looks a few keys up, runs a short lookup benchmark,
# and leaves the stack running. Safe to run again: every step skips what is already done.
set -euo pipefail
cd "$(dirname "$0")/.."

STATE_DIR=.state/demo
MODEL=examples/demo.yaml
HPS=.venv/bin/hps

step() { printf '\n== %s\n' "$*"; }

step "setting up (virtual environment, redis-server)"
bash scripts/setup.sh

step "generating the demo tables (seeded; skipped when present)"
.venv/bin/python examples/make_demo_data.py -f "$MODEL"

step "starting the stack: hps local up -f $MODEL --state-dir $STATE_DIR"
up_out="$("$HPS" local up -f "$MODEL" --state-dir "$STATE_DIR")"
echo "$up_out"
endpoint="$(echo "$up_out" | awk '/^endpoint: /{print $2; exit}')"

model="$(.venv/bin/python -c 'import sys; from node_agent.spec import load_model_file; print(load_model_file(sys.argv[1]).name)' "$MODEL")"
tables="$(.venv/bin/python -c 'import sys; from node_agent.spec import load_model_file; print(" ".join(t.name for t in load_model_file(sys.argv[1]).tables[:2]))' "$MODEL")"
for table in $tables; do
  step "hps lookup --endpoint $endpoint --model $model --table $table --keys 0,1,2"
  "$HPS" lookup --endpoint "$endpoint" --model "$model" --table "$table" --keys 0,1,2
done

step "hps local status --state-dir $STATE_DIR"
"$HPS" local status --state-dir "$STATE_DIR" || true

step "a short lookup benchmark: agent over gRPC vs Redis HMGET vs NumPy (hps bench lookup)"
"$HPS" bench lookup --rows 50000 --dim 64 --batch 1024 --duration 3 --warmup 1

printf "\nThe stack is still running at %s. Stop it with: .venv/bin/hps local down --state-dir %s\n" "$endpoint" "$STATE_DIR"
