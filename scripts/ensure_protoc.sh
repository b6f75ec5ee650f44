#!/usr/bin/env bash
# Make sure protoc and the protobuf C++ headers are on the machine: `make check-stubs` generates
# C++ from proto/ and compiles it against them. As root on Debian the packages are installed
# when missing; anywhere else a missing piece stops the build with what to install.
set -euo pipefail

CXX=${CXX:-g++}
PACKAGES=(protobuf-compiler libprotobuf-dev)

missing() {
  local what=()
  command -v protoc >/dev/null 2>&1 || what+=("protoc")
  if ! command -v "$CXX" >/dev/null 2>&1; then
    what+=("$CXX")
  elif ! echo '#include <google/protobuf/message.h>' | "$CXX" -x c++ -E - >/dev/null 2>&1; then
    what+=("protobuf C++ headers")
  fi
  if ((${#what[@]})); then
    local IFS=,
    echo "${what[*]}"
  fi
}

gaps=$(missing)
if [[ -z "$gaps" ]]; then
  exit 0
fi
if [[ "$(id -u)" -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
  echo "protoc toolchain: missing ${gaps//,/, }; installing ${PACKAGES[*]} with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  # A fresh machine may have no package lists yet; refresh them only when the install needs it.
  if ! apt-get install -y --no-install-recommends "${PACKAGES[@]}" >/dev/null 2>&1; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
  fi
  gaps=$(missing)
  if [[ -z "$gaps" ]]; then
    exit 0
  fi
fi
cat >&2 <<MSG
error: missing ${gaps//,/, }, needed to compile the generated C++ stubs.
Install them, for example on Debian or Ubuntu as root:
  apt-get install -y --no-install-recommends ${PACKAGES[*]} g++
(other systems: protoc plus the matching libprotobuf development headers and a C++17 compiler)
MSG
exit 1
