#!/usr/bin/env bash
# Installs the Debian packages that building, testing and the demo need, once.
set -euo pipefail
pkgs=(clang llvm libbpf-dev bpftool iproute2 util-linux nftables etcd-server curl iptables conntrack rpm lintian)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "deps: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi
