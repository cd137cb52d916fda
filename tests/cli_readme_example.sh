#!/usr/bin/env bash
# Keeps README.md true: extracts its C example, builds it against this build and runs it.
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
bin=${QLORA_BIN:?QLORA_BIN must point at build/bin}
libdir=$(cd "$bin/../lib" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
awk '/^```c$/ {on=1; next} /^```$/ {if (on) exit} on {print}' "$src/README.md" > "$work/example.c"
[ -s "$work/example.c" ] || { echo "README.md has no \`\`\`c block" >&2; exit 1; }
# shellcheck disable=SC2086
cc -std=c11 -Wall -Wextra -Werror ${QLORA_TEST_CFLAGS:-} -I"$src/include" "$work/example.c" -L"$libdir" -lqlora -o "$work/example"
out=$(LD_LIBRARY_PATH="$libdir" "$work/example")
echo "$out"
# 256*512 weights: 65536 code bytes + 2048 absmax bytes + 8 nested floats (32 bytes) = 67616.
grep -q "^67616 bytes for 131072 weights$" <<<"$out"
grep -q "^base weights: 65536 bytes, quant state: 2080 bytes$" <<<"$out"
echo "README example: ok"
