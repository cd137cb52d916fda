#!/usr/bin/env bash
# `qlora-bench adamw --quick` runs its harness (2^18 parameters in toy LoRA layers): the table and
# the JSON carry the step rows (cpu: F32 and BF16 gradients, master weights; cpu-reference) and
# the paging row with positive timings, byte counts and copy rates, the top-level --help lists
# the subcommand, and bad usage is refused with exit code 1. A CUDA build with a GPU adds cuda
# rows, which are checked the same way. Needs coreutils, grep and awk (jq is used when present).
set -euo pipefail

# shellcheck source=tests/lib_cli.sh
source "$(dirname "$0")/lib_cli.sh"
bench="$bin/qlora-bench"

"$bench" --help >"$work/top.txt" || fail "qlora-bench --help exited $?"
grep -q "qlora-bench adamw --help" "$work/top.txt" || fail "the top-level --help does not list adamw"
"$bench" adamw --help >"$work/help.txt" || fail "adamw --help exited $?"
grep -q "usage: qlora-bench adamw" "$work/help.txt" || fail "--help lacks the usage line"

# ---- the table
"$bench" adamw --quick --iters 1 >"$work/table.txt" 2>"$work/err.txt" ||
    fail "the quick run exited $?: $(cat "$work/err.txt")"
# step rows: backend grad master M-params ms GB/s copy-GB/s of-copy, all numbers > 0
steps() { awk -v b="$1" -v g="$2" -v m="$3" '$1 == b && $2 == g && $3 == m && NF == 8' "$work/table.txt"; }
for row in "cpu f32 no" "cpu bf16 no" "cpu f32 yes" "cpu-reference f32 no"; do
    # shellcheck disable=SC2086
    [ "$(steps $row | wc -l)" -eq 1 ] || fail "no single '$row' step row: $(cat "$work/table.txt")"
done
# (an awk `exit` in a rule still runs END, so failures set `bad`)
awk '($2 == "f32" || $2 == "bf16") && NF == 8 { n++; for (i = 4; i <= 8; i++) if ($i + 0 <= 0) bad = 1 }
     END { exit bad || n < 4 }' "$work/table.txt" ||
    fail "a step row has a number <= 0: $(cat "$work/table.txt")"
# paging rows: backend state limit page pool/total paged-ms extra-ms GB/step s/GB; the CPU pool is simulated
grep -q "SIMULATED device pool" "$work/table.txt" || fail "the table does not say the CPU pool is simulated"
awk '$5 ~ /^[0-9]+\/[0-9]+$/ && NF == 9 { n++; split($5, p, "/"); if (p[1] + 0 < 1 || p[1] + 0 >= p[2] + 0) bad = 1
         for (i = 2; i <= 9; i++) if (i != 5 && i != 7 && $i + 0 <= 0) bad = 1; if ($1 == "cpu") cpu = 1 }
     END { exit bad || n < 1 || !cpu }' "$work/table.txt" ||
    fail "the paging row is missing or has a number <= 0: $(cat "$work/table.txt")"

# ---- the JSON: one result per line
"$bench" adamw --quick --iters 1 --json >"$work/out.json" 2>"$work/err.txt" ||
    fail "the JSON run exited $?: $(cat "$work/err.txt")"
[ "$(head -c1 "$work/out.json")" = "{" ] && [ "$(tail -n1 "$work/out.json")" = "}" ] || fail "not one JSON object"
results=$(grep -c '"ms": ' "$work/out.json" || true)
[ "$results" -ge 4 ] || fail "expected >= 4 step results: $(cat "$work/out.json")"
for key in params tensors ms bytes gbps copy_ms copy_gbps fraction_of_copy; do
    awk -v k="\"$key\": " '/"ms": / { i = index($0, k); if (!i || substr($0, i + length(k)) + 0 <= 0) exit 1 }' \
        "$work/out.json" || fail "a step result lacks a positive \"$key\": $(cat "$work/out.json")"
done
grep -q '"backend": "cpu-reference", "grad": "F32"' "$work/out.json" || fail "no cpu-reference result"
grep -q '"backend": "cpu", "grad": "BF16", "master": false' "$work/out.json" || fail "no BF16-gradient result"
grep -q '"backend": "cpu", "grad": "F32", "master": true' "$work/out.json" || fail "no master-weights result"
grep -q '"backend": "cpu", "simulated_pool": true' "$work/out.json" || fail "no simulated CPU paging row"
for key in state_bytes gpu_mem_limit page_bytes pages_total pool_limit unpaged_ms paged_ms bytes_moved_per_step \
    seconds_per_gb; do
    awk -v k="\"$key\": " '/"paged_ms": / { n++; i = index($0, k)
            if (!i || substr($0, i + length(k)) + 0 <= 0) bad = 1 }
        END { exit bad || n < 1 }' "$work/out.json" ||
        fail "a paging row lacks a positive \"$key\": $(cat "$work/out.json")"
done
if command -v jq >/dev/null; then
    jq -e '(.results | length) >= 4 and all(.results[]; .ms > 0 and .gbps > 0 and .copy_gbps > 0)
           and (.paging | length) >= 1 and all(.paging[]; .pool_limit < .pages_total and .pool_limit >= 1
           and .seconds_per_gb > 0 and .gpu_mem_limit * 4 <= .state_bytes and (.extra_ms | type) == "number")' \
        "$work/out.json" >/dev/null || fail "jq: the JSON is not as expected: $(cat "$work/out.json")"
fi

# ---- bad usage
expect_exit 1 "--iters" "$bench" adamw --iters 0
expect_exit 1 "--params" "$bench" adamw --params 0
expect_exit 1 "needs a value" "$bench" adamw --params
expect_exit 1 "cpu, cuda or all" "$bench" adamw --backend tpu
expect_exit 1 "drop --params" "$bench" adamw --quick --params 4
expect_exit 1 "unknown argument" "$bench" adamw --frobnicate
echo "cli_bench_adamw: ok"
