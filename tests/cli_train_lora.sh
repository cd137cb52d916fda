#!/usr/bin/env bash
# End-to-end test of the train-lora example: the adapter learns the teacher's low-rank delta
# (final losses below 5% of the initial one), the optimizer state really was paged, the
# accountant's report lists the adapter and optimizer categories, --save writes the state, and
# bad arguments fail with a message. With a GPU the CUDA backend must converge the same way.
set -euo pipefail

bin=${QLORA_BIN:?QLORA_BIN must name the directory of the built programs}
train="$bin/train-lora"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

fail() {
    echo "cli_train_lora: FAIL: $*" >&2
    exit 1
}

# field FILE NAME: the value after NAME on every "step" line, one per line.
field() {
    awk -v key="$2" '$1 == "step" { for (i = 2; i < NF; i++) if ($i == key) print $(i + 1) }' "$1"
}

# check_run FILE: the assertions on one run's output.
check_run() {
    local out=$1 initial final_eval final_train
    initial=$(field "$out" eval_loss | head -n1)
    final_eval=$(field "$out" eval_loss | tail -n1)
    final_train=$(field "$out" loss | tail -n1)
    [ -n "$initial" ] && [ -n "$final_eval" ] && [ -n "$final_train" ] || fail "no loss lines in $(cat "$out")"
    [ "$(awk '$1 == "step" && $2 == 200' "$out" | wc -l)" -eq 1 ] || fail "no line for step 200"
    awk -v i="$initial" -v e="$final_eval" -v t="$final_train" \
        'BEGIN { exit !(i > 0 && e < 0.05 * i && t < 0.05 * i) }' ||
        fail "did not converge: initial $initial, final eval_loss $final_eval, final training loss $final_train"
    local ins
    ins=$(sed -n 's/^paging:.* page_ins \([0-9]*\) .*/\1/p' "$out")
    [ -n "$ins" ] && [ "$ins" -gt 0 ] || fail "no page_ins > 0 in: $(grep '^paging:' "$out" || true)"
    for cat in adapter_weights adapter_grads optimizer_device optimizer_host; do
        grep -q "^$cat " "$out" || fail "memory report lacks $cat"
    done
}

# ---------------------------------------------------------------- CPU: convergence, paging, --save
"$train" --steps 200 --save "$work/opt.safetensors" >"$work/cpu.txt" || fail "train-lora exited $?"
check_run "$work/cpu.txt"
[ -s "$work/opt.safetensors" ] || fail "--save wrote nothing"
for t in lora_A.default.weight.exp_avg lora_B.default.weight.exp_avg_sq; do
    grep -qa "layer.$t" "$work/opt.safetensors" || fail "saved state lacks layer.$t"
done

# ---------------------------------------------------------------- CUDA: converges, or fails cleanly
rc=0
"$train" --backend cuda --steps 200 >"$work/cuda.txt" 2>"$work/cuda.err" || rc=$?
if [ "$rc" -eq 0 ]; then
    check_run "$work/cuda.txt"
else
    [ "$rc" -eq 1 ] || fail "--backend cuda exited $rc"
    grep -q '^train-lora: creating the context: .' "$work/cuda.err" ||
        fail "--backend cuda failed without the library's message: $(cat "$work/cuda.err")"
fi

# ---------------------------------------------------------------- bad arguments
for args in "--steps 0" "--steps x" "--backend tpu" "--steps" "--bogus"; do
    rc=0
    # shellcheck disable=SC2086 # split on purpose
    "$train" $args >/dev/null 2>"$work/err.txt" || rc=$?
    [ "$rc" -eq 1 ] && [ -s "$work/err.txt" ] || fail "'train-lora $args' exited $rc with stderr '$(cat "$work/err.txt")'"
done
echo "cli_train_lora: ok"
