#!/usr/bin/env bash
# End-to-end test of qlora-quantize (and make-example-model): quantize a generated Llama-style
# model directory and a single file, check the summary, config.json and safetensors headers,
# dequantize back, shard, and check every failure mode: exit code, message, nothing left behind.
# Tensor values are compared by tests/test_tool_roundtrip.c; this script needs only coreutils.
set -euo pipefail

# shellcheck source=tests/lib_cli.sh
source "$(dirname "$0")/lib_cli.sh"
quantize="$bin/qlora-quantize"

# summary_value FILE LABEL: the text after "LABEL:" in a summary.
summary_value() {
    sed -n "s/^ *$2: *//p" "$1" | head -n1
}

# header FILE: the JSON header of a safetensors file.
header() {
    local n
    n=$(od -An -t u8 -N 8 "$1" | tr -d ' ')
    tail -c +9 "$1" | head -c "$n" || true # head stops early: tail may get SIGPIPE
}

# tensor_entry FILE NAME: the header entry of a tensor, spaces removed ('{"dtype":...}').
tensor_entry() {
    header "$1" | tr -d ' \n' | grep -oE "\"${2//./\\.}\":\\{[^}]*\\}" | sed 's/^[^{]*//' || true
}

# has TEXT ERE: TEXT matches the extended regex (no pipes into grep -q: with pipefail an early
# exit of grep would fail the writer with SIGPIPE).
has() {
    grep -qE -- "$2" <<<"$1"
}

# no_leftovers DIR: no temporary directory or file from a failed run.
no_leftovers() {
    local left
    left=$(find "$1" -maxdepth 2 \( -name '*.tmp*' -o -name '.*tmp*' \) -print)
    [ -z "$left" ] || fail "temporary files left behind: $left"
}

# ---------------------------------------------------------------- example model
"$bin/make-example-model" "$work/model" >/dev/null
[ -f "$work/model/config.json" ] && [ -f "$work/model/model.safetensors" ] || fail "example model not written"
printf '{"version": "1.0", "model": {}}\n' >"$work/model/tokenizer.json"
printf '{\n  "bos_token_id": 1\n}\n' >"$work/model/generation_config.json"
has "$(tensor_entry "$work/model/model.safetensors" model.layers.1.mlp.down_proj.weight)" \
    '^\{"dtype":"BF16","shape":\[256,688\],' || fail "example model: down_proj should be BF16 [256, 688]"

# ---------------------------------------------------------------- help, usage errors (exit 1)
has "$("$quantize" --help)" "Exit codes" || fail "--help does not document exit codes"
has "$("$quantize" --version)" "libqlora" || fail "--version"
expect_exit 1 "unknown option '--frobnicate'" "$quantize" "$work/model" "$work/x" --frobnicate
grep -qF -- "--help" "$work/err.txt" || fail "usage error lacks the --help hint"
expect_exit 1 "missing OUT" "$quantize" "$work/model"
expect_exit 1 "--type must be nf4 or fp4" "$quantize" "$work/model" "$work/x" --type int8
expect_exit 1 "--blocksize must be a power of two" "$quantize" "$work/model" "$work/x" --blocksize 100
expect_exit 1 "not a valid extended regex" "$quantize" "$work/model" "$work/x" --skip 'a('
expect_exit 1 "do not apply to --dequantize" "$quantize" "$work/model" "$work/x" --dequantize --type fp4
expect_exit 1 "--max-shard-size expects a size" "$quantize" "$work/model" "$work/x" --max-shard-size 12XB
[ ! -e "$work/x" ] || fail "a usage error created OUT"

# ---------------------------------------------------------------- quantize a directory
"$quantize" "$work/model" "$work/q" >"$work/q.txt" 2>"$work/q.err"
[ "$(summary_value "$work/q.txt" "bits per parameter" | cut -d' ' -f1)" = 4.127 ] ||
    fail "NF4+DQ bits per parameter: $(cat "$work/q.txt")"
[ "$(summary_value "$work/q.txt" "tensors quantized" | cut -d' ' -f1)" = 14 ] ||
    fail "expected 7 quantized weights per layer: $(cat "$work/q.txt")"
has "$(summary_value "$work/q.txt" "tensors copied")" "^7 \(of which 2 weights kept" ||
    fail "expected 7 copied tensors (2 kept by the skip list): $(cat "$work/q.txt")"
