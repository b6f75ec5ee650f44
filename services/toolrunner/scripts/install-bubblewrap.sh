#!/usr/bin/env bash
# Installs bubblewrap, the tool runner's preferred sandbox, when it is missing and we are root
# on a Debian-like system. Idempotent; does nothing (and succeeds) otherwise, because the runner
# falls back to its process sandbox and reports which one it uses.
set -euo pipefail
if command -v bwrap >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "bubblewrap is not installed; the tool runner will use its process sandbox" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -qq bubblewrap >/dev/null 2>&1 \
  || { apt-get update -qq >/dev/null && apt-get install -y -qq bubblewrap >/dev/null; }
