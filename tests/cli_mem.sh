#!/usr/bin/env bash
# End-to-end test of qlora-mem: the --json object's keys and the QLoRA paper's figures for
# llama-65b, the text table, --svg (a well-formed chart, written atomically), --fit, --model
# with config.json files, and every failure mode's exit code and message. Needs only bash,
# coreutils, grep, sed and awk (no jq, no python).
set -euo pipefail

# shellcheck source=tests/lib_cli.sh
source "$(dirname "$0")/lib_cli.sh"
mem="$bin/qlora-mem"

# json_keys FILE DEPTH: the keys at one nesting depth of cJSON_Print's output (one tab per level).
json_keys() {
    sed -n "s/^$(printf '\t%.0s' $(seq "$2"))\"\\([a-z_0-9]*\\)\":.*/\\1/p" "$1"
}

# json_member FILE OBJECT KEY: the value of KEY inside the top-level member OBJECT.
json_member() {
    sed -n "/^\t\"$2\":/,/^\t}/p" "$1" | sed -n "s/^\t\t\"$3\":\t*\\([^,]*\\),\\{0,1\\}$/\\1/p"
}

# ---------------------------------------------------------------- --json, llama-65b
"$mem" --preset llama-65b --json >"$work/65b.json" || fail "--json exited $?"
[ "$(head -c1 "$work/65b.json")" = "{" ] && [ "$(tail -n1 "$work/65b.json")" = "}" ] || fail "not one object"
[ "$(grep -c '^{' "$work/65b.json")" -eq 1 ] || fail "more than one JSON object"
top=$(json_keys "$work/65b.json" 1 | sort | tr '\n' ' ')
[ "$top" = "full_finetune_16bit lora_16bit model params_total qlora savings_vs_full_finetune settings " ] ||
    fail "top-level keys: $top"
grep -qE '^	"model":	"llama-65b",$' "$work/65b.json" || fail "model is not llama-65b"
params=$(sed -n 's/^\t"params_total":\t\([0-9]*\),$/\1/p' "$work/65b.json")
[ "$params" = 65285660672 ] || fail "params_total '$params'"
for regime in full_finetune_16bit lora_16bit qlora; do
    keys=$(sed -n "/^\t\"$regime\":/,/^\t}/p" "$work/65b.json" | sed -n 's/^\t\t"\([a-z]*\)":.*/\1/p' | sort |
        tr '\n' ' ')
    [ "$keys" = "activations gradients optimizer total trainable weights " ] || fail "$regime keys: $keys"
    sum=0
    for k in weights trainable gradients optimizer activations; do
        v=$(json_member "$work/65b.json" "$regime" "$k")
        [[ "$v" =~ ^[0-9]+$ ]] || fail "$regime.$k is not an integer: '$v'"
        sum=$((sum + v))
    done
    total=$(json_member "$work/65b.json" "$regime" total)
    [ "$sum" -eq "$total" ] || fail "$regime: components sum to $sum, total says $total"
done
full=$(json_member "$work/65b.json" full_finetune_16bit total)
qlora=$(json_member "$work/65b.json" qlora total)
[ "$full" -gt 780000000000 ] || fail "16-bit full finetuning of 65B: $full bytes, the paper says > 780 GB"
[ "$qlora" -lt 48000000000 ] || fail "QLoRA of 65B: $qlora bytes, the paper says < 48 GB"
savings=$(sed -n 's/^\t"savings_vs_full_finetune":\t\([0-9.]*\)$/\1/p' "$work/65b.json")
[ -n "$savings" ] || fail "no savings_vs_full_finetune number"
awk -v s="$savings" 'BEGIN { exit !(s > 14 && s < 20) }' || fail "saving $savings, expected about 16x"
seq_len=$(json_member "$work/65b.json" settings seq_len)
[ "$seq_len" = 512 ] || fail "settings.seq_len '$seq_len'"

# settings reach the estimate: a longer sequence costs more, a smaller rank less
"$mem" --preset llama-65b --json --seq 2048 --batch 2 >"$work/long.json"
[ "$(json_member "$work/long.json" qlora total)" -gt "$qlora" ] || fail "--seq 2048 --batch 2 did not grow"
"$mem" --preset llama-65b --json --rank 8 --targets attn --grad-checkpointing off >"$work/r8.json"
[ "$(json_member "$work/r8.json" qlora trainable)" -lt "$(json_member "$work/65b.json" qlora trainable)" ] ||
    fail "--rank 8 --targets attn did not shrink the adapters"
