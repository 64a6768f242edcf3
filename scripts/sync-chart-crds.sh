#!/usr/bin/env bash
# Copies the CustomResourceDefinitions from crds/ (their one source of truth) into the Helm chart, and
# removes chart copies whose source is gone. tests/charts checks the two stay byte-identical.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=charts/hps-operator/crds
mkdir -p "$dest"
for stale in "$dest"/*.yaml; do
  [ -e "$stale" ] || continue
  [ -e "crds/$(basename "$stale")" ] || { rm -f "$stale"; echo "removed $stale"; }
done
for crd in crds/*.yaml; do
  [ -e "$crd" ] || { echo "no CRDs in crds/" >&2; exit 1; }
  if ! cmp -s "$crd" "$dest/$(basename "$crd")"; then
    cp "$crd" "$dest/"
    echo "copied $crd -> $dest/"
  fi
done