rel=$(summary_value "$work/q.txt" "relative RMS error")
awk -v e="$rel" 'BEGIN { exit !(e > 0.05 && e < 0.15) }' || fail "relative RMS error $rel out of range"
maxabs=$(summary_value "$work/q.txt" "max abs error")
awk -v e="$maxabs" 'BEGIN { exit !(e > 0 && e < 0.05) }' || fail "max abs error $maxabs out of range"
# Plain progress (stderr is not a terminal): one line per tensor with its action.
grep -q "^\[ 1/21\] keep lm_head.weight$" "$work/q.err" || fail "progress: $(cat "$work/q.err")"
grep -q "\] keep model.embed_tokens.weight$" "$work/q.err" || fail "embed_tokens not kept"
grep -q "\] quantize model.layers.1.mlp.down_proj.weight$" "$work/q.err" || fail "down_proj not quantized"
grep -q "\] copy model.norm.weight$" "$work/q.err" || fail "norm not copied"

# Output layout: bitsandbytes keys for weights, original bytes for the rest.
qf="$work/q/model.safetensors"
[ -f "$qf" ] && [ ! -e "$work/q/model.safetensors.index.json" ] || fail "unsharded output layout"
has "$(tensor_entry "$qf" model.layers.0.self_attn.q_proj.weight)" '"dtype":"U8","shape":\[32768,1\]' ||
    fail "q_proj codes entry: $(tensor_entry "$qf" model.layers.0.self_attn.q_proj.weight)"
for key in absmax quant_map nested_absmax nested_quant_map quant_state.bitsandbytes__nf4; do
    [ -n "$(tensor_entry "$qf" "model.layers.0.mlp.up_proj.weight.$key")" ] || fail "missing key weight.$key"
done
has "$(tensor_entry "$qf" model.layers.0.mlp.up_proj.weight.absmax)" '"dtype":"U8","shape":\[2752\]' ||
    fail "double-quant absmax should be U8 [688*256/64]"
has "$(tensor_entry "$qf" model.embed_tokens.weight)" '"dtype":"BF16","shape":\[512,256\]' || fail "embed_tokens"
has "$(tensor_entry "$qf" lm_head.weight)" '"dtype":"BF16","shape":\[512,256\]' || fail "lm_head"
[ -z "$(tensor_entry "$qf" lm_head.weight.absmax)" ] || fail "lm_head must not be quantized"
has "$(header "$qf" | tr -d ' ')" '"__metadata__":\{"format":"pt"\}' || fail "format metadata"

# config.json: the original text plus the quantization_config block transformers writes.
qc="$work/q/config.json"
for line in '"quant_method": "bitsandbytes"' '"load_in_4bit": true' '"_load_in_4bit": true' \
    '"load_in_8bit": false' '"bnb_4bit_quant_type": "nf4"' '"bnb_4bit_use_double_quant": true' \
    '"bnb_4bit_compute_dtype": "bfloat16"' '"bnb_4bit_quant_storage": "uint8"' '"llm_int8_skip_modules": null' \
    '"llm_int8_threshold": 6.0' '"rope_theta": 10000.0' '"rms_norm_eps": 1e-05'; do
    grep -qF "$line" "$qc" || fail "config.json lacks $line"
done
if command -v jq >/dev/null; then
    jq -e '.quantization_config.quant_method == "bitsandbytes" and .hidden_size == 256' "$qc" >/dev/null ||
        fail "config.json is not valid JSON or lost fields"
fi
cmp -s "$work/model/tokenizer.json" "$work/q/tokenizer.json" || fail "tokenizer.json not copied verbatim"
cmp -s "$work/model/generation_config.json" "$work/q/generation_config.json" || fail "generation_config.json"
no_leftovers "$work"

# ---------------------------------------------------------------- quiet, FP4, --skip, one file
"$quantize" --quiet "$work/model" "$work/q4" --type fp4 --blocksize 128 --no-double-quant \
    --skip 'down_proj' >"$work/q4.txt" 2>"$work/q4.err"
[ ! -s "$work/q4.err" ] || fail "--quiet printed to stderr: $(cat "$work/q4.err")"
[ "$(summary_value "$work/q4.txt" "bits per parameter" | cut -d' ' -f1)" = 4.250 ] ||
    fail "FP4 blocksize 128 float32 scales: 4 + 32/128 bits: $(cat "$work/q4.txt")"
