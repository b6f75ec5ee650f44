#!/usr/bin/env bash
# buf breaking against the newest release tag. The contracts are unreleased until v0.1.0: with
# no tag there is nothing to compare against, and the check says so and passes.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-uv run}
tag=$(git tag --list 'v[0-9]*' --sort=-v:refname 2>/dev/null | head -n 1)
if [[ -z "$tag" ]]; then
  echo "buf breaking: no release tag yet (contracts unreleased until v0.1.0); nothing to compare"
  exit 0
fi
echo "buf breaking: comparing proto/ against $tag"
$RUN buf breaking proto --against ".git#tag=${tag},subdir=proto"
