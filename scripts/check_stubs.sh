#!/usr/bin/env bash
# Generate C++ code for every proto under proto/ (the vendored google/rpc files included) with
# protoc and compile each .pb.cc to an object against the installed protobuf headers. This
# proves that the module alone builds in a language other than Python, with stock tooling.
# Everything is written to a temporary directory; the repository is never touched.
set -euo pipefail
cd "$(dirname "$0")/../proto"

CXX=${CXX:-g++}
JOBS=${JOBS:-$(nproc 2>/dev/null || echo 2)}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

mapfile -t protos < <(find . -name '*.proto' -printf '%P\n' | LC_ALL=C sort)
if ((${#protos[@]} == 0)); then
  echo "check-stubs: no .proto files under proto/" >&2
  exit 1
fi
start=$SECONDS
protoc -I . --cpp_out="$out" "${protos[@]}"
mapfile -t sources < <(cd "$out" && find . -name '*.pb.cc' -printf '%P\n' | LC_ALL=C sort)
if ((${#sources[@]} != ${#protos[@]})); then
  echo "check-stubs: protoc wrote ${#sources[@]} .pb.cc files for ${#protos[@]} protos" >&2
  exit 1
fi
flags=(-std=c++17 -O0 -Wall -Werror -I"$out")
# Parsing the protobuf runtime headers is most of each compile: precompile the ones the stubs
# include, once, and let every compile start from that (the stubs still include them themselves).
find "$out" \( -name '*.pb.h' -o -name '*.pb.cc' \) -exec grep -h '^#include <google/protobuf/.*\.h>' {} + \
  | sed 's|[[:space:]]*//.*||' | LC_ALL=C sort -u >"$out/stubs_pch.h"
"$CXX" "${flags[@]}" -x c++-header "$out/stubs_pch.h" -o "$out/stubs_pch.h.gch"
# One compiler per core; xargs exits non-zero when any compile fails, after printing its errors.
printf '%s\n' "${sources[@]}" \
  | (cd "$out" && xargs -P "$JOBS" -I{} \
    "$CXX" "${flags[@]}" -Winvalid-pch -include "$out/stubs_pch.h" -c {} -o {}.o)
objects=$(find "$out" -name '*.pb.cc.o' | wc -l)
if ((objects != ${#sources[@]})); then
  echo "check-stubs: compiled $objects objects for ${#sources[@]} sources" >&2
  exit 1
fi
echo "check-stubs: $(protoc --version) generated and $("$CXX" -dumpfullversion -dumpversion) compiled" \
  "${#sources[@]} C++ stubs in $((SECONDS - start)) s ($JOBS jobs)"
