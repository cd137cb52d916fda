#!/usr/bin/env bash
# Installs a build into a temp prefix and checks what an embedding project sees: only qlora_*
# symbols exported, the header, find_package(qlora) and pkg-config both build a program.
set -euo pipefail
build=${1:-build}
src=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

cmake --install "$build" --prefix "$work/prefix" >/dev/null
lib=$(ls "$work"/prefix/lib*/libqlora.so | head -n1)

bad=$(nm -D --defined-only "$lib" | awk '$2 ~ /^[TDBRVW]$/ {print $3}' | grep -v '^qlora_' || true)
if [ -n "$bad" ]; then
  echo "install_check: libqlora.so exports symbols outside qlora_*:" >&2
  echo "$bad" | head -n 20 >&2
  exit 1
fi
echo "install_check: $(nm -D --defined-only "$lib" | grep -c ' T qlora_') qlora_* functions exported, nothing else"

cat > "$work/consumer.c" <<'C'
#include <qlora.h>
#include <stdio.h>
#include <string.h>
int main(void) {
    qlora_ctx *ctx = NULL;
    if (qlora_ctx_create(NULL, &ctx) != QLORA_OK) { fprintf(stderr, "%s\n", qlora_last_error()); return 1; }
    qlora_ctx_free(ctx);
    printf("libqlora %s\n", qlora_version_string());
    return strcmp(qlora_version_string(), QLORA_VERSION_STRING) != 0;
}
C
cat > "$work/CMakeLists.txt" <<'C'
cmake_minimum_required(VERSION 3.25)
project(consumer C)
find_package(qlora REQUIRED)
add_executable(consumer consumer.c)
target_link_libraries(consumer PRIVATE qlora::qlora)
C
cmake -S "$work" -B "$work/b" -DCMAKE_PREFIX_PATH="$work/prefix" >/dev/null
cmake --build "$work/b" >/dev/null
LD_LIBRARY_PATH="$(dirname "$lib")" "$work/b/consumer"

export PKG_CONFIG_PATH="$(dirname "$lib")/pkgconfig"
# shellcheck disable=SC2046
cc -o "$work/consumer_pc" "$work/consumer.c" $(pkg-config --cflags --libs qlora)
LD_LIBRARY_PATH="$(dirname "$lib")" "$work/consumer_pc"
echo "install_check: find_package(qlora) and pkg-config qlora both work"
