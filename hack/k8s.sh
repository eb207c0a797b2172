#!/usr/bin/env bash
# One Kubernetes version pin (hack/k8s-version) drives both the replace block in go.mod
# and the kube-apiserver / kube-proxy / kubeadm binaries our tests and benchmarks run.
#
#   hack/k8s.sh replaces   print go.mod replace lines for every k8s.io staging module
#   hack/k8s.sh bins       build the binaries into the cache (once per pin) and print the dir
#   hack/k8s.sh bindir     print the cache dir without building
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
ver=$(tr -d ' \n' < "$here/k8s-version")
staging_ver="v0.${ver#v1.}"
cache=${KPR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kpr}
bindir="$cache/k8s-$ver"

k8s_gomod() {
  GOFLAGS=-mod=mod go mod download -json "k8s.io/kubernetes@$ver" \
    | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p'
}

# Every "k8s.io/x => ./staging/src/k8s.io/x" in k8s.io/kubernetes' own go.mod becomes
# "k8s.io/x => k8s.io/x v0.Y.Z": the staging modules are published at the matching version.
replaces() {
  local gomod
  gomod=$(k8s_gomod)
  [ -n "$gomod" ] || { echo "k8s.sh: cannot download k8s.io/kubernetes@$ver" >&2; exit 1; }
  echo "replace ("
  awk -v v="$staging_ver" '$2 == "=>" && $3 ~ /^\.\/staging\/src\// { printf "\t%s => %s %s\n", $1, $1, v }' "$gomod"
  echo ")"
}

bins() {
  local want=(kube-apiserver kube-proxy kubeadm) missing=0 b
  for b in "${want[@]}"; do [ -x "$bindir/$b" ] || missing=1; done
  # A binary without the version stamp comes from an older recipe: rebuild.
  [ "$missing" = 1 ] || "$bindir/kube-apiserver" --version 2>/dev/null | grep -qx "Kubernetes $ver" || missing=1
  if [ "$missing" = 0 ]; then echo "$bindir"; return; fi
  mkdir -p "$cache"
  build_dir=$(mktemp -d "$cache/build.XXXXXX")
  trap 'rm -rf "${build_dir:-}"' EXIT
  local work=$build_dir
  {
    echo "module kprk8sbuild"
    echo
    echo "go 1.25"
    echo
    echo "require k8s.io/kubernetes $ver"
    echo
    replaces
  } > "$work/go.mod"
  cat > "$work/tools.go" <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kubeadm"
)
GO
  (
    cd "$work"
    GOFLAGS=-mod=mod go mod tidy -e >&2 || true
    GOFLAGS=-mod=mod go get "k8s.io/kubernetes@$ver" >&2
    mkdir -p "$work/out"
    local minor=${ver#v1.}; minor=${minor%%.*}
    local stamp="-X k8s.io/component-base/version.gitVersion=$ver -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/component-base/version.gitTreeState=clean"
    for b in "${want[@]}"; do
      echo "k8s.sh: building $b $ver (cold builds take minutes)" >&2
      CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -ldflags "-s -w $stamp" -o "$work/out/$b" "k8s.io/kubernetes/cmd/$b" >&2
    done
  )
  mkdir -p "$bindir"
  for b in "${want[@]}"; do mv "$work/out/$b" "$bindir/$b"; done
  echo "$bindir"
}

case "${1:-}" in
  replaces) replaces ;;
  bins) bins ;;
  bindir) echo "$bindir" ;;
  *) echo "usage: $0 replaces|bins|bindir" >&2; exit 2 ;;
esac