grep -qE '"grad_checkpointing":	false' "$work/r8.json" || fail "--grad-checkpointing off not in settings"

# ---------------------------------------------------------------- the text table
"$mem" --preset llama-65b >"$work/65b.txt"
for word in "16-bit full finetune" "16-bit LoRA" "QLoRA (NF4+DQ)" weights trainable gradients optimizer activations \
    total "QLoRA needs 17.3x less memory"; do
    grep -qF -- "$word" "$work/65b.txt" || fail "table lacks '$word'"
done

# ---------------------------------------------------------------- --svg
"$mem" --preset llama-7b --svg "$work/chart.svg" >/dev/null || fail "--svg exited $?"
svg="$work/chart.svg"
[ -s "$svg" ] || fail "no SVG written"
head -n1 "$svg" | grep -qF '<?xml version="1.0"' || fail "SVG lacks the XML declaration"
grep -qF '<svg xmlns="http://www.w3.org/2000/svg"' "$svg" || fail "no <svg> root"
[ "$(tail -n1 "$svg")" = "</svg>" ] || fail "SVG not closed"
[ "$(grep -o '<text' "$svg" | wc -l)" -eq "$(grep -o '</text>' "$svg" | wc -l)" ] || fail "unbalanced <text>"
[ "$(grep -c '<rect .*<title>' "$svg")" -ge 12 ] || fail "fewer bar segments than expected"
for word in "Training memory: llama-7b" "16-bit full finetune" "16-bit LoRA" "QLoRA (NF4+DQ)" "optimizer state" \
    "trainable params" "activations" "81.2 GB" "6.22 GB"; do
    grep -qF -- "$word" "$svg" || fail "SVG lacks '$word'"
done
if command -v xmllint >/dev/null; then
    xmllint --noout "$svg" || fail "xmllint rejects the SVG"
fi
# rewriting replaces the file whole and leaves no temporary behind
"$mem" --preset llama-65b --svg "$svg" --fit 48 >/dev/null
grep -qF "Training memory: llama-65b" "$svg" || fail "SVG not replaced"
grep -qF "48 GB GPU" "$svg" || fail "the --fit line is missing from the SVG"
[ -z "$(find "$work" -name '*.tmp-*')" ] || fail "temporary file left behind"
expect_exit 3 "cannot write" "$mem" --preset llama-7b --svg "$work/no/such/dir/chart.svg"
[ -z "$(find "$work" -name '*.tmp-*')" ] || fail "temporary file left behind after a failed write"

# ---------------------------------------------------------------- --fit
"$mem" --preset llama-65b --fit 48 >"$work/fit.txt"
grep -qF "your QLoRA settings: fit" "$work/fit.txt" || fail "65B QLoRA should fit 48 GB"
rows=$(grep -cE '^(8|16|64) +(on|off) +[0-9]+ ' "$work/fit.txt")
[ "$rows" -eq 24 ] || fail "--fit table has $rows rows, expected 24"
grep -qE ' paged' "$work/fit.txt" || fail "--fit shows no setting that fits with paging"
"$mem" --preset llama-65b --fit 24 >"$work/fit24.txt"
grep -qF "your QLoRA settings: do not fit" "$work/fit24.txt" || fail "65B QLoRA cannot fit 24 GB"

# ---------------------------------------------------------------- --model
mkdir "$work/model"
cat >"$work/model/config.json" <<'EOF'
{"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
 "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
 "num_key_value_heads": 8, "vocab_size": 32000, "rope_theta": 10000.0, "sliding_window": 4096}
EOF
"$mem" --model "$work/model" --json >"$work/model.json"
"$mem" --preset mistral-7b --json >"$work/mistral.json"
[ "$(json_member "$work/model.json" qlora total)" = "$(json_member "$work/mistral.json" qlora total)" ] ||
    fail "--model with Mistral's config differs from the mistral-7b preset"
