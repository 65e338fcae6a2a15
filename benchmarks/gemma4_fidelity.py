"""Gemma 4 fidelity rows for RESULTS.md: our forward pass against transformers, our GGUF files against
llama.cpp's converter + llama-quantize, per feature combination (the tiny checkpoints of
tests/tiny_gemma4.py, saved by transformers).

    python benchmarks/gemma4_fidelity.py [--no-gguf]

Prints markdown tables: max |Δlogit| / max |logit| and ‖Δ‖/‖ref‖ per combination (float32, eager
attention and experts, 2 × 24 tokens); llama.cpp running the converter's f32 file against our forward
pass (48 tokens, f32 and llama.cpp's default f16 K/V cache); per combination and preset whether our
GGUF is byte-identical, and llama.cpp's perplexity of it against our eval of it (8 chunks of 64). Needs the test dependencies (transformers, llama-cpp-python) and the llama.cpp sources
that tests/export/gguf/llamacpp_ref.py fetches.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gemmaquant.formats.checkpoint import Checkpoint  # noqa: E402
from gemmaquant.export.gguf.writer import write_gguf  # noqa: E402
from gemmaquant.model.loading import load_model  # noqa: E402
from gemmaquant.schemes import get_scheme  # noqa: E402
from tests.tiny_gemma4 import ALL, MEDIA_IDS, VOCAB, make_tiny_gemma4, reference_logits  # noqa: E402

WHAT = {"dense": "dense, 31B-like (k_eq_v, full-layer kv heads 1)", "dense-kv": "dense, k_eq_v off",
        "e2b": "E2B-like (PLE, 4 of 7 layers KV-shared, double-wide MLP)", "moe": "MoE-like (16 experts, top 4)",
        "e2b-mm": "Gemma4ForConditionalGeneration (E2B-like text + vision + audio)",
        "moe-256": "MoE-like, 256-wide (K-quants without fallback)", "e2b-256": "E2B-like, 256-wide"}

# the presets RESULTS §10 reports (issue 19); the imatrix-only presets need one: they are compared with
# llama-quantize given the same imatrix in tests/export/gguf/test_gemma4.py (RESULTS §10)
PRESETS = ("bf16", "f16", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q4_k_m", "q4_k_s", "q4_0")


def forward_rows(root: Path) -> None:
    print("| combination | max rel Δ (max-norm) | ‖Δ‖/‖ref‖ |\n|---|---:|---:|")
    for name in ALL:
        ref = make_tiny_gemma4(name, root / f"f32-{name}")
        ids = torch.randint(5, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
        ids = torch.where(torch.isin(ids, torch.tensor(MEDIA_IDS)), ids + 10, ids)
        want = reference_logits(ref, ids)
        got = load_model(Checkpoint(root / f"f32-{name}"), torch.float32)(ids)
        mx = ((got - want).abs().max() / want.abs().max()).item()
        l2 = ((got - want).norm() / want.norm()).item()
        print(f"| {WHAT[name]} | {mx:.1e} | {l2:.1e} |", flush=True)


def gguf_rows(root: Path) -> None:
    from tests.export.gguf import llamacpp_ref as ref

    kinds = ["dense", "dense-kv", "e2b", "moe", "e2b-mm", "moe-256", "e2b-256"]
    dirs = []
    for k in kinds:
        make_tiny_gemma4(k, root / f"tiny-gemma4-{k}", dtype=torch.bfloat16)
        dirs.append(root / f"tiny-gemma4-{k}")
    refs = ref.convert_many([(d, "bf16") for d in dirs])
    presets = list(PRESETS)
    print("\n| combination | " + " | ".join(presets) + " |\n|---|" + "---|" * len(presets))
    for k, d, r in zip(kinds, dirs, refs):
        cells = []
        for p in presets:
            want = ref.quantize(r, root / "ref.gguf", get_scheme(p).ftype).read_bytes()
            got = write_gguf(Checkpoint(d), p, root / "ours.gguf", force=True).path.read_bytes()
            cells.append("identical" if got == want else f"DIFFERENT ({len(got)} vs {len(want)} B)")
        print(f"| {WHAT[k]} | " + " | ".join(cells) + " |", flush=True)


def llama_rows(root: Path) -> None:
    import numpy as np

    from gemmaquant.evaluate.artifact import open_artifact
    from gemmaquant.evaluate.perplexity import chunk_tokens, perplexity
    from tests.export.gguf import llamacpp_ref as ref
    from tests.llamacpp import open_llama

    def logits(path, ids, **kw):
        llama = open_llama(path, n_ctx=64, n_batch=64, logits_all=True, n_threads=2, verbose=False, **kw)
        llama.reset()
        llama.eval(ids)
        return llama, torch.from_numpy(np.array(llama.scores[: len(ids)], dtype=np.float32))

    kinds = ["dense", "dense-kv", "e2b", "moe", "e2b-mm"]
    dirs = [root / f"tiny-gemma4-{k}" for k in kinds]
    f32 = ref.convert_many([(d, "f32") for d in dirs])
    ids = [2] + torch.randint(5, 261, (47,), generator=torch.Generator().manual_seed(3)).tolist()
    print("\n| combination | llama.cpp vs ours, f32 K/V: ‖Δ‖/‖ref‖, top-1 | default f16 K/V |\n|---|---:|---:|")
    for k, d, f in zip(kinds, dirs, f32):
        with torch.inference_mode():
            ours = load_model(Checkpoint(d), torch.float32)(torch.tensor([ids]))[0]
        cells = []
        for kw in (dict(type_k=0, type_v=0), {}):
            _, theirs = logits(f, ids, **kw)
            cells.append(f"{((ours - theirs).norm() / theirs.norm()).item():.1e}, "
                         f"{(ours.argmax(-1) == theirs.argmax(-1)).float().mean().item():.3f}")
        print(f"| {WHAT[k]} | " + " | ".join(cells) + " |", flush=True)
    chunks = chunk_tokens([2] + torch.randint(5, 261, (8 * 64,), generator=torch.Generator().manual_seed(3)).tolist(),
                          64, 2, 8)
    presets = list(PRESETS)
    print("\n| our file, ppl ours / llama.cpp − 1 | " + " | ".join(presets) + " |\n|---|" + "---:|" * len(presets))
    for k in ("dense", "e2b", "moe", "moe-256"):
        cells = []
        for p in presets:
            path = write_gguf(Checkpoint(root / f"tiny-gemma4-{k}"), p, root / "ppl.gguf", force=True).path
            art = open_artifact(str(path), torch.float32)
            llama = open_llama(path, n_ctx=64, n_batch=64, logits_all=True, n_threads=2, verbose=False,
                               type_k=0, type_v=0)

            def theirs(x, first, llama=llama):
                llama.reset()
                llama.eval(x[0].tolist())
                return torch.from_numpy(np.array(llama.scores[: x.shape[1]], dtype=np.float32))[None, first:]

            a = perplexity(lambda x, first, model=art.model: model(x, logits_from=first), chunks).ppl
            cells.append(f"{a / perplexity(theirs, chunks).ppl - 1:+.2%}")
            del llama, art
        print(f"| {WHAT[k]} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-gguf", action="store_true", help="only the forward-pass table")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        forward_rows(Path(tmp))
        if not args.no_gguf:
            gguf_rows(Path(tmp))
            llama_rows(Path(tmp))


if __name__ == "__main__":
    main()
