"""Multimodal Gemma 3 in each tensor-name layout transformers writes (gemmaquant/multimodal.py): the table
layout x {eval vs transformers, GGUF bytes vs converter, mmproj bytes vs converter, compressed-tensors load in
transformers, libmtmd image embeddings, vLLM load} of benchmarks/RESULTS.md.

    python benchmarks/bench_multimodal.py [--untied] [--vllm /path/to/vllm-venv/bin/python]

Tiny random checkpoints built and saved by transformers (tests/tiny_mm.py); llama.cpp's converter from the
pinned sources (tests/export/gguf/llamacpp_ref.py). The converter reads only layout A, so its mmproj reference for
B/C/D is its output on the same files with the tensors renamed to A; what it does on the raw layout is
reported too. vLLM runs only when given a Python with vLLM installed (never a gemmaquant dependency): it
loads the fp8 output, and its prompt log-probabilities and greedy tokens are compared with our forward pass on
the same file.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

PROMPT = [2, 17, 99, 150, 200, 31, 77, 140, 5, 250, 63, 118, 9, 201, 44, 180]
VLLM_CHILD = """
import json, sys
from vllm import LLM, SamplingParams
llm = LLM(model=sys.argv[1], dtype="float32", max_model_len=256, enforce_eager=True,
          limit_mm_per_prompt={"image": 0})
prompt = json.loads(sys.argv[2])
out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=8, temperature=0, prompt_logprobs=0))
lp = [next(iter(d[t].logprob for t in d if t == tok)) for d, tok in zip(out[0].prompt_logprobs[1:], prompt[1:])]
print(json.dumps({"arch": llm.llm_engine.model_config.architectures[0],
                  "tokens": list(out[0].outputs[0].token_ids), "prompt_logprobs": lp}))
