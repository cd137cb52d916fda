"""Interop check, run by hand (not in CI: it needs torch, transformers and bitsandbytes):

    python3 tests/interop/check_transformers_load.py BUILD/bin

1. qlora-quantize output loads in transformers + bitsandbytes (CPU) as Linear4bit layers, and
   bitsandbytes' dequantization of every layer equals `qlora-quantize --dequantize` bit for bit.
2. bitsandbytes' own quantize_4bit of the original weights gives the same bytes as ours.
3. A checkpoint saved by transformers (save_pretrained of a bnb 4-bit model) is read back by
   `qlora-quantize --dequantize` to the same weights bitsandbytes dequantizes.
Exits non-zero on the first mismatch.

The model uses hidden 384 (intermediate 1024): bitsandbytes 0.50's native CPU dequantize_4bit
kernel assumes the last dimension is a multiple of the blocksize (with 688 it returns wrong
values, ~25% relative error, for its own quantize_4bit output too), so every weight here has
rows that are whole blocks. Weights are also compared with bitsandbytes' generic torch path.
"""
import os
import subprocess
import sys
import tempfile

import bitsandbytes as bnb
import bitsandbytes.functional as F
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig


def run(*args):
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)


def linear4bit_weights(model):
    """{weight name: bitsandbytes-dequantized weight} for every Linear4bit of a model, from the
    native kernel and from bitsandbytes' generic torch implementation (which must agree)."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w, qs = module.weight, module.weight.quant_state
            native = F.dequantize_4bit(w.data, qs).to(qs.dtype)
            absmax = F.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset if qs.nested else qs.absmax
            generic = _dequantize_4bit_compute(w.data.view(torch.uint8).reshape(-1), absmax, qs.code,
                                               qs.blocksize, qs.shape, qs.dtype)
            assert torch.equal(native, generic), f"{name}: bitsandbytes native and generic paths differ"
            out[name + ".weight"] = native
    return out


def nibbles(packed):
    p = packed.view(torch.uint8).flatten()
    return torch.stack([p >> 4, p & 15], 1).flatten().long()


def compare_with_bnb_quantize(name, weight, ours_packed, code, quant_type, blocksize, double_quant):
    """bitsandbytes' quantize_4bit of the original weight gives our codes. NF4: every byte. FP4:
    the CPU backend differs from the CUDA rules we follow (spec nf4-bitsandbytes.md §1.4) in the
    sign of zero and at exact decision-threshold ties, so there the decoded values must agree
    except where x * (1/absmax) sits on a midpoint between the two candidates."""
    packed, _ = F.quantize_4bit(weight, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type)
    if quant_type == "nf4":
        assert torch.equal(packed.view(torch.uint8).flatten(), ours_packed.flatten()), \
            f"{name}: codes differ from bitsandbytes quantize_4bit"
        return 0
    theirs, ours = code[nibbles(packed)], code[nibbles(ours_packed)]
    x = weight.float().flatten()
    scale = 1.0 / x.view(-1, blocksize).abs().max(1).values
    v = x * scale.repeat_interleave(blocksize)[: x.numel()]
    differ = (theirs[: x.numel()] != ours[: x.numel()]).nonzero().flatten()
    midpoint = (theirs[differ] + ours[differ]) / 2
    assert torch.all((v[differ] - midpoint).abs() <= 1e-6), f"{name}: FP4 codes differ away from ties"
    return differ.numel()


def check_our_output_loads(bindir, work, quant_args, quant_type, double_quant, blocksize):
    q, dq = os.path.join(work, "q"), os.path.join(work, "dq")
    run(os.path.join(bindir, "qlora-quantize"), "--quiet", os.path.join(work, "model"), q, *quant_args)
    run(os.path.join(bindir, "qlora-quantize"), "--quiet", "--dequantize", q, dq)
    model = AutoModelForCausalLM.from_pretrained(q, device_map="cpu", dtype=torch.bfloat16)
    theirs = linear4bit_weights(model)
    ours = load_file(os.path.join(dq, "model.safetensors"))
    orig = load_file(os.path.join(work, "model", "model.safetensors"))
    stored = load_file(os.path.join(q, "model.safetensors"))
    assert len(theirs) == 14, f"expected 14 Linear4bit layers, got {len(theirs)}"
    for name, w in theirs.items():
        assert w.dtype == ours[name].dtype and w.shape == ours[name].shape, name
        assert torch.equal(w, ours[name]), f"{name}: bitsandbytes dequantizes our file differently"
        qs = model.get_submodule(name[: -len(".weight")]).weight.quant_state
        assert qs.quant_type == quant_type and qs.blocksize == blocksize and (qs.nested == double_quant), name
        compare_with_bnb_quantize(name, orig[name], stored[name], stored[name + ".quant_map"], quant_type,
                                  blocksize, double_quant)
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert torch.equal(model.state_dict()[name], orig[name]), f"{name} changed"
    print(f"ok: {quant_type} blocksize {blocksize} double_quant {double_quant}: transformers loads our "
          f"checkpoint; 14 layers dequantize bit-identically; codes equal bitsandbytes quantize_4bit"
          + (" (FP4: except at exact ties)" if quant_type == "fp4" else ""))
    return model


def check_transformers_output_reads(bindir, work):
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(os.path.join(work, "model"), device_map="cpu",
                                                 quantization_config=cfg, dtype=torch.bfloat16)
    saved, back = os.path.join(work, "hf_saved"), os.path.join(work, "hf_back")
    model.save_pretrained(saved)
    run(os.path.join(bindir, "qlora-quantize"), "--quiet", "--dequantize", saved, back)
    ours = load_file(os.path.join(back, "model.safetensors"))
    theirs = linear4bit_weights(model)
    assert len(theirs) == 14
    for name, w in theirs.items():
        assert torch.equal(w, ours[name]), f"{name}: our dequantization of a transformers checkpoint differs"
    print("ok: a transformers save_pretrained 4-bit checkpoint dequantizes to bitsandbytes' weights")


def main():
    bindir = sys.argv[1] if len(sys.argv) > 1 else "build/bin"
    torch.manual_seed(0)
    variants = [((), "nf4", True, 64),
                (("--type", "fp4", "--no-double-quant", "--blocksize", "128"), "fp4", False, 128)]
    for args, qt, dq, bs in variants:
        with tempfile.TemporaryDirectory() as work:
            run(os.path.join(bindir, "make-example-model"), os.path.join(work, "model"), "--seed", "7",
                "--hidden", "384")
            check_our_output_loads(bindir, work, args, qt, dq, bs)
    with tempfile.TemporaryDirectory() as work:
        run(os.path.join(bindir, "make-example-model"), os.path.join(work, "model"), "--seed", "8",
            "--hidden", "384")
        check_transformers_output_reads(bindir, work)


if __name__ == "__main__":
    main()
