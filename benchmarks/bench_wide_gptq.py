"""Error-feedback rounding on wide inputs (RESULTS.md §11, eleventh round): what one Linear costs, and
whether narrow inputs keep their bytes.

    python benchmarks/bench_wide_gptq.py refit 256 21504 Q4_K        # the refit's two ways of building its
                                                                     # normal equations, timed side by side
    python benchmarks/bench_wide_gptq.py losses 256 21504 Q4_K       # a wide input's row losses: float32
                                                                     # products against float64 ones
    python benchmarks/bench_wide_gptq.py trace 5376 21504 Q4_K       # each step of one optimize_layer_tensor:
                                                                     # seconds and memory (31B's down_proj shape)
    python benchmarks/bench_wide_gptq.py trace 5376 21504 Q4_K --threads 2   # the same on 2 threads, and the
                                                                     # sha256 of its bytes (equal on any count)
    python benchmarks/bench_wide_gptq.py hash /tmp/offgrid           # sha256 of layer 3's error-feedback bytes
                                                                     # (6 GGML types) and w4a16 GPTQ codes/scales

`hash` imports whatever gemmaquant PYTHONPATH gives: run it against two trees to compare their bytes.
Random weights and inputs (refit, trace) come from a fixed seed; one torch thread unless --threads.
"""

from __future__ import annotations

import argparse
import hashlib
import threading
import time

import torch


def _rss() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**30