[ "$(summary_value "$work/q4.txt" "tensors quantized" | cut -d' ' -f1)" = 12 ] || fail "--skip down_proj"
grep -qF '"bnb_4bit_quant_type": "fp4"' "$work/q4/config.json" || fail "fp4 config"
grep -qF '"bnb_4bit_use_double_quant": false' "$work/q4/config.json" || fail "no double quant config"
for module in lm_head model.embed_tokens model.layers.0.mlp.down_proj model.layers.1.mlp.down_proj; do
    grep -qF "\"$module\"" "$work/q4/config.json" || fail "llm_int8_skip_modules lacks $module"
done
has "$(tensor_entry "$work/q4/model.safetensors" model.layers.0.mlp.up_proj.weight.absmax)" \
    '"dtype":"F32","shape":\[1376\]' || fail "float32 absmax [688*256/128]"
[ -n "$(tensor_entry "$work/q4/model.safetensors" \
    model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__fp4)" ] || fail "fp4 quant_state key"
has "$(tensor_entry "$work/q4/model.safetensors" model.layers.0.mlp.down_proj.weight)" \
    '"dtype":"BF16","shape":\[256,688\]' || fail "--skip down_proj kept"

"$quantize" "$work/model/model.safetensors" "$work/q.safetensors" >"$work/qf.txt" 2>/dev/null
[ -f "$work/q.safetensors" ] || fail "single-file output"
[ "$(summary_value "$work/qf.txt" "tensors quantized" | cut -d' ' -f1)" = 14 ] || fail "single-file quantize"
[ "$(summary_value "$work/qf.txt" "relative RMS error")" = "$rel" ] || fail "file and directory runs differ"
cmp -s "$qf" "$work/q.safetensors" || fail "file and directory outputs differ"
expect_exit 2 "already" "$quantize" "$work/q" "$work/qq"
[ ! -e "$work/qq" ] || fail "quantizing a quantized model created OUT"

# ---------------------------------------------------------------- dequantize
"$quantize" --dequantize "$work/q" "$work/d" >"$work/d.txt" 2>/dev/null
[ "$(summary_value "$work/d.txt" "tensors dequantized" | cut -d' ' -f1)" = 14 ] || fail "dequantized count"
[ "$(summary_value "$work/d.txt" "keys dropped" | cut -d' ' -f1)" = 70 ] || fail "5 companion keys per weight"
cmp -s "$work/model/config.json" "$work/d/config.json" ||
    fail "dequantized config.json differs from the original: $(diff "$work/model/config.json" "$work/d/config.json")"
cmp -s "$work/model/tokenizer.json" "$work/d/tokenizer.json" || fail "tokenizer.json after round trip"
orig="$work/model/model.safetensors" deq="$work/d/model.safetensors"
for name in model.layers.0.self_attn.q_proj.weight model.layers.1.mlp.down_proj.weight \
    model.embed_tokens.weight model.layers.0.input_layernorm.weight; do
    a=$(tensor_entry "$orig" "$name" | sed 's/,"data_offsets.*//')
    b=$(tensor_entry "$deq" "$name" | sed 's/,"data_offsets.*//')
    [ -n "$a" ] && [ "$a" = "$b" ] || fail "$name: dtype/shape '$b' after round trip, expected '$a'"
done
[ "$(header "$orig" | tr -d ' ' | grep -o '"dtype"' | wc -l)" = "$(header "$deq" | tr -d ' ' | grep -o '"dtype"' | wc -l)" ] ||
    fail "round trip changed the number of tensors"
expect_exit 2 "no bitsandbytes 4-bit weights" "$quantize" --dequantize "$work/model" "$work/dd"
# A one-line config gets a one-line block; the round trip restores it byte for byte.
mkdir "$work/compact"
cp "$work/model/model.safetensors" "$work/compact/"
printf '{"model_type":"llama","hidden_size":256}' >"$work/compact/config.json"
"$quantize" --quiet "$work/compact" "$work/compact_q" >/dev/null
[ "$(wc -l <"$work/compact_q/config.json")" -eq 0 ] || fail "a one-line config.json became multi-line"
has "$(cat "$work/compact_q/config.json")" '"hidden_size":256,"quantization_config": \{"_load_in_4bit": true, ' ||
    fail "compact config: $(cat "$work/compact_q/config.json")"
