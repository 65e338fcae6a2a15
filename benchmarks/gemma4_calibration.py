"""Gemma 4 calibration rows for RESULTS.md §10: our importance matrix against llama-imatrix's, and the
calibrated W4 compressed-tensors schemes against round-to-nearest, on the tiny checkpoints of
tests/tiny_gemma4.py (saved by transformers).

    python benchmarks/gemma4_calibration.py LLAMA_IMATRIX [--chunks 8] [--ctx 64]
    python benchmarks/gemma4_calibration.py --moe        (the MoE table alone; no llama.cpp needed)

imatrix: each layout's bf16 checkpoint converted to F32 by convert_hf_to_gguf.py, run by LLAMA_IMATRIX
(a binary of the pinned llama.cpp) on --chunks × --ctx tokens of a random-word text; ours on the same
chunks (the tokenizations are checked equal). Per layout: entries, whether every count is equal (per
expert: how many (token, expert) routings differ, out of all), the worst max|Δ| / max|ref| over
tensors, the lowest Pearson r, and the experts that saw no token. W4 (group 16, in-sample KL to the float model on 6 of 16 × 32 calibration rows, the measure
of tests/calib/test_calib_gemma4.py): RTN, AWQ, GPTQ, AWQ+GPTQ on the dense and E2B-like layouts.
MoE (the 256-wide MoE-like layout: 16 experts, top 4, 4 layers): each calibrated compressed-tensors scheme
against its round-to-nearest counterpart (fp8-static against dynamic fp8), both written by the writer and
run by our `eval` model (static fp8 activation rounding included), in-sample KL to the float model on the
calibration rows (--moe-rows × --moe-len), the calibration time and how many experts saw tokens.
Needs the test dependencies and the llama.cpp sources tests/export/gguf/llamacpp_ref.py fetches.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gemmaquant.calib import CalibResult, calibrate  # noqa: E402
from gemmaquant.calib.data import load_tokenizer_for  # noqa: E402
from gemmaquant.calib.imatrix import compute_imatrix, llama_chunks  # noqa: E402
from gemmaquant.formats.checkpoint import Checkpoint  # noqa: E402
from gemmaquant.model.loading import load_model  # noqa: E402
from gemmaquant.numerics.ct.grid import rtn  # noqa: E402
from gemmaquant.schemes import QuantArgs, get_scheme  # noqa: E402
from tests.export.gguf import llamacpp_ref as ref  # noqa: E402
from tests.llamacpp import open_llama  # noqa: E402
from tests.tiny_gemma4 import make_tiny_gemma4  # noqa: E402

LAYOUTS = {"dense": "dense, 31B-like (k_eq_v)", "dense-kv": "dense, k_eq_v off",
           "e2b": "E2B-like (PLE, 4 of 7 layers KV-shared)", "moe": "MoE-like (16 experts, top 4)",
           "e2b-mm": "Gemma4ForConditionalGeneration (E2B-like)"}


def _read(path):
    import gguf

    r = gguf.GGUFReader(path)
    s, c = {}, {}
    for t in r.tensors:
        a = np.array(t.data, dtype=np.float64).reshape(-1)
        (s if t.name.endswith(".in_sum2") else c)[t.name.rsplit(".", 1)[0]] = a
    return s, c


def imatrix_rows(exe: str, root: Path, chunks: int, ctx: int) -> list[str]:
    dirs = {k: root / k for k in LAYOUTS}
    for k, d in dirs.items():
        make_tiny_gemma4(k, d, dtype=torch.bfloat16)
    f32 = dict(zip(dirs, ref.convert_many([(d, "f32") for d in dirs.values()])))
    rng = random.Random(1)
    text = root / "text.txt"
    text.write_text(" ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 6)))
                             for _ in range(chunks * ctx)))
    rows = ["| layout | entries | counts equal (dense; experts) | worst max\\|Δ\\|/max\\|ref\\| | min Pearson r | experts that saw no token |",
            "|---|---:|---|---:|---:|---|"]
    for k, d in dirs.items():
        theirs = root / f"{k}.llama.gguf"
        subprocess.run([exe, "-m", str(f32[k]), "-f", str(text), "-o", str(theirs), "-c", str(ctx), "-b", str(ctx),
                        "-ub", str(ctx), "--chunks", str(chunks), "-nr", "-t", "2", "--no-ppl"],
                       check=True, capture_output=True)
        words = text.read_text()
        ids = load_tokenizer_for(d).encode(words, add_bos=True, parse_special=False)
        assert list(ids) == open_llama(f32[k], vocab_only=True, verbose=False).tokenize(words.encode(), add_bos=True)
        ck = Checkpoint(d)
        ci = compute_imatrix(ck, ids=llama_chunks(list(ids), ctx, ck.config.bos_token_id, chunks), dataset=str(text))
        ci.save(root / f"{k}.ours.gguf")
        so, co = _read(root / f"{k}.ours.gguf")
        sr, cr = _read(theirs)
        assert sorted(so) == sorted(sr), (k, sorted(set(so) ^ set(sr)))
        dense = all(np.array_equal(co[n], cr[n]) for n in sr if cr[n].size == 1)
        exps = [n for n in sr if n.endswith("ffn_gate_up_exps.weight")]
        moved = sum(int(np.abs(co[n] - cr[n]).sum()) // 2 for n in exps)
        same = ("yes" if dense else "NO") + (f"; {moved} of {int(sum(cr[n].sum() for n in exps))} routings differ"
                                            if exps else "")
        err = max(np.abs(so[n] - sr[n]).max() / np.abs(sr[n]).max() for n in sr)
        r = min(np.corrcoef(so[n], sr[n])[0, 1] for n in sr)
        idle = sum(int((cr[n] == 0).sum()) for n in sr if n.endswith("ffn_gate_up_exps.weight"))
        n_exp = sum(cr[n].size for n in sr if n.endswith("ffn_gate_up_exps.weight"))
        rows.append(f"| {LAYOUTS[k]} | {len(sr)} | {same} | {err:.1e} | {r:.6f} | "
                    + (f"{idle} of {n_exp}" if n_exp else "–") + " |")
    return rows


def _kl(ref_logits, logits):
    return F.kl_div(F.log_softmax(logits, -1), F.log_softmax(ref_logits, -1), log_target=True,
                    reduction="batchmean").item()


def w4_rows(root: Path) -> list[str]:
    rows = ["| layout | RTN | AWQ | GPTQ | AWQ+GPTQ |", "|---|---:|---:|---:|---:|"]
    for k in ("dense", "e2b"):
        d = root / f"w4-{k}"
        make_tiny_gemma4(k, d, dtype=torch.bfloat16)
        ck = Checkpoint(d)
        cfg = ck.config
        names = [f"model.layers.{i}.{s}" for i in range(cfg.num_hidden_layers) for s in cfg.linear_shapes(i)]
        scheme = dataclasses.replace(get_scheme("w4a16"), weights=QuantArgs(4, "int", "group", group_size=16))
        ids = torch.randint(5, 260, (16, 32), generator=torch.Generator().manual_seed(0))
        ids[:, 0] = 2
        with torch.no_grad():
            base = load_model(ck)(ids[:6])

        def kl_of(res):
            m = load_model(ck)
            sd = {n + ".weight": q.dequantize() for n, q in res.quantized.items()}
            sd.update({n: t.float() for n, t in res.overrides.items()})
            m.load_state_dict(sd, strict=False)
            with torch.no_grad():
                return _kl(base, m(ids[:6]))

        r = CalibResult(quantized={n: rtn(ck.tensor(n + ".weight").float(), 4, 16, True) for n in names})
        kls = [kl_of(r)] + [kl_of(calibrate(ck, scheme, algorithm=a, ids=ids, awq_grid=20))
                            for a in ("awq", "gptq", "awq+gptq")]
        rows.append(f"| {LAYOUTS[k]} | " + " | ".join(f"{x:.4f}" for x in kls) + " |")
    return rows


MOE_SCHEMES = [("fp8-static", None, "fp8"), ("int8", "smoothquant", "int8"), ("w4a16", "gptq", "w4a16"),
               ("w4a16", "awq", "w4a16"), ("w4a16", "awq+gptq", "w4a16")]


def moe_rows(root: Path, rows: int, seq: int) -> list[str]:
    from gemmaquant.evaluate.artifact import open_artifact
    from gemmaquant.export.compressed_tensors import write_compressed_tensors

    d = root / "moe-256"
    make_tiny_gemma4("moe-256", d, dtype=torch.bfloat16)
    ck = Checkpoint(d)
    ids = torch.randint(5, 260, (rows, seq), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 2
    with torch.no_grad():
        base = load_model(ck)(ids)

    def kl_of(out: Path) -> float:
        with torch.no_grad():
            return _kl(base, open_artifact(str(out), torch.float32).model(ids))

    lines = ["| scheme (algorithm) | RTN KL | calibrated KL | calibrated / RTN | calibration s | experts that saw tokens |",
             "|---|---:|---:|---:|---:|---|"]
    for scheme, algorithm, plain in MOE_SCHEMES:
        sch = get_scheme(scheme)
        rtn_out = root / f"rtn-{plain}"
        if not rtn_out.exists():
            write_compressed_tensors(ck, get_scheme(plain), rtn_out)
        t0 = time.perf_counter()
        res = calibrate(ck, sch, algorithm=algorithm, ids=ids)
        secs = time.perf_counter() - t0
        out = root / f"cal-{scheme}-{algorithm}"
        write_compressed_tensors(ck, sch, out, quantized=res.packed(sch.ct_format) if res.quantized else None,
                                 overrides=res.overrides or None, input_scales=res.input_scales or None)
        a, b = kl_of(rtn_out), kl_of(out)
        counts = [n for c in res.expert_tokens.counts.values() for n in c]
        seen = f"{sum(n > 0 for n in counts)} of {len(counts)} (min {min(counts)}, max {max(counts)})"
        lines.append(f"| {scheme} ({algorithm or 'static scales'}) vs {plain} RTN | {a:.4f} | {b:.4f} | {b / a:.2f} | "
                     f"{secs:.1f} | {seen} |")
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("llama_imatrix", nargs="?")
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=64)
    ap.add_argument("--moe", action="store_true", help="the MoE table alone")
    ap.add_argument("--moe-rows", type=int, default=16)
    ap.add_argument("--moe-len", type=int, default=64)
    args = ap.parse_args()
    if not args.moe and not args.llama_imatrix:
        ap.error("LLAMA_IMATRIX is needed unless --moe")
    with tempfile.TemporaryDirectory() as tmp:
        if not args.moe:
            print("\n".join(imatrix_rows(args.llama_imatrix, Path(tmp), args.chunks, args.ctx)))
            print()
            print("\n".join(w4_rows(Path(tmp))))
            print()
        print("\n".join(moe_rows(Path(tmp), args.moe_rows, args.moe_len)))


if __name__ == "__main__":
    main()
