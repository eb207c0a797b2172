#!/usr/bin/env bash
# Prints the Debian changelog of the package being built (one entry: the version and the
# commit it comes from), dated by the commit so that rebuilds are identical.
set -euo pipefail
cd "$(dirname "$0")/.."
version=$1
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
date=$(date -u -R -d "@$(git show -s --format=%ct HEAD 2>/dev/null || date +%s)")
cat <<EOT
kpr ($version) unstable; urgency=medium

  * Built from commit $commit of https://github.com/kpr-dev/kpr.

 -- kpr developers <kpr@kpr.dev>  $date
EOT
