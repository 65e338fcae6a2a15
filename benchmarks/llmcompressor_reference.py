"""Reference compressed-tensors outputs from llm-compressor, to compare gemmaquant's against.

Runs ONLY in a separate venv (llm-compressor is not a gemmaquant dependency):

    python3 -m venv /tmp/llmc && /tmp/llmc/bin/pip install torch==2.13.0 llmcompressor
    # the calibration batches gemmaquant itself uses (same token ids, BOS first), from the project venv:
    .venv/bin/python -c "import json; from gemmaquant.formats.demo import ensure_demo_checkpoint as e; \
      from gemmaquant.calib.data import calibration_batches as cb, load_tokenizer_for as lt; d = e(); \
      json.dump(cb(lt(d), None, 32, 512).tolist(), open('/tmp/cmp/calib_32x512.json', 'w'))"
    /tmp/llmc/bin/python benchmarks/llmcompressor_reference.py ~/.cache/gemmaquant/gemma-3-270m \
        /tmp/cmp/calib_32x512.json /tmp/cmp [fp8_dynamic fp8_static w8a8_rtn w8a8_sq w8a16_rtn w4a16_rtn w4a16_asym_rtn
        w4a16_gptq w4a16_awq]

Writes OUT/llmc-NAME per recipe. Calibration text is gemmaquant's default (default_calib.txt), never the
eval text. Tested with llmcompressor 0.14.0.1, compressed-tensors 0.19.0, transformers 5.17.0, torch 2.13.0+cpu.

Calibration runs in float32 (LLMC_DTYPE=bfloat16 to change): on a CPU without AVX512-BF16 a bf16 matmul
runs ~7x slower than fp32 (5.7 vs 41 GFLOPS for 512x640 @ 640x2048 on one Zen 3 core), which made the
sequential pipeline take ~2.5 min per decoder layer for GPTQ. The model is cast to bf16 before saving, so
the non-quantized tensors and the scales are bf16 as in a bf16 run; the scales are then rounded to bf16
after the integers were chosen (<= 2^-9 relative, far below a 4- or 8-bit step).

llm-compressor 0.14's SmoothQuant mappings for Gemma2/Gemma3 are the Llama ones (utils.py,
DEFAULT_SMOOTHQUANT_MAPPINGS): the MLP's smoothing goes into `post_attention_layernorm`, which on Gemma is
the sandwich norm on the attention *output*, not the MLP input (that is `pre_feedforward_layernorm`); and
the norm weight is divided as if the norm were `x * w`, while Gemma's is `x * (1 + w)`. So `w8a8_sq`
is not an identity transform on Gemma: it is kept as a reference for what the stock tool does.
"""

import json
import os
import sys
import time
from pathlib import Path


def recipes():
    from llmcompressor.modifiers.awq import AWQModifier
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

    def q(scheme):
        return QuantizationModifier(targets="Linear", scheme=scheme, ignore=["lm_head"])

    return {
        "fp8_dynamic": [q("FP8_DYNAMIC")],
        "fp8_static": [q("FP8")],  # per-tensor weight scale, static per-tensor input scale from the data
        "w8a8_rtn": [q("W8A8")],  # plain round-to-nearest INT8 weights, dynamic per-token INT8 inputs
        "w8a8_sq": [SmoothQuantModifier(smoothing_strength=0.8), q("W8A8")],  # alpha as gemmaquant's default
        "w8a16_rtn": [q("W8A16")],
        "w4a16_rtn": [q("W4A16")],
        "w4a16_asym_rtn": [q("W4A16_ASYM")],
        "w4a16_gptq": [GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])],
        # AWQ has Gemma3 mappings of its own (awq/mappings.py, pre_feedforward_layernorm for the MLP)
        "w4a16_awq": [AWQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])],
    }


NEEDS_DATA = {"fp8_static", "w8a8_rtn", "w8a8_sq", "w4a16_gptq", "w4a16_awq"}  # W8A8's observers also run on the data


def main():
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, calib_json, out_root = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    table = recipes()
    which = sys.argv[4:] or list(table)
    dtype = getattr(torch, os.environ.get("LLMC_DTYPE", "float32"))
    ids = json.load(open(calib_json))  # [n_samples][seq_len] token ids
    ds = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]})
    for name in which:
        t = time.time()
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(model_dir)
        kw = {}
        if name in NEEDS_DATA:
            kw = dict(dataset=ds, num_calibration_samples=len(ids), max_seq_length=len(ids[0]))
        oneshot(model=model, recipe=table[name], **kw)
        out = out_root / f"llmc-{name}"
        model.to(torch.bfloat16)  # floating tensors only; integer zero points keep their dtype
        model.save_pretrained(out, save_compressed=True)
        tok.save_pretrained(out)
        print(f"{name}: {time.time() - t:.1f} s -> {out}", flush=True)


if __name__ == "__main__":
    main()
