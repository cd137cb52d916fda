#!/usr/bin/env bash
# `qlora-bench model` runs its harness on the CPU with two tiny models and one timed run: the
# table and the JSON carry every row with positive numbers, FLOPs = 6 * P * T with P the exact
# linear parameter count, the JSON's derived fields agree with its measured ones (ratio = dense
# ms / step ms, tokens/s), the temp model directories are removed, and bad usage is refused
# with exit code 1.
# Needs coreutils, grep and awk (jq is used when present).
set -euo pipefail

# shellcheck source=tests/lib_cli.sh
source "$(dirname "$0")/lib_cli.sh"
bench="$bin/qlora-bench"
tiny=(--backend cpu --sizes 64,128 --layers 2 --vocab 256 --iters 1)
export TMPDIR="$work/tmp"
mkdir "$TMPDIR"

"$bench" model --help >"$work/help.txt" || fail "--help exited $?"
grep -q "usage: qlora-bench model" "$work/help.txt" || fail "--help lacks the usage line"
"$bench" --help | grep -q "qlora-bench model" || fail "qlora-bench --help does not list the model subcommand"

"$bench" model "${tiny[@]}" --seq 32 >"$work/table.txt" 2>"$work/err.txt" ||
    fail "the CPU run exited $?: $(cat "$work/err.txt")"
grep -q "FLOPs = 6 \* P \* T" "$work/table.txt" || fail "the table does not say what it counts"
rows=$(grep -c '^cpu ' "$work/table.txt" || true)
[ "$rows" -eq 2 ] || fail "expected 2 CPU rows (hidden 64, 128), got $rows: $(cat "$work/table.txt")"
# columns: where hidden inter L rank T N P(M) step dense ratio tok/s GFLOP/s dense peak est ratio
awk '/^cpu / { for (i = 9; i <= 17; i++) if ($i + 0 <= 0) exit 1
               if ($6 != 32 || $4 != 2 || $7 != 1) exit 2
               rows++ }
     END { exit rows == 2 ? 0 : 3 }' "$work/table.txt" ||
    fail "a column is not positive or T, L, N are not as asked (awk exit $?): $(cat "$work/table.txt")"
grep -qE '^cpu +64 +256 ' "$work/table.txt" || fail "hidden 64 should have intermediate 256: $(cat "$work/table.txt")"

# two packed sequences of 16 tokens; hidden 64: P = 2 layers * (4 * 64 * 64 + 3 * 64 * 256) = 131072
"$bench" model "${tiny[@]}" --seq 16 --micro-batch 2 --json >"$work/out.json" 2>"$work/err.txt" ||
    fail "the JSON run exited $?: $(cat "$work/err.txt")"
[ "$(grep -c '"backend": "cpu"' "$work/out.json")" -eq 2 ] || fail "the JSON lacks its 2 rows: $(cat "$work/out.json")"
for key in step_ms tokens_per_s linear_flops model_gflops dense_gflops dense_ms ratio peak_bytes estimate_bytes \
    peak_over_estimate params_linear; do
    grep -q "\"$key\": " "$work/out.json" || fail "the JSON lacks $key"
done
grep -q '"hidden": 64, .*"params_linear": 131072, .*"linear_flops": 25165824,' "$work/out.json" ||
    fail "hidden 64: params_linear or linear_flops (6 * 131072 * 32) wrong: $(cat "$work/out.json")"
if command -v jq >/dev/null; then
    jq -e 'def near(a; b): (a - b | fabs) <= 1e-3 * (b | fabs) + 1e-4;
           (.results | length) == 2 and all(.results[];
             near(.ratio; .dense_ms / .step_ms) and near(.tokens_per_s; .tokens / .step_ms * 1000) and
             near(.ratio; .model_gflops / .dense_gflops) and
             .tokens == 32 and .seq == 16 and .micro_batch == 2 and .step_ms > 0 and .dense_ms > 0 and
             .ratio > 0 and .peak_bytes > 0 and .estimate_bytes > 0 and
             .peak_over_estimate > 0.5 and .peak_over_estimate < 2 and
             .linear_flops == 6 * .params_linear * .tokens)' "$work/out.json" >/dev/null ||
        fail "jq: the JSON is not as expected: $(cat "$work/out.json")"
fi
[ -z "$(ls -A "$TMPDIR")" ] || fail "temp files left behind: $(ls -A "$TMPDIR")"

rc=0
"$bench" model --iters 0 >/dev/null 2>"$work/err.txt" || rc=$?
[ "$rc" -eq 1 ] && grep -q -- "--iters" "$work/err.txt" || fail "--iters 0: exit $rc, $(cat "$work/err.txt")"
expect_exit 1 "cpu, cuda or all" "$bench" model --backend tpu
expect_exit 1 "not a multiple of 64" "$bench" model --sizes 64,100
expect_exit 1 "--seq" "$bench" model --seq 1
expect_exit 1 "needs a value" "$bench" model --layers
expect_exit 1 "unknown option" "$bench" model --frobnicate
echo "cli_bench_model: ok"
