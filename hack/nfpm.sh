#!/usr/bin/env bash
# Installs the pinned nfpm (the .deb/.rpm packager) into the cache through the Go module proxy,
# once, and prints its path.
#
# Pinned at v2.44.1: v2.45 and later import go.digitalxero.dev/rpm and go-msix, which the module
# proxy reachable here refuses (403), so they cannot be built on these machines.
set -euo pipefail
ver=v2.44.1
cache=${KPR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kpr}
dir="$cache/nfpm-$ver"
if [ ! -x "$dir/nfpm" ]; then
  mkdir -p "$dir"
  echo "nfpm.sh: installing nfpm $ver into $dir" >&2
  GOBIN="$dir" GOFLAGS=-mod=mod go install "github.com/goreleaser/nfpm/v2/cmd/nfpm@$ver" >&2
fi
echo "$dir/nfpm"
