#!/usr/bin/env bash
# Builds a real Kubernetes control plane from the Go module proxy and caches it by version outside
# the repository: kube-apiserver, kube-controller-manager and kube-scheduler from k8s.io/kubernetes,
# etcd from go.etcd.io/etcd/server, and kwok (fake nodes and pod status). Safe to run again: a
# complete cache is used as it is, and a second run returns in well under a second.
#
# Prints the cache's bin directory on stdout. Environment:
#   HPS_CONTROL_PLANE_CACHE  where builds are kept (default: ${XDG_CACHE_HOME:-~/.cache}/hps-operator/control-plane)
#   K8S_VERSION / ETCD_VERSION / KWOK_VERSION  the pinned releases below
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-1.35.4}"
ETCD_VERSION="${ETCD_VERSION:-3.6.16}"
KWOK_VERSION="${KWOK_VERSION:-0.8.0}"
CACHE_ROOT="${HPS_CONTROL_PLANE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hps-operator/control-plane}"
BIN="$CACHE_ROOT/k8s-v${K8S_VERSION}_etcd-v${ETCD_VERSION}_kwok-v${KWOK_VERSION}/bin"
WANT=(kube-apiserver kube-controller-manager kube-scheduler etcd kwok kwok-stages.yaml)

log() { printf '[control-plane] %s\n' "$*" >&2; }

complete() {
  local b
  for b in "${WANT[@]}"; do [ -e "$BIN/$b" ] || return 1; done
}

if complete; then echo "$BIN"; exit 0; fi
command -v go >/dev/null 2>&1 || { log "go is not installed: the control plane is built with the Go toolchain"; exit 1; }

mkdir -p "$CACHE_ROOT"
exec 9>"$CACHE_ROOT/.lock"
flock 9  # two builds at once (two checkouts) would race for the same cache
if complete; then echo "$BIN"; exit 0; fi

work="$(mktemp -d "$CACHE_ROOT/build.XXXXXX")"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/bin"
export GOFLAGS="-mod=mod -buildvcs=false" CGO_ENABLED=0
# Symbols are stripped: the binaries are for tests, and stripping halves what the cache holds.
strip_flags="-s -w"

# --- kube-apiserver, kube-controller-manager, kube-scheduler -----------------------------------
# k8s.io/kubernetes requires its staging modules at v0.0.0 (they live in its own tree); outside
# that tree each must be pinned by a replace to the matching published v0.<minor>.<patch>.
minor_patch="${K8S_VERSION#1.}"
log "fetching k8s.io/kubernetes v${K8S_VERSION}'s go.mod"
mkdir -p "$work/k8s" && cd "$work/k8s"
go mod download -json "k8s.io/kubernetes@v${K8S_VERSION}" > dl.json
upstream_mod="$(sed -n 's/.*"GoMod": "\(.*\)".*/\1/p' dl.json)"
{
  echo "module hps.dev/control-plane-build"
  echo
  grep -E '^go [0-9]' "$upstream_mod"
  echo
  echo "require k8s.io/kubernetes v${K8S_VERSION}"
  echo
  echo "replace ("
  awk '$2 == "v0.0.0" && $1 ~ /^k8s\.io\// {print "\t" $1 " => " $1 " v0.'"$minor_patch"'"}' "$upstream_mod"
  echo ")"
} > go.mod
cat > tools.go <<'EOF'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
)
EOF
log "resolving modules (go mod tidy)"
go mod tidy -e >/dev/null 2>&1 || go mod tidy
ver_flags="-X k8s.io/component-base/version.gitVersion=v${K8S_VERSION}"
ver_flags+=" -X k8s.io/component-base/version.gitMajor=1"
ver_flags+=" -X k8s.io/component-base/version.gitMinor=${minor_patch%%.*}"
ver_flags+=" -X k8s.io/component-base/version.gitTreeState=clean"
ver_flags+=" -X k8s.io/client-go/pkg/version.gitVersion=v${K8S_VERSION}"
log "building kube-apiserver, kube-controller-manager, kube-scheduler v${K8S_VERSION} (minutes on a cold cache)"
go build -trimpath -ldflags "$strip_flags $ver_flags" -o "$work/bin/" \
  k8s.io/kubernetes/cmd/kube-apiserver \
  k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-scheduler

# --- etcd ----------------------------------------------------------------------------------------
# go.etcd.io/etcd/server/v3 is etcd's main package; its go.mod replaces siblings by relative path,
# so `go install module@version` refuses it. Building it as a dependency of a module of ours works.
log "building etcd v${ETCD_VERSION}"
mkdir -p "$work/etcd" && cd "$work/etcd"
cat > go.mod <<EOF
module hps.dev/etcd-build

go 1.26.0

require go.etcd.io/etcd/server/v3 v${ETCD_VERSION}
EOF
cat > tools.go <<'EOF'
//go:build tools

package tools

import _ "go.etcd.io/etcd/server/v3"
EOF
go mod tidy -e >/dev/null 2>&1 || go mod tidy
go build -trimpath -ldflags "$strip_flags" -o "$work/bin/etcd" go.etcd.io/etcd/server/v3

# --- kwok ----------------------------------------------------------------------------------------
log "building kwok v${KWOK_VERSION}"
GOBIN="$work/bin" go install -trimpath -ldflags "$strip_flags" "sigs.k8s.io/kwok/cmd/kwok@v${KWOK_VERSION}"
# kwok ships its lifecycle stages as YAML beside its code: nodes become Ready and keep a lease, pods
# on them become Running and Ready, Job pods Succeeded, deleted pods go
kwok_dir="$(go mod download -json "sigs.k8s.io/kwok@v${KWOK_VERSION}" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')"
for stage in node/fast/node-initialize node/heartbeat-with-lease/node-heartbeat-with-lease \
             pod/fast/pod-ready pod/fast/pod-complete pod/fast/pod-delete; do
  echo "---"; cat "$kwok_dir/kustomize/stage/$stage.yaml"
done > "$work/bin/kwok-stages.yaml"

for b in "${WANT[@]}"; do [ -s "$work/bin/$b" ] || { log "build did not produce $b"; exit 1; }; done
mkdir -p "$(dirname "$BIN")"
rm -rf "$BIN" && mv "$work/bin" "$BIN"
log "cached in $BIN"
echo "$BIN"
