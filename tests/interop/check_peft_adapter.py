"""Interop check, run by hand (not in CI: it needs torch, transformers, peft, bitsandbytes):
does PEFT, given a LoRA adapter written by qlora-ft, compute what libqlora computes?

    python3 tests/interop/check_peft_adapter.py MODEL_DIR ADAPTER_DIR --logits LOGITS.safetensors
            (--ids "1 2 3" | --text "some prompt") [--nf4] [--rms-tol 0.03] [--max-tol 0.12]

MODEL_DIR    the base model (HF directory, BF16), loaded with transformers (CPU, eager attention).
ADAPTER_DIR  adapter_config.json + adapter_model.safetensors as qlora-ft saves them, applied with
             PeftModel.from_pretrained. Every tensor of the file must land, unchanged, in a
             LoRA parameter of the model (this checks PEFT's key names), and every LoRA
             parameter must come from the file.
--nf4        replace each decoder linear weight by its bitsandbytes NF4 round trip (blocksize 64,
             double quant; tests/fixtures/make_model_fixture.py's nf4_round_trip), which is what
             libqlora computes with after quantizing while loading. Without it the comparison
             also contains the quantization error.
--ids/--text the prompt: token ids, or text encoded by MODEL_DIR's tokenizer (the ids used are
             printed: libqlora's dump must be of the same ids).
--logits     libqlora's logits for the prompt: a safetensors file with "logits" F32 [T, V].

Prints max |diff| and rms(diff), each divided by the RMS of PEFT's logits, and exits 1 when
either is above its tolerance. PEFT upcasts the adapters to float32 (autocast_adapter_dtype) and
runs the LoRA branch in float32 while libqlora rounds H = x·Aᵀ to BF16; both run BF16 activations.
The defaults, 3% RMS and 12% max, are what tests/test_model_train.c allows on its two-layer
models; deeper models accumulate more BF16 noise (raise them), a wrong key, transposed or
unscaled adapter shows up as tens of percent.
"""
import argparse
import os
import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures"))
from make_model_fixture import LINEARS, nf4_round_trip  # noqa: E402


def check_adapter_loaded(model, adapter_dir):
    """Every tensor of adapter_model.safetensors equals the LoRA parameter PEFT made of it, and no
    LoRA parameter was left at its initialization."""
    saved = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    params = {name: p for name, p in model.named_parameters() if ".lora_" in name}
    for key, value in saved.items():
        name = key.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight",
                                                                              ".lora_B.default.weight")
        if name not in params:
            sys.exit(f"{key}: no such LoRA parameter in the PEFT model")
        if not torch.equal(params.pop(name).detach().float(), value.float()):
            sys.exit(f"{key}: PEFT's parameter differs from the file")
    if params:
        sys.exit(f"{len(params)} LoRA parameters not in the file, e.g. {next(iter(params))}")
    dtypes = {str(p.dtype) for name, p in model.named_parameters() if ".lora_" in name}
    print(f"adapter: {len(saved)} tensors ({saved[next(iter(saved))].dtype} in the file, {', '.join(dtypes)} in PEFT)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("model_dir")
    ap.add_argument("adapter_dir")
    ap.add_argument("--logits", required=True, help="libqlora's logits: safetensors with 'logits' F32 [T, V]")
    prompt = ap.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--ids", help="token ids, space separated")
    prompt.add_argument("--text", help="text, encoded by the model's tokenizer")
    ap.add_argument("--nf4", action="store_true", help="NF4 round trip of the decoder linear weights")
    ap.add_argument("--rms-tol", type=float, default=0.03)
    ap.add_argument("--max-tol", type=float, default=0.12)
    args = ap.parse_args()
    torch.backends.mkldnn.enabled = False  # see make_model_fixture.py: AMX SIGILL, float32 accumulation

    if args.ids is not None:
        ids = [int(t) for t in args.ids.split()]
    else:
        ids = AutoTokenizer.from_pretrained(args.model_dir)(args.text).input_ids
    print("ids:", " ".join(map(str, ids)))

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.bfloat16, attn_implementation="eager")
    if args.nf4:
        with torch.no_grad():
            for name, module in model.named_modules():
                if name.split(".")[-1] in LINEARS:
                    module.weight.copy_(nf4_round_trip(module.weight.data))
    model = PeftModel.from_pretrained(model, args.adapter_dir).eval()
    check_adapter_loaded(model, args.adapter_dir)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].float()

    ours = load_file(args.logits)["logits"].float()
    if ours.shape != ref.shape:
        sys.exit(f"{args.logits}: logits {tuple(ours.shape)}, PEFT's {tuple(ref.shape)}")
    rms = ref.pow(2).mean().sqrt()
    diff = ours - ref
    max_rel, rms_rel = (diff.abs().max() / rms).item(), (diff.pow(2).mean().sqrt() / rms).item()
    same = (ours.argmax(-1) == ref.argmax(-1)).sum().item()
    print(f"logits vs PEFT: max {max_rel:.4f} rms {rms_rel:.4f} (of the logits' RMS), argmax {same}/{len(ids)}")
    ok = max_rel <= args.max_tol and rms_rel <= args.rms_tol
    print("OK" if ok else f"FAIL: tolerances max {args.max_tol}, rms {args.rms_tol}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