"$mem" --model "$work/model/config.json" >/dev/null || fail "--model with a config.json path"
printf '{"hidden_size": 4096, "num_hidden_layers": 32}\n' >"$work/model/config.json"
expect_exit 2 "missing field 'intermediate_size'" "$mem" --model "$work/model"
grep -qF "$work/model/config.json" "$work/err.txt" || fail "error does not name the file"
printf '{"hidden_size": 4096,' >"$work/model/config.json"
expect_exit 2 "not valid JSON" "$mem" --model "$work/model"
expect_exit 2 "cannot read" "$mem" --model "$work/missing"

# ---------------------------------------------------------------- a small model: smaller units
# make-example-model's dimensions: about 20 MB in all, so every amount reads in MB or kB.
mkdir "$work/small"
cat >"$work/small/config.json" <<'EOF'
{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
 "intermediate_size": 688, "num_hidden_layers": 2, "num_attention_heads": 4,
 "num_key_value_heads": 4, "vocab_size": 512}
EOF
"$mem" --model "$work/small" --svg "$work/small.svg" >"$work/small.txt" || fail "small model exited $?"
! grep -qE '[0-9]\.[0-9]+ GB' "$work/small.txt" ||
    fail "small model shown in GB: $(grep -E '[0-9]\.[0-9]+ GB' "$work/small.txt")"
total_row=$(grep -E '^total ' "$work/small.txt")
[[ "$total_row" =~ ^total\ +([0-9]+\.[0-9]{2})\ MB\ +[0-9.]+\ MB\ +([0-9]+\.[0-9]{2})\ MB$ ]] ||
    fail "small model's total row is not in MB: '$total_row'"
full_mb=${BASH_REMATCH[1]} qlora_mb=${BASH_REMATCH[2]}
awk -v a="$full_mb" -v b="$qlora_mb" 'BEGIN { exit !(a >= 1 && a < 1000 && b >= 1 && b < a) }' ||
    fail "small model's totals out of range: '$total_row'"
# the table shows the JSON's exact bytes in MB
"$mem" --model "$work/small" --json >"$work/small.json"
json_total=$(json_member "$work/small.json" qlora total)
awk -v t="$json_total" -v b="$qlora_mb" 'BEGIN { exit !(sprintf("%.2f", t / 1e6) == b) }' ||
    fail "QLoRA total $json_total bytes shown as $qlora_mb MB"
grep -qE '^QLoRA weights: [1-9][0-9.]* kB NF4 codes \+ [0-9.]+ kB quantization state' "$work/small.txt" ||
    fail "small model's QLoRA weights line not in kB: $(grep '^QLoRA weights' "$work/small.txt")"
for word in "MB (10^6 bytes)" "component (MB)"; do
    grep -qF -- "$word" "$work/small.svg" || fail "small model's SVG lacks '$word'"
done
! grep -qE '[0-9]\.[0-9]+ GB' "$work/small.svg" || fail "small model's SVG shows GB"

# ---------------------------------------------------------------- failures
expect_exit 2 "unknown model preset 'llama-8b' (valid: llama-7b," "$mem" --preset llama-8b
grep -qF "qwen2.5-7b" "$work/err.txt" || fail "unknown preset does not list the valid ones"
expect_exit 1 "missing --model DIR or --preset NAME" "$mem"
expect_exit 1 "not both" "$mem" --preset llama-7b --model "$work/model"
expect_exit 1 "--seq expects a positive integer" "$mem" --preset llama-7b --seq 0
expect_exit 1 "--targets must be all-linear or attn" "$mem" --preset llama-7b --targets mlp
expect_exit 1 "--grad-checkpointing must be on or off" "$mem" --preset llama-7b --grad-checkpointing maybe
expect_exit 1 "cannot be combined with --json" "$mem" --preset llama-7b --json --fit 24
expect_exit 1 "--fit expects" "$mem" --preset llama-7b --fit -3
expect_exit 1 "unknown option '--frobnicate'" "$mem" --preset llama-7b --frobnicate
expect_exit 2 "seq_len" "$mem" --preset llama-7b --seq 99999999999
"$mem" --help | grep -qF "llama-3-70b" || fail "--help does not list the presets"

echo "cli_mem: OK"
