"""Issue 21: where llama.cpp's 8-bit rounding of the activations costs a q6_k file its KL, and two exact
rewrites of the model that were tried against it (not adopted).

    python benchmarks/bench_act_rounding.py --model /tmp/offgrid [--text TEXT] [--chunks 4]
    python benchmarks/bench_act_rounding.py --model /tmp/offgrid --write-permuted OUT
    python benchmarks/bench_act_rounding.py --model /tmp/offgrid --write-smoothed OUT --alpha 0.5

llama.cpp's CPU backend rounds a quantized product's input to 8 bits in blocks of its weight type's
`vec_dot_type`: 32 values (Q8_0) for Q4_0..Q8_0 and IQ4_NL, 256 (Q8_K) for the K- and IQ-quants
(`gemmaquant.model.qlinear.ggml_act_quant`, bit-exact with libggml). The first command runs our float
model with only that rounding, group by group, and prints the KL from the float model on --text (chunks of
512 tokens, the second half of each scored, as llama-perplexity does), with q6_k's blocks (Q8_0 for the
640-column Linears and the LM head, Q8_K for o_proj and down_proj), and again with o_proj and down_proj
rounded in blocks of 32 (what Q8_0 or Q5_1 weights there would get). It also prints down_proj's part
with each FFN's hidden units permuted by the calibration statistic --write-permuted uses.

The rewrites leave the float model's function unchanged and write a checkpoint in the same layout (judge
it with llama.cpp: convert_hf_to_gguf.py --outtype f32, llama-quantize, llama-perplexity --kl-divergence
against the original model's base logits; RESULTS.md §11, ninth round):
* --write-permuted: each FFN's hidden units (gate/up rows, down columns) sorted by the largest |input| of
  down_proj on the calibration text, so that Q8_K's blocks of 256 group channels of like range;
* --write-smoothed: SmoothQuant's migration (s_j = max|x_j|^α / max|W_:,j|^(1−α), normalized to mean 1)
  folded exactly into v_proj rows / o_proj columns and up_proj rows / down_proj columns, in float32.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gemmaquant.calib.data import default_text, load_tokenizer_for
from gemmaquant.calib.imatrix import llama_chunks
from gemmaquant.formats.checkpoint import Checkpoint
from gemmaquant.model.loading import load_model
from gemmaquant.model.qlinear import ggml_act_quant
from gemmaquant.numerics.ggml.types import GGMLType as T

HERE = Path(__file__).resolve().parent
BLOCK_TYPE = {32: T.Q8_0, 256: T.Q6_K}  # a weight type whose products round in blocks of that size
Q6K_BLOCKS = {"q": 32, "k": 32, "v": 32, "o": 256, "gate": 32, "up": 32, "down": 256, "head": 32}
SUFFIX = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
          "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
GROUPS = {"q, k, v": ["q", "k", "v"], "o": ["o"], "gate, up": ["gate", "up"], "down": ["down"], "LM head": ["head"],
          "all": list(Q6K_BLOCKS)}


def windows(ck: Checkpoint, text: str, n: int, ctx: int = 512) -> torch.Tensor:
    tok = load_tokenizer_for(ck.path, rows=ck.config.vocab_size)
    return llama_chunks(tok.encode(text, add_bos=True, parse_special=False), ctx, ck.config.bos_token_id)[:n]


def round_hook(block: int, perm: torch.Tensor | None = None):
    def hook(_m, args):
        x = args[0].float()
        if perm is None:
            return (ggml_act_quant(x, BLOCK_TYPE[block]),)
        return (ggml_act_quant(x[..., perm], BLOCK_TYPE[block])[..., torch.argsort(perm)],)
    return hook


def logprobs_with(model, ids, blocks: dict[str, int], perms: list | None = None) -> list[torch.Tensor]:
    """Per window, the log-probabilities of its second half, with the named inputs rounded."""
    hooks = []
    for name, block in blocks.items():
        if name == "head":  # the final normed states, as the table's product rounds them
            hooks.append(model.model.norm.register_forward_hook(
                lambda _m, _a, y, b=block: ggml_act_quant(y.float(), BLOCK_TYPE[b])))
            continue
        for i, layer in enumerate(model.layers):
            p = perms[i] if perms is not None and name == "down" else None
            hooks.append(layer.get_submodule(SUFFIX[name]).register_forward_pre_hook(round_hook(block, p)))
    try:
        out = []
        with torch.no_grad():
            for w in ids:
                lp = model(w[None], logits_from=ids.shape[1] // 2)[0].double().log_softmax(-1)
                out.append(lp)
    finally:
        for h in hooks:
            h.remove()
    return out


def mean_kl(ref: list, got: list) -> float:
    return float(torch.stack([(a.exp() * (a - b)).sum(-1).mean() for a, b in zip(ref, got)]).mean())


def input_absmax(model, ids, suffix: str) -> list[torch.Tensor]:
    """Per layer, the largest |input| of each channel of `suffix` over the windows."""
    got: dict[int, torch.Tensor] = {}
    hooks = [layer.get_submodule(suffix).register_forward_pre_hook(
        lambda _m, a, i=i: got.__setitem__(i, torch.maximum(got.get(i, torch.zeros(a[0].shape[-1])),
                                                            a[0].reshape(-1, a[0].shape[-1]).abs().amax(0).float())))
             for i, layer in enumerate(model.layers)]
    with torch.no_grad():
        for w in ids:
            model(w[None], logits_from=ids.shape[1] - 1)
    for h in hooks:
        h.remove()
    return [got[i] for i in range(len(model.layers))]


def write_rewritten(src: Path, out: Path, tensors: dict[str, torch.Tensor]) -> None:
    out.mkdir(parents=True, exist_ok=False)
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copy(f, out / f.name)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="a Gemma 3 checkpoint with one model.safetensors")
    ap.add_argument("--text", type=Path, default=HERE / "heldout" / "gpl3_apache2.txt")
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--calib-windows", type=int, default=32, help="windows of 512 of the built-in text for statistics")
    ap.add_argument("--write-permuted", type=Path, metavar="OUT")
    ap.add_argument("--write-smoothed", type=Path, metavar="OUT")
    ap.add_argument("--alpha", type=float, default=0.5)
    args = ap.parse_args()

    ck = Checkpoint(args.model)
    model = load_model(ck)
    calib = windows(ck, default_text(), args.calib_windows)
    down_max = input_absmax(model, calib, SUFFIX["down"])
    perms = [torch.argsort(m) for m in down_max]
    if args.write_permuted or args.write_smoothed:
        sd = load_file(str(args.model / "model.safetensors"))
        n = ck.config.num_hidden_layers
        if args.write_permuted:
            for i in range(n):
                p, pre = perms[i], f"model.layers.{i}.mlp."
                sd[pre + "gate_proj.weight"] = sd[pre + "gate_proj.weight"][p].contiguous()
                sd[pre + "up_proj.weight"] = sd[pre + "up_proj.weight"][p].contiguous()
                sd[pre + "down_proj.weight"] = sd[pre + "down_proj.weight"][:, p].contiguous()
            write_rewritten(args.model, args.write_permuted, sd)
        else:
            o_max = input_absmax(model, calib, SUFFIX["o"])
            heads, kv, hd = ck.config.num_attention_heads, ck.config.num_key_value_heads, ck.config.head_dim
            g = heads // kv
            for i in range(n):
                pre = f"model.layers.{i}."
                for prod, cons, a in (("self_attn.v_proj", "self_attn.o_proj", o_max[i]),
                                      ("mlp.up_proj", "mlp.down_proj", down_max[i])):
                    W = sd[pre + cons + ".weight"].float()
                    w = W.abs().amax(0)
                    if cons.endswith("o_proj"):  # one scale per V channel, shared by its query heads
                        a, w = (v.reshape(kv, g, hd).amax(1).reshape(-1) for v in (a, w))
                    s = a.clamp(min=1e-5).pow(args.alpha) / w.clamp(min=1e-5).pow(1 - args.alpha)
                    s = s / s.mean()
                    sq = s.reshape(kv, 1, hd).expand(kv, g, hd).reshape(-1) if cons.endswith("o_proj") else s
                    sd[pre + prod + ".weight"] = (sd[pre + prod + ".weight"].float() / s[:, None]).contiguous()
                    sd[pre + cons + ".weight"] = (W * sq[None, :]).contiguous()
            write_rewritten(args.model, args.write_smoothed, sd)
        print(f"wrote {args.write_permuted or args.write_smoothed}")
        return

    ids = windows(ck, args.text.read_text(), args.chunks)
    ref = logprobs_with(model, ids, {})
    print(f"KL(float || float with llama.cpp's activation rounding) on {args.text.name}, {len(ids)} x {ids.shape[1]}"
          f" tokens, second halves\n")
    print("| inputs rounded | q6_k's blocks (o, down: 256) | o, down in blocks of 32 |")
    print("|---|---:|---:|")
    for label, names in GROUPS.items():
        k6 = mean_kl(ref, logprobs_with(model, ids, {n: Q6K_BLOCKS[n] for n in names}))
        k32 = mean_kl(ref, logprobs_with(model, ids, {n: 32 for n in names}))
        print(f"| {label} | {k6:.6f} | {k32:.6f} |", flush=True)
    kp = mean_kl(ref, logprobs_with(model, ids, {"down": 256}, perms))
    print(f"\ndown_proj in blocks of 256, FFN hidden units sorted by calibration max |input|: {kp:.6f}")


if __name__ == "__main__":
    main()