"""


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def eval_vs_transformers(d: Path) -> float:
    import transformers

    from gemmaquant.formats.checkpoint import Checkpoint
    from gemmaquant.model.loading import load_model

    ids = torch.randint(4, 260, (1, 48), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 2
    hf = transformers.Gemma3ForConditionalGeneration.from_pretrained(d, dtype=torch.float32).eval()
    with torch.no_grad():
        return _rel(load_model(Checkpoint(d))(ids), hf(input_ids=ids).logits)


def converter_on_raw_layout(d: Path) -> str:
    """What convert_hf_to_gguf.py --mmproj itself does with this directory."""
    from tests.export.gguf import llamacpp_ref as ref

    try:
        out = ref.convert_mmproj(d, "f16")
    except AssertionError as e:
        return "fails: " + str(e).strip().splitlines()[-1][:60]
    n = len(ref.kv_and_tensors(out)[1])
    return f"{n} tensors" if n else "empty file (0 tensors)"


def gguf_checks(d: Path, ref_a: Path, work: Path) -> dict:
    from gemmaquant.formats.checkpoint import Checkpoint
    from gemmaquant.export.gguf.mmproj import OUTTYPES, write_mmproj
    from gemmaquant.export.gguf.writer import write_gguf
    from gemmaquant.schemes import get_scheme
    from tests.export.gguf import llamacpp_ref as ref

    text_ref = ref.convert(d, "bf16")
    ours = write_gguf(Checkpoint(d), "q8_0", work / "t.gguf", force=True).path
    want = ref.quantize(text_ref, work / "r.gguf", get_scheme("q8_0").ftype)
    same = {}
    for t in OUTTYPES:
        mine = write_mmproj(Checkpoint(d), t, work / f"mm-{t}.gguf", force=True).path
        same[t] = mine.read_bytes() == ref.convert_mmproj(ref_a, t).read_bytes()
    return {"text_q8_0_identical": ours.read_bytes() == want.read_bytes(), "mmproj_identical": same,
            "converter_raw": converter_on_raw_layout(d), "text_gguf": str(ours), "mmproj_f16": str(work / "mm-f16.gguf")}


def mtmd_delta(d: Path, text_gguf: str, mmproj: str) -> float:
    import transformers

    from tests.export.gguf.test_mmproj import _mtmd_image_embeddings

    rgb = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3)).astype(np.uint8)
    got = _mtmd_image_embeddings(text_gguf, mmproj, rgb)
    hf = transformers.Gemma3ForConditionalGeneration.from_pretrained(d, dtype=torch.float32).eval()
    x = (torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255.0 - 0.5) / 0.5
    with torch.no_grad():
        f = hf.model.get_image_features(pixel_values=x)
    f = getattr(f, "pooler_output", f).reshape(got.shape).numpy()
    return float(np.abs(got - f).max())


def ct_checks(d: Path, out: Path, scheme: str) -> dict:
    import transformers

    from gemmaquant.evaluate.artifact import open_artifact
    from gemmaquant.formats.checkpoint import Checkpoint
    from gemmaquant.export import write_compressed_tensors
    from gemmaquant.schemes import get_scheme

    from gemmaquant.errors import GemmaQuantError

    try:
        write_compressed_tensors(Checkpoint(d), get_scheme(scheme), out, progress=False, force=True)
    except GemmaQuantError as e:  # an untied head: vLLM's Gemma ties it, so the writer refuses
        return {"refused": str(e).split(": ", 1)[-1]}
    m, info = transformers.AutoModelForImageTextToText.from_pretrained(
        out, dtype=torch.float32, output_loading_info=True,
        quantization_config=transformers.CompressedTensorsConfig(dequantize=True))
    ids = torch.randint(4, 260, (1, 48), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 2
    with torch.no_grad():
        rel = _rel(open_artifact(str(out), torch.float32).model(ids), m(input_ids=ids).logits)
    return {"arch": type(m).__name__, "missing": len(info["missing_keys"]), "unexpected": len(info["unexpected_keys"]),
            "logits_rel_vs_ours": rel}


def vllm_check(python: str | None, out: Path) -> str:
    if not python:
        return "not run here"
    r = subprocess.run([python, "-c", VLLM_CHILD, str(out), json.dumps(PROMPT)], capture_output=True, text=True, timeout=1800,
                       env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
                            "PATH": "/usr/bin:/bin"})
    if r.returncode:
        return "fails: " + (r.stderr.strip().splitlines() or ["?"])[-1][:90]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    ours, lp = greedy_ours(out, PROMPT, len(got["tokens"]))
    same = "=" if got["tokens"] == ours else f"≠ ours {ours}"
    dlp = max(abs(a - b) for a, b in zip(got["prompt_logprobs"], lp))
    return (f"loads as {got['arch']}; greedy {got['tokens']} {same}; prompt log-probs max |Δ| vs ours "
            f"{dlp:.1e} ({len(lp)} tokens)")


def greedy_ours(out: Path, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and the prompt tokens' log-probabilities from our own forward pass on the written file
    (its W8A8 activations rounded per token as vLLM's dynamic FP8 does), for comparison with vLLM's."""
    from gemmaquant.evaluate.artifact import open_artifact

    model = open_artifact(str(out), torch.float32).model
    ids = torch.tensor([prompt])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids)[0, :-1].float(), -1).gather(1, ids[0, 1:, None])[:, 0].tolist()
        for _ in range(n):
            ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], dim=1)
    return ids[0, len(prompt):].tolist(), lp


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--untied", action="store_true", help="checkpoints with their own lm_head.weight")
    ap.add_argument("--vllm", help="a Python with vLLM installed, for the vLLM column")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()
    from tests.export.gguf.test_mmproj import _as_layout_a
    from tests.tiny_mm import LAYOUTS, make_tiny_mm

    root = Path(tempfile.mkdtemp(prefix="bench_mm_"))
    try:
        dirs = make_tiny_mm(root / "src", untied=a.untied)
        rows = {}
        for k in LAYOUTS:
            ref_a = dirs[k] if k == "A" else _as_layout_a(dirs[k], root / f"ref{k}")
            work = root / f"work{k}"
            work.mkdir()
            g = gguf_checks(dirs[k], ref_a, work)
            rows[k] = {"eval_rel": eval_vs_transformers(dirs[k]), **g,
                       "mtmd_max_abs": mtmd_delta(dirs[k], g["text_gguf"], g["mmproj_f16"]),
                       "ct": {s: ct_checks(dirs[k], work / f"ct-{s}", s) for s in ("w4a16", "fp8")},
                       "vllm": vllm_check(a.vllm, work / "ct-fp8") if (work / "ct-fp8").is_dir() else "n/a"}
        print("| layout | eval vs transformers (rel. Δ logits, f32) | text GGUF q8_0 vs converter + llama-quantize "
              "| mmproj vs converter (f32/f16/bf16/q8_0) | converter's own mmproj on this layout "
              "| libmtmd image embeddings vs transformers (max abs Δ) | compressed-tensors in transformers "
              "(w4a16: missing/unexpected keys, rel. Δ vs ours; fp8) | vLLM |")
        print("|---|---|---|---|---|---|---|---|")
        for k, r in rows.items():
            mm = "/".join("=" if v else "≠" for v in r["mmproj_identical"].values())
            w4, f8 = r["ct"]["w4a16"], r["ct"]["fp8"]
            ct = f"refused: {w4['refused']}" if "refused" in w4 else \
                f"{w4['arch']}, {w4['missing']}/{w4['unexpected']}, {w4['logits_rel_vs_ours']:.1e}; " \
                f"fp8 {f8['missing']}/{f8['unexpected']}"
            print(f"| {k} | {r['eval_rel']:.1e} | {'identical' if r['text_q8_0_identical'] else 'DIFFERS'} | {mm} "
                  f"| {r['converter_raw']} | {r['mtmd_max_abs']:.1e} | {ct} | {r['vllm']} |")
        if a.json:
            Path(a.json).write_text(json.dumps(rows, indent=2, default=str))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
