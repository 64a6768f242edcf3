#!/usr/bin/env bash
# A real Kubernetes control plane on this machine: etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler and kwok (fake GPU nodes), built from the Go module proxy on first use and cached.
#   scripts/cluster.sh up [--nodes 4] [--gpus-per-node 8] [--gpu-memory-mib 81920]   prints KUBECONFIG=...
#   scripts/cluster.sh status | down                            (state in .state/cluster; --state-dir D)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh >&2
exec .venv/bin/python -m e2e.control_plane "$@"
