#!/usr/bin/env bash
# `qlora-bench linear` runs its harness on the CPU (one small shape, --quick): the table and the
# JSON carry every row with positive timings, and bad usage is refused with exit code 1.
# Needs coreutils, grep and awk (jq is used when present).
set -euo pipefail

# shellcheck source=tests/lib_cli.sh
source "$(dirname "$0")/lib_cli.sh"
bench="$bin/qlora-bench"

"$bench" linear --help >"$work/help.txt" || fail "--help exited $?"
grep -q "usage: qlora-bench linear" "$work/help.txt" || fail "--help lacks the usage line"

"$bench" linear --backend cpu --quick --iters 1 >"$work/table.txt" 2>"$work/err.txt" ||
    fail "the CPU run exited $?: $(cat "$work/err.txt")"
rows=$(grep -c '^cpu ' "$work/table.txt" || true)
[ "$rows" -eq 2 ] || fail "expected 2 CPU rows (M = 1, 33), got $rows: $(cat "$work/table.txt")"
# columns: where shape M fwd base ratio train base ratio bound GB/s TFLOP/s; every time > 0 and
# the bytes bound of NF4 + double quant (blocksize 64) vs BF16 is 16 / 4.127 = 3.88
awk '/^cpu / { for (i = 4; i <= 9; i++) if ($i + 0 <= 0) exit 1; if ($10 != "3.88") exit 1 }' "$work/table.txt" ||
    fail "a timing is not positive or the bound is not 3.88: $(cat "$work/table.txt")"

"$bench" linear --backend cpu --quick --iters 1 --json >"$work/out.json" 2>"$work/err.txt" ||
    fail "the JSON run exited $?: $(cat "$work/err.txt")"
[ "$(grep -c '"backend": "cpu"' "$work/out.json")" -eq 2 ] || fail "the JSON lacks its 2 rows: $(cat "$work/out.json")"
if command -v jq >/dev/null; then
    jq -e '(.results | length) == 2 and all(.results[]; .fwd_ms > 0 and .base_train_ms > 0 and .m >= 1)' \
        "$work/out.json" >/dev/null || fail "jq: the JSON is not as expected: $(cat "$work/out.json")"
fi

rc=0
"$bench" linear --iters 0 >/dev/null 2>"$work/err.txt" || rc=$?
[ "$rc" -eq 1 ] && grep -q -- "--iters" "$work/err.txt" || fail "--iters 0: exit $rc, $(cat "$work/err.txt")"
rc=0
"$bench" linear --backend tpu >/dev/null 2>"$work/err.txt" || rc=$?
[ "$rc" -eq 1 ] && grep -q "cpu, cuda or all" "$work/err.txt" || fail "--backend tpu: exit $rc"
rc=0
"$bench" linear --frobnicate >/dev/null 2>"$work/err.txt" || rc=$?
[ "$rc" -eq 1 ] || fail "an unknown option exited $rc"
echo "cli_bench_linear: ok"
