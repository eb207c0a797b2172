#!/usr/bin/env bash
# Prints kpr's version for the binary and the packages: the tag vX.Y.Z without its "v" when
# HEAD is tagged, else 0.0.0~git<commit date>.<short commit> (sorts before any release in
# dpkg and rpm), with +dirty when the work tree has changes.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! git rev-parse --git-dir >/dev/null 2>&1; then echo "0.0.0~dev"; exit; fi
if tag=$(git describe --tags --exact-match --match 'v[0-9]*' 2>/dev/null); then
  v=${tag#v}
else
  v="0.0.0~git$(git show -s --format=%cd --date=format:%Y%m%d HEAD).$(git rev-parse --short HEAD)"
fi
git diff --quiet HEAD -- 2>/dev/null || v="$v+dirty"
echo "$v"