"$quantize" --quiet --dequantize "$work/compact_q" "$work/compact_d" >/dev/null
cmp -s "$work/compact/config.json" "$work/compact_d/config.json" || fail "compact config round trip"

# ---------------------------------------------------------------- sharded output and input
"$quantize" --quiet "$work/model" "$work/qs" --max-shard-size 400KB >/dev/null
[ -f "$work/qs/model.safetensors.index.json" ] || fail "no index for a sharded output"
[ ! -e "$work/qs/model.safetensors" ] || fail "sharded output also has model.safetensors"
nshards=$(ls "$work/qs" | grep -cE '^model-[0-9]{5}-of-[0-9]{5}\.safetensors$')
[ "$nshards" -ge 2 ] || fail "expected several shards, got $nshards"
grep -q '"weight_map"' "$work/qs/model.safetensors.index.json" || fail "index lacks weight_map"
grep -q '"total_size"' "$work/qs/model.safetensors.index.json" || fail "index lacks total_size"
cmp -s "$work/q/config.json" "$work/qs/config.json" || fail "sharding changed config.json"
# A sharded input is written sharded like it (largest input shard as the limit).
"$quantize" --quiet --dequantize "$work/qs" "$work/ds" >/dev/null
[ -f "$work/ds/model.safetensors.index.json" ] || fail "sharded input not written sharded"
cmp -s "$work/model/config.json" "$work/ds/config.json" || fail "sharded round trip config"
no_leftovers "$work"

# ---------------------------------------------------------------- input errors (exit 2)
expect_exit 2 "$work/missing" "$quantize" "$work/missing" "$work/x"
head -c 1000 "$work/model/model.safetensors" >"$work/truncated.safetensors"
expect_exit 2 "truncated.safetensors" "$quantize" "$work/truncated.safetensors" "$work/x.safetensors"
mkdir "$work/badmodel"
head -c 5000 "$work/model/model.safetensors" >"$work/badmodel/model.safetensors"
cp "$work/model/config.json" "$work/badmodel/"
expect_exit 2 "model.safetensors" "$quantize" "$work/badmodel" "$work/x"
mkdir "$work/badconfig"
cp "$work/model/model.safetensors" "$work/badconfig/"
printf '{"hidden_size": 256,, }' >"$work/badconfig/config.json"
expect_exit 2 "badconfig/config.json: not a valid JSON object" "$quantize" "$work/badconfig" "$work/x"
[ ! -e "$work/x" ] && [ ! -e "$work/x.safetensors" ] || fail "an input error left OUT behind"

# ---------------------------------------------------------------- output errors (exit 3)
mkdir "$work/exists"
expect_exit 3 "already exists" "$quantize" "$work/model" "$work/exists"
[ -z "$(ls -A "$work/exists")" ] || fail "an existing OUT was written into"
expect_exit 3 "already exists" "$quantize" "$work/model/model.safetensors" "$work/q.safetensors"
touch "$work/afile"
expect_exit 3 "afile/out" "$quantize" "$work/model" "$work/afile/out"
expect_exit 3 "afile/out.safetensors" "$quantize" "$work/model/model.safetensors" "$work/afile/out.safetensors"
if [ "$(id -u)" -ne 0 ]; then # root ignores directory permissions
    mkdir "$work/readonly" && chmod 555 "$work/readonly"
    expect_exit 3 "Permission denied" "$quantize" "$work/model" "$work/readonly/out"
    [ -z "$(ls -A "$work/readonly")" ] || fail "files left in a read-only directory"
fi
# A write that fails half way (file size limit): no OUT, no temp files.
mkdir "$work/limited"
for target in out out.safetensors; do
    src="$work/model"
    [ "$target" = out ] || src="$work/model/model.safetensors"
    rc=0
    (trap '' XFSZ; ulimit -f 600; exec "$quantize" --quiet "$src" "$work/limited/$target") \
        >/dev/null 2>"$work/err.txt" || rc=$?
    [ "$rc" -eq 3 ] || fail "failed write of $target exited $rc, expected 3: $(cat "$work/err.txt")"
    [ -z "$(ls -A "$work/limited")" ] || fail "failed write of $target left: $(ls -A "$work/limited")"
done
no_leftovers "$work"

echo "cli_quantize: all checks passed"