def _problem(rows: int, n: int, tokens: int = 1024):
    g = torch.Generator().manual_seed(0)
    H = torch.zeros(n, n)
    for _ in range(tokens // 256):
        X = torch.randn(256, n, generator=g)
        H.addmm_(X.T, X)
    W = (torch.randn(rows, n, generator=g) * 0.02).bfloat16()
    return W, H, H.diagonal() / tokens


def refit(rows: int, n: int, types: list[str]) -> None:
    from gemmaquant.calib import ggml_refit, hessian
    from gemmaquant.calib.ggml_codes import pack_codes, sub_grid
    from gemmaquant.calib.ggml_gptq import gptq_codes, hessian_factor, llama_rounding
    from gemmaquant.numerics.ggml.types import GGMLType

    W, H, imat = _problem(rows, n)
    W = W.float()
    wide = hessian.WIDE
    for name in types:
        t = GGMLType[name.upper()]
        r = llama_rounding(W, t, imat)
        codes = gptq_codes(W, hessian_factor(H), r)
        data = pack_codes(r.data, t, codes)
        out = {}
        for label, limit in (("one product", 10**9), ("by block", wide)):
            hessian.WIDE = limit
            t0 = time.perf_counter()
            out[label] = ggml_refit.refit(W, H, data, t, codes)
            print(f"{t.name} {label}: {time.perf_counter() - t0:.1f} s", flush=True)
        hessian.WIDE = wide
        a, b = out.values()
        la = hessian.error_losses(W, sub_grid(a, t, rows).values(codes), H)
        lb = hessian.error_losses(W, sub_grid(b, t, rows).values(codes), H)
        print(f"  rows whose bytes differ: {int((a != b).any(1).sum())} of {rows}; "
              f"loss ratio {float(lb.sum() / la.sum()):.9f}", flush=True)


def losses(rows: int, n: int, name: str, tokens: int = 4096) -> None:
    """Row losses of llama.cpp's rounding error on a wide input, the float32 column-block products of
    `hessian.row_losses` against a float64 product of a float64 copy of H. The inputs have channel scales
    spread over e^±2 and a mean offset (activations are neither centred nor even)."""
    from gemmaquant.calib import hessian
    from gemmaquant.calib.ggml_gptq import llama_rounding
    from gemmaquant.numerics.ggml.types import GGMLType

    g = torch.Generator().manual_seed(0)
    scale = torch.exp(torch.randn(n, generator=g))
    H = torch.zeros(n, n)
    for _ in range(tokens // 512):
        X = (torch.randn(512, n, generator=g) + 0.5) * scale
        H.addmm_(X.T, X)
    W = (torch.randn(rows, n, generator=g) * 0.02).bfloat16().float()
    r = llama_rounding(W, GGMLType[name.upper()], H.diagonal() / tokens)
    D = W - r.grid.values(r.codes)
    t0 = time.perf_counter()
    Hd = H.double()
    want = ((D.double() @ Hd) * D.double()).sum(dim=1)
    t64 = time.perf_counter() - t0
    del Hd
    assert n > hessian.WIDE, f"n = {n} is not wide (> {hessian.WIDE}): both would be float64"
    t0 = time.perf_counter()
    got = hessian.row_losses(D, H)
    t32 = time.perf_counter() - t0
    rel = ((got - want) / want).abs()
    print(f"{rows} rows x {n}, {name}: float64 {t64:.1f} s (with the copy of H), float32 blocks {t32:.1f} s; "
          f"relative error of a row's loss: max {float(rel.max()):.2e}, median {float(rel.median()):.2e}; "
          f"of their sum {abs(float(got.sum() / want.sum()) - 1):.2e}")


def trace(rows: int, n: int, name: str, stop_after: str | None) -> None:
    import gemmaquant.calib.ggml_calibrate as gc
    import gemmaquant.calib.ggml_gptq as gg
    from gemmaquant.numerics.ggml.types import GGMLType

    peak, stage = [0.0, "setup"], ["setup"]

    def sample():
        while True:
            r = _rss()
            if r > peak[0]:
                peak[0], peak[1] = r, stage[0]
            time.sleep(0.05)

    threading.Thread(target=sample, daemon=True).start()
    W, H, imat = _problem(rows, n)
    base = _rss()
    print(f"setup: {base:.2f} GiB (W bf16 {W.numel() * 2 / 2**30:.2f}, H {H.numel() * 4 / 2**30:.2f})", flush=True)

    class Stop(Exception):
        pass

    for mod, fn in ((gc, "hessian_factor"), (gg, "llama_rounding"), (gg, "gptq_codes"), (gg, "pack_codes"),
                    (gg, "refit_with_losses"), (gg, "layer_loss"), (gc, "layer_loss")):
        orig = getattr(mod, fn)

        def wrap(*a, _o=orig, _n=fn, **k):
            prev, stage[0] = stage[0], _n
            t0 = time.perf_counter()
            try:
                return _o(*a, **k)
            finally:
                print(f"  {_n}: {time.perf_counter() - t0:.1f} s, now {_rss():.2f} GiB, peak so far "
                      f"{peak[0]:.2f} GiB (in {peak[1]})", flush=True)
                stage[0] = prev
                if _n == stop_after:
                    raise Stop

        setattr(mod, fn, wrap)
    t0 = time.perf_counter()
    try:
        data, *_ = gc.optimize_layer_tensor(W, H, GGMLType[name.upper()], imat)
        print("sha256", hashlib.sha256(data.numpy().tobytes()).hexdigest())
    except Stop:
        print(f"stopped after {stop_after}")
    print(f"{time.perf_counter() - t0:.0f} s on {torch.get_num_threads()} thread(s); peak {peak[0]:.2f} GiB (in {peak[1]}), {peak[0] - base:.2f} above setup")


def hash_bytes(model: str) -> None:
    from gemmaquant.calib.data import default_text, load_tokenizer_for
    from gemmaquant.calib.ggml_calibrate import imatrix_of, optimize_layer_tensor
    from gemmaquant.calib.gptq import gptq_quantize
    from gemmaquant.calib.imatrix import llama_chunks
    from gemmaquant.calib.stats import attach
    from gemmaquant.formats.checkpoint import Checkpoint
    from gemmaquant.model.loading import load_model
    from gemmaquant.numerics.ggml.types import GGMLType as T

    ck = Checkpoint(model)
    tok = load_tokenizer_for(ck.path, rows=ck.config.vocab_size)
    ids = llama_chunks(tok.encode(default_text(), add_bos=True, parse_special=False), 512, ck.config.bos_token_id)[:6]
    net = load_model(ck)
    layer = net.layers[3]
    stats, handles = attach(layer, "model.layers.3.", {"sum_sq", "xtx"})
    with torch.no_grad():
        net(ids, logits_from=ids.shape[1] - 1)
    for h in handles:
        h.remove()
    digest = hashlib.sha256()
    for sfx in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"):
        st = stats["model.layers.3." + sfx]
        W = layer.get_submodule(sfx).weight.detach()
        for t in (T.Q4_0, T.Q4_K, T.Q6_K, T.Q5_1, T.IQ4_NL, T.Q8_0):
            if W.shape[1] % 256 and t in (T.Q4_K, T.Q6_K):
                continue
            data, *_ = optimize_layer_tensor(W, st.xtx, t, imatrix_of(st.sum_sq, st.count))
            digest.update(data.numpy().tobytes())
        q = gptq_quantize(W, st.xtx, bits=4, group_size=128, damp=0.01, mse=True, refit=True)
        digest.update(q.codes.numpy().tobytes())
        digest.update(q.scale.float().numpy().tobytes())
    print("sha256", digest.hexdigest())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("refit")
    p.add_argument("rows", type=int)
    p.add_argument("n", type=int)
    p.add_argument("types", nargs="+")
    p = sub.add_parser("losses")
    p.add_argument("rows", type=int)
    p.add_argument("n", type=int)
    p.add_argument("type")
    p = sub.add_parser("trace")
    p.add_argument("rows", type=int)
    p.add_argument("n", type=int)
    p.add_argument("type")
    p.add_argument("--stop-after", help="a step name (e.g. pack_codes): stop the tensor there")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the wide steps run jobs on them)")
    p = sub.add_parser("hash")
    p.add_argument("model")
    a = ap.parse_args(argv)
    torch.set_num_threads(getattr(a, "threads", 1))
    if a.cmd == "refit":
        refit(a.rows, a.n, a.types)
    elif a.cmd == "losses":
        losses(a.rows, a.n, a.type)
    elif a.cmd == "trace":
        trace(a.rows, a.n, a.type, a.stop_after)
    else:
        hash_bytes(a.model)


if __name__ == "__main__":
    main()
