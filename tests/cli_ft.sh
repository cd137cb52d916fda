#!/usr/bin/env bash
# End-to-end tests of qlora-ft on the CPU: the embedded default run (loss falls, PEFT adapter
# and report written, metrics one JSON line per step), resume after SIGKILL ends with the same
# adapter bytes as an uninterrupted run, SIGINT saves a checkpoint, generate and merge on the
# result, and usage errors (exit 2) and bad data (exit 1, file:line).
set -euo pipefail
source "$(dirname "$0")/lib_cli.sh"
ft="$bin/qlora-ft"
# small and quick: 12 steps of 4 packed sequences of 64 tokens, 2 threads for fixed sums
short=(--steps 12 --batch 4 --micro-batch 2 --seq 64 --save-every 4 --eval-every 6 --threads 2)

# ---- a short default run
"$ft" --out "$work/a" --metrics "$work/a.jsonl" "${short[@]}" 2>"$work/a.log" || fail "default run: $(cat "$work/a.log")"
[ -f "$work/a/adapter/adapter_model.safetensors" ] || fail "no adapter written"
grep -q '"peft_type": *"LORA"' "$work/a/adapter/adapter_config.json" || fail "adapter_config.json lacks peft_type"
grep -q '"task_type": *"CAUSAL_LM"' "$work/a/adapter/adapter_config.json" || fail "adapter_config.json lacks task_type"
[ "$(wc -l <"$work/a.jsonl")" -eq 12 ] || fail "metrics: expected 12 lines, got $(wc -l <"$work/a.jsonl")"
for key in step loss lr grad_norm tokens_per_s mem_bytes; do
    grep -q "\"$key\": " "$work/a.jsonl" || fail "metrics lack $key"
done
[ "$(grep -c '"eval_loss"' "$work/a.jsonl")" -eq 2 ] || fail "expected eval_loss at steps 6 and 12"
first=$(head -n1 "$work/a.jsonl" | sed 's/.*"loss": \([0-9.]*\).*/\1/')
last=$(tail -n1 "$work/a.jsonl" | sed 's/.*"loss": \([0-9.]*\).*/\1/')
awk -v a="$first" -v b="$last" 'BEGIN { exit !(b < a - 0.3) }' || fail "loss did not fall: $first -> $last"
grep -q "16-bit full finetuning" "$work/a.log" || fail "no memory report: $(cat "$work/a.log")"
grep -q "<svg" "$work/a/loss.svg" || fail "no loss curve"
ls "$work/a/checkpoints" | grep -q step-00000012 || fail "no final checkpoint"
[ "$(ls "$work/a/checkpoints" | wc -l)" -le 2 ] || fail "old checkpoints were not pruned: $(ls "$work/a/checkpoints")"

# ---- SIGKILL mid-run, then --resume: the same adapter bytes
"$ft" --out "$work/b" "${short[@]}" 2>"$work/b.log" &
pid=$!
for _ in $(seq 600); do
    [ -f "$work/b/checkpoints/step-00000004/trainer_state.json" ] && break
    sleep 0.1
done
kill -9 "$pid" 2>/dev/null || true
wait "$pid" 2>/dev/null || true
[ -d "$work/b/checkpoints/step-00000004" ] || fail "no checkpoint before the kill: $(cat "$work/b.log")"
"$ft" --out "$work/b" "${short[@]}" --resume 2>"$work/b2.log" || fail "resume: $(cat "$work/b2.log")"
grep -q "resumed from" "$work/b2.log" || fail "resume did not resume: $(cat "$work/b2.log")"
cmp "$work/a/adapter/adapter_model.safetensors" "$work/b/adapter/adapter_model.safetensors" ||
    fail "resumed adapter differs from the uninterrupted run"
ls "$work/b" | grep -q '\.tmp\.' && fail "a temp directory was left behind"

# ---- SIGINT saves a checkpoint and exits 130
"$ft" --out "$work/c" "${short[@]}" --steps 400 --save-every 0 2>"$work/c.log" &
pid=$!
for _ in $(seq 600); do
    grep -q "step " "$work/c.log" 2>/dev/null && break
    sleep 0.1
done
kill -INT "$pid"
rc=0
wait "$pid" || rc=$?
[ "$rc" -eq 130 ] || fail "SIGINT: exit $rc, expected 130: $(cat "$work/c.log")"
ls "$work/c/checkpoints" | grep -q step- || fail "SIGINT saved no checkpoint"

# ---- generate with and without the adapter, merge
"$ft" generate --adapter "$work/a/adapter" --prompt "What is 3 plus 4?" --max-new 8 --temperature 0 \
    >"$work/g.txt" 2>"$work/g.log" || fail "generate: $(cat "$work/g.log")"
[ -s "$work/g.txt" ] || fail "generate printed nothing"
"$ft" merge --model "$work/a/base-model" --adapter "$work/a/adapter" --out "$work/merged" \
    >"$work/m.txt" 2>&1 || fail "merge: $(cat "$work/m.txt")"
[ -f "$work/merged/model.safetensors" ] && [ -f "$work/merged/tokenizer.json" ] || fail "merge wrote no model"

# ---- usage errors and bad data
expect_exit 2 "unknown option" "$ft" train --frobnicate
expect_exit 2 "--rank needs an integer" "$ft" --rank zero
expect_exit 2 "divisible" "$ft" --batch 6 --micro-batch 4
expect_exit 2 "both --model and --data" "$ft" train --model "$work/a/base-model"
expect_exit 2 "unknown command" "$ft" fly
expect_exit 2 "--prompt" "$ft" generate --adapter "$work/a/adapter"
printf '{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n' >"$work/bad.jsonl"
expect_exit 1 "bad.jsonl:2" "$ft" train --model "$work/a/base-model" --data "$work/bad.jsonl" --out "$work/d" --steps 1
expect_exit 1 "cannot create the output directory" "$ft" --out "$work/a.jsonl/sub" --steps 1
printf '{"instruction": "What is 1 plus 1?", "output": "2."}\nnot json\n' >"$work/skip.jsonl"
for _ in $(seq 20); do printf '{"instruction": "What is 1 plus 1?", "output": "1 plus 1 is 2."}\n' >>"$work/skip.jsonl"; done
"$ft" train --model "$work/a/base-model" --data "$work/skip.jsonl" --out "$work/e" --steps 1 --batch 1 --seq 64 \
    --rank 4 --skip-bad-lines 2>"$work/e.log" || fail "--skip-bad-lines: $(cat "$work/e.log")"
grep -q "skip.jsonl:2" "$work/e.log" || fail "skipped line not reported: $(cat "$work/e.log")"
"$ft" --help | grep -q "qlora-ft train" || fail "--help"
"$ft" train --help | grep -q -- "--micro-batch" || fail "train --help"
echo "cli_ft: ok"
