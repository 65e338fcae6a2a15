"""Write a compressed-tensors checkpoint that vLLM and transformers load (docs/vllm-formats.md).

Streaming: the layout of every output tensor (name, dtype, shape) follows from config.json and the
scheme alone, so the safetensors headers are written first and each tensor is then computed from
the memory-mapped source and written at its offset, one Linear at a time. Nothing holds the model.

    P.weight (bf16)  ->  float-quantized  P.weight f8_e4m3 [N,K], P.weight_scale [N,1] | [1], P.input_scale [1]
                         int-quantized    P.weight i8 [N,K], P.weight_scale [N,1]
                         pack-quantized   P.weight_packed i32 [N, K*b/32], P.weight_scale [N,G],
                                          P.weight_shape i64 [2], P.weight_zero_point i32 [N*b/32, G] (asym)
    embeddings, norms -> copied byte for byte;  lm_head.weight (tied) -> not written
    multimodal Gemma 3: the text tensors under `language_model.`, the vision tower and projector copied
    unquantized and ignored, all in layout A's names whatever the source's (multimodal.py)
    Gemma 4: names as the source spells them; the MoE experts (fused [E, 2I, H] / [E, H, I] in the source)
    become per-expert Linears `experts.{e}.{gate,up,down}_proj`, quantized one expert at a time; router,
    per-layer-input table/model projection, vision/audio towers and embedders stay unquantized (ignored)
    (an f32 source, or an f16 Gemma 2/3 source: copied in bf16 and config dtype bfloat16, `copy_dtype`)

Within a shard, tensors are ordered by element size (8, 4, 2, 1 bytes) so every tensor starts at an
offset aligned to its element size, as safetensors' own writer arranges them. After writing, every
tensor is read back and its name, dtype, shape and bytes (blake2b) compared with what was meant.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..formats.checkpoint import INDEX_NAME, SINGLE_NAME, Checkpoint
from ..numerics.ct.dequantize import dequantize
from ..numerics.ct.formats import ct_format, quantize_for
from ..numerics.ct.quantize import FloatQuantized, Packed
from ..errors import GemmaQuantError, OutputError
from ..formats.safetensors import SafetensorsFile, dtype_name, release_pages, stream_bytes
from ..schemes import CT, Scheme
from ..formats.multimodal import TEXT_A, layout
from .atomic import atomic_output
from .ct_rules import check_experts, check_group, check_recipe_ignore, ignore_list, recipe_ignores
from .guard import check_output, write_marker
from .model_card import base_model_of, render_model_card, source_license

MAX_SHARD_BYTES = 5 * 10**9  # "5GB" as save_pretrained counts it
CT_VERSION = "0.20.0"  # the compressed-tensors release whose layout this writes (informational)


@dataclass(frozen=True)
class _Out:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class _Unit:
    """What one step of the stream writes: a copied tensor, or all tensors of one Linear."""

    source: str  # tensor name in the source checkpoint
    outs: tuple[_Out, ...]
    module: str | None = None  # the Linear's module name when quantized (text-model name)
    out_module: str = ""  # its name in the output (multimodal Gemma 3: under "language_model.")
    expert: tuple[int, slice] | None = None  # a MoE expert: (index, rows) of the fused source tensor


@dataclass
class Report:
    out_dir: Path
    scheme: str
    files: list[str]
    shards: int
    quantized: list[str]  # module names of the quantized Linears
    copied: list[str]  # tensors copied byte for byte
    skipped: list[str]  # source tensors not written (tied lm_head)
    tensor_bytes: int
    source_bytes: int
    weight_error: dict[str, float] = field(default_factory=dict)  # ||deq - w|| / ||w|| per Linear
    notes: list[str] = field(default_factory=list)


# -- dtypes -----------------------------------------------------------------------------------
_DTYPE_KEY = re.compile(r'("(?:torch_dtype|dtype)"\s*:\s*)"(?:float32|float16)"')


def copy_dtype(ckpt: Checkpoint, keep: bool = False) -> tuple[torch.dtype | None, str | None]:
    """(dtype the copied tensors and config.json get, or None to keep the source's; a note saying why).

    vLLM runs Gemma in bf16: an f32 source's embedding kept in f32 only doubles the file (270.8 vs 136.6 MB
    for the 270M). Gemma 2/3 activations overflow float16, and vLLM refuses float16 for them, so an f16
    source's config must say bfloat16 (Gemma 1 runs in f16: kept)."""
    src = ckpt.dtype("model.embed_tokens.weight")
    if keep or src == torch.bfloat16:
        return None, None
    if src == torch.float32:
        return torch.bfloat16, ("float32 source: embedding and norms written in bfloat16, config dtype "
                                "bfloat16 (vLLM runs Gemma in bf16; --keep-dtype keeps float32)")
    if src == torch.float16 and ckpt.config.generation >= 2:
        return torch.bfloat16, ("float16 source: Gemma 2/3 must run in bfloat16 (float16 overflows their "
                                "activations), so config dtype and the copied tensors are bfloat16")
    return None, None


def check_plan(ckpt: Checkpoint, scheme: Scheme) -> None:
    """Every check the writer makes of the source against the scheme (group sizes, LM head), for callers
    that must fail before calibrating rather than after."""
    _plan(ckpt, scheme)


# -- config.json ------------------------------------------------------------------------------
def quantization_config(scheme: Scheme, actorder: str | None = None, ignore: list[str] | tuple = ("lm_head",)) -> dict:
    """The `quantization_config` block with the minimal key set (docs/vllm-formats.md §0); `ignore`
    from `ignore_list`."""
    ia = scheme.input_activations
    group = {"targets": ["Linear"], "weights": scheme.weights.to_config(actorder),
             "input_activations": ia.to_config() if ia else None, "output_activations": None,
             "format": scheme.ct_format}
    return {"quant_method": "compressed-tensors", "version": CT_VERSION, "format": scheme.ct_format,
            "quantization_status": "compressed", "config_groups": {"group_0": group},
            "ignore": list(ignore),
            "kv_cache_scheme": None, "global_compression_ratio": None, "sparsity_config": {},
            "transform_config": {}}


def config_with_quantization(src_text: str, qc: dict, where: str = "config.json",
                             dtype: torch.dtype | None = None) -> str:
    """The source config.json text with `"quantization_config": {...}` inserted before its closing
    brace; every other byte is kept (transformers would rewrite rope keys, docs/vllm-formats.md §0),
    except float32/float16 `dtype`/`torch_dtype` values when `dtype` is bfloat16."""
    if dtype == torch.bfloat16:
        src_text = _DTYPE_KEY.sub(r'\1"bfloat16"', src_text)
    try:
        data = json.loads(src_text)
    except json.JSONDecodeError as e:
        raise GemmaQuantError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise GemmaQuantError(f"{where}: expected a JSON object")
    if "quantization_config" in data:
        raise GemmaQuantError(f"{where}: already has a quantization_config (is the source already quantized?)")
    end = src_text.rfind("}")
    head, tail = src_text[:end].rstrip(), src_text[end + 1:]
    m = re.search(r'\n([ \t]+)"', src_text)
    indent = m.group(1) if m else "  "
    block = json.dumps(qc, indent=2).replace("\n", "\n" + indent)
    sep = "" if head.endswith("{") else ","
    text = f'{head}{sep}\n{indent}"quantization_config": {block}\n}}{tail}'
    new = json.loads(text)
    assert list(new) == list(data) + ["quantization_config"] and new == {**data, "quantization_config": qc}
    return text


# -- planning ---------------------------------------------------------------------------------
def _linear_outs(module: str, n: int, k: int, scheme: Scheme) -> tuple[_Out, ...]:
    return tuple(_Out(f"{module}.{suffix}", dtype, shape) for suffix, dtype, shape in
                 ct_format(scheme.ct_format).outputs(n, k, scheme.weights, scheme.input_activations))


def _plan(ckpt: Checkpoint, scheme: Scheme, to: torch.dtype | None = None) -> tuple[list[_Unit], list[str]]:
    cfg = ckpt.config
    suffixes = tuple(sorted(set().union(*(cfg.linear_shapes(i) for i in range(cfg.num_hidden_layers)))))
    linear = re.compile(r"^(model\.layers\.\d+\.(?:%s))\.weight$" % "|".join(re.escape(s) for s in suffixes))
    fused = re.compile(r"^(model\.layers\.(\d+)\.)(experts\.(?:gate_up_proj|down_proj))$")

    def out_name(name: str) -> str:  # Gemma 4 keeps the source's names; Gemma 3 writes layout A's
        if cfg.generation == 4:
            return ckpt.stored_name(name)
        return TEXT_A + name if cfg.multimodal else name

    check_experts(ckpt, scheme)
    units, skipped, linears = [], [], []
    for name in ckpt.names():
        if name == "lm_head.weight":
            if bytes(ckpt.raw_bytes(name)) != bytes(ckpt.raw_bytes("model.embed_tokens.weight")):
                raise GemmaQuantError(
                    f"{ckpt.path}: 'lm_head.weight' differs from the embedding; vLLM's Gemma models tie the "
                    "LM head to model.embed_tokens and cannot load an untied one")
            skipped.append(name)
            continue
        f = fused.match(name) if cfg.is_moe else None
        if f is not None:  # one Linear per expert and projection, in expert order
            base = out_name(name)[: -len(f.group(3))]
            for suffix, (src, rows, (n, k)) in cfg.expert_linears(int(f.group(2))).items():
                if src == f.group(3):
                    check_group(ckpt, scheme, f"{name}[{suffix.split('.')[1]}]", k)
                    units.append(_Unit(name, _linear_outs(base + suffix, n, k, scheme), module=f.group(1) + suffix,
                                       out_module=base + suffix, expert=(int(suffix.split(".")[1]), rows)))
            continue
        m = linear.match(name)
        if m is not None:
            linears.append((m.group(1), out_name(name)[: -len(".weight")]))
        if m is None or recipe_ignores(scheme, *linears[-1]):  # a recipe's extra ignore: copied like a norm
            units.append(_Unit(name, (_Out(out_name(name), to or ckpt.dtype(name), ckpt.shape(name)),)))
            continue
        n, k = ckpt.shape(name)
        check_group(ckpt, scheme, name, k)
        om = out_name(name)[: -len(".weight")]
        units.append(_Unit(name, _linear_outs(om, n, k, scheme), module=m.group(1), out_module=om))
    for name in ckpt.vision_names():  # unquantized: vLLM and transformers run the tower in bf16
        units.append(_Unit(name, (_Out(name, to or ckpt.dtype(name), ckpt.shape(name)),)))
    check_recipe_ignore(ckpt, scheme, linears)
    return units, skipped


def _shards(units: list[_Unit], max_bytes: int) -> list[list[_Unit]]:
    """Consecutive units, each shard at most max_bytes (a larger single unit gets its own shard)."""
    shards, cur, size = [], [], 0
    for u in units:
        b = sum(o.nbytes for o in u.outs)
        if cur and size + b > max_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(u)
        size += b
    if cur:
        shards.append(cur)
    return shards


def _header(outs: list[_Out]) -> tuple[bytes, dict[str, int]]:
    """safetensors header (8-byte length + JSON padded with spaces to 8 bytes) and data offsets."""
    order = sorted(outs, key=lambda o: -o.dtype.itemsize)  # stable: plan order within a size
    offsets, pos, entries = {}, 0, {"__metadata__": {"format": "pt"}}
    for o in order:
        entries[o.name] = {"dtype": dtype_name(o.dtype), "shape": list(o.shape),
                           "data_offsets": [pos, pos + o.nbytes]}
        offsets[o.name] = pos
        pos += o.nbytes
    js = json.dumps(entries, separators=(",", ":")).encode()
    js += b" " * (-len(js) % 8)
    return struct.pack("<Q", len(js)) + js, offsets


# -- writing ----------------------------------------------------------------------------------
def _bytes_of(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy())


# Gemma 4's clipped Linears (vision/audio towers): ±inf bounds mean "no clipping" (transformers' default)
CLIP_BOUNDS = (".input_min", ".input_max", ".output_min", ".output_max")


def _check_finite(t: torch.Tensor, name: str, where: Path) -> None:
    """NaN and ±Inf propagate through min/max; aminmax is one vectorized pass (isfinite().all() is ~40x
    slower on bf16 CPU tensors). A clip bound may be ±inf, never NaN."""
    if not t.dtype.is_floating_point or t.numel() == 0:
        return
    lo, hi = torch.aminmax(t.reshape(-1))
    ok = torch.isfinite if not name.endswith(CLIP_BOUNDS) else (lambda v: ~torch.isnan(v))
    if not (bool(ok(lo)) and bool(ok(hi))):
        raise GemmaQuantError(f"{where}: tensor '{name}' contains NaN or Inf values; refusing to quantize")


def _linear_packed(ckpt: Checkpoint, u: _Unit, scheme: Scheme, given: Packed | None, input_scale,
                   num_bits: int) -> tuple[Packed, float]:
    """The Linear's tensors (given, or round-to-nearest in float32) and its relative weight error."""
    src = ckpt.tensor(u.source)
    if u.expert is not None:  # this expert's rows only: the fused tensor is never read whole
        src = src[u.expert[0], u.expert[1]]
    _check_finite(src, u.source, ckpt.file_of(u.source))
    w = src.float()
    release_pages(src)  # the bf16 source pages leave RSS; w is a private copy
    p = given if given is not None else quantize_for(w, scheme.ct_format, scheme.weights, input_scale=input_scale)
    return p, _rel_error(p, w, num_bits)


def _check_packed(p: Packed, u: _Unit) -> dict[str, torch.Tensor]:
    """The Packed's tensors must be exactly the planned ones (names, dtypes, shapes)."""
    got = {f"{u.out_module}.{k}": v for k, v in p.tensors().items()}
    want = {o.name: o for o in u.outs}
    if set(got) != set(want):
        raise GemmaQuantError(f"quantized result for '{u.module}' has tensors {sorted(got)}; "
                              f"the scheme declares {sorted(want)}")
    for name, t in got.items():
        o = want[name]
        if t.dtype != o.dtype or tuple(t.shape) != o.shape:
            raise GemmaQuantError(f"quantized result '{name}' is {t.dtype} {list(t.shape)}; "
                                  f"the scheme needs {o.dtype} {list(o.shape)}")
    return got


def _rel_error(p: Packed, w: torch.Tensor, num_bits: int) -> float:
    """||dequant(p) - w|| / ||w|| with w in float32."""
    diff = dequantize(p, num_bits).float().sub_(w)
    return float(diff.norm() / w.norm().clamp_min(1e-30))


def _verify(out: Path, files: dict[str, list[_Out]], digests: dict[str, str]) -> None:
    for fname, outs in files.items():
        with SafetensorsFile(out / fname) as f:
            if f.metadata != {"format": "pt"}:
                raise OutputError(f"{out / fname}: metadata reads back as {f.metadata}")
            if set(f.keys()) != {o.name for o in outs}:
                raise OutputError(f"{out / fname}: tensors read back differ from those written")
            for o in outs:
                if f.dtype(o.name) != o.dtype or f.shape(o.name) != o.shape:
                    raise OutputError(f"{out / fname}: '{o.name}' reads back as {f.dtype(o.name)} "
                                      f"{list(f.shape(o.name))}, meant {o.dtype} {list(o.shape)}")
                h = hashlib.blake2b(digest_size=16)
                for part in stream_bytes(f.raw_bytes(o.name)):  # read-back pages released per chunk
                    h.update(part)
                if h.hexdigest() != digests[o.name]:
                    raise OutputError(f"{out / fname}: bytes of '{o.name}' differ from those written")


def check_side_files(ckpt: Checkpoint) -> None:
    """The files copied beside the weights must be what they claim: the tokenizer loads and fits
    the embedding, every other JSON file parses (else one line naming it, before anything is written)."""
    from ..formats.inputs import read_json
    from ..formats.tokenizer import load_tokenizer

    if any((ckpt.path / n).exists() for n in ("tokenizer.json", "tokenizer.model")):
        load_tokenizer(ckpt.path, rows=ckpt.config.vocab_size)
    for p in ckpt.side_files():
        if p.suffix == ".json" and p.name != "tokenizer.json":
            read_json(p, p.name, expect=None)


def _source_bytes(ckpt: Checkpoint, u) -> int:
    shape = ckpt.shape(u.source)
    if u.expert is not None:
        shape = (len(range(*u.expert[1].indices(shape[1]))), shape[2])
    return math.prod(shape) * ckpt.dtype(u.source).itemsize


def write_compressed_tensors(ckpt: Checkpoint, scheme: Scheme, out_dir: Path, *,
                             quantized: dict[str, Packed] | None = None, force: bool = False,
                             command: str = "", algorithm_note: str = "round-to-nearest (RTN)",
                             calibration_note: str = "none (round-to-nearest needs no data)",
                             drift: dict | None = None, input_scales: dict[str, float | torch.Tensor] | None = None,
                             actorder: str | None = None, base_model: str | None = None,
                             max_shard_bytes: int = MAX_SHARD_BYTES, progress: Callable[[int, int, str], None] | None = None,
                             overrides: dict[str, torch.Tensor] | None = None, inputs=(),
                             keep_dtype: bool = False, card_stats: dict[str, str] | None = None) -> Report:
    """Write `ckpt` quantized with `scheme` to `out_dir` (all or nothing).

    quantized: {module name: Packed} from a calibrated algorithm (GPTQ, AWQ, SmoothQuant); other
        Linears are rounded to nearest here. input_scales: {module name: absmax(x)/448} for schemes
        with static activations (fp8-static), unless the module's Packed carries one.
    overrides: {tensor name: tensor} replacing copied tensors (the norms SmoothQuant/AWQ folded scales
        into); same dtype and shape as the source tensor.
    inputs: files read besides the checkpoint (calibration text, recipe): the output never replaces them.
    progress(done, total, tensor): source bytes written so far, of all, and the tensor being written (the
        CLI draws its bar from it; the writer itself never prints).
    keep_dtype: copy float32/float16 tensors as they are (default: `copy_dtype`).
    card_stats: more `- key: value` lines for the model card (a MoE's calibration tokens per expert)."""
    if scheme.family != CT or scheme.weights is None:
        raise GemmaQuantError(f"scheme '{scheme.name}' is not a compressed-tensors scheme")
    out_dir = Path(out_dir).absolute()
    inputs = [ckpt.path, *inputs]
    check_output(out_dir, force=force, kind="dir", inputs=inputs)
    check_side_files(ckpt)  # a corrupt tokenizer.json is never copied into an output
    to, dtype_note = copy_dtype(ckpt, keep_dtype)
    units, skipped = _plan(ckpt, scheme, to)
    notes = [dtype_note] if dtype_note else []
    if ckpt.config.multimodal and ckpt.config.generation == 4:
        notes.append(f"multimodal: {len(ckpt.vision_names())} vision / audio tower and embedder tensors copied "
                     "unquantized (in `ignore`); tensor names as in the source")
    elif ckpt.config.multimodal:
        notes.append(f"multimodal: {len(ckpt.vision_names())} vision tower / projector tensors copied unquantized "
                     f"(in `ignore`); tensor names in Google's layout A (the source's: "
                     f"{layout(ckpt.stored_names())})")
    if ckpt.config.is_moe:
        c = ckpt.config
        notes.append(f"MoE: {c.num_experts} experts x {c.num_hidden_layers} layers written as per-expert "
                     "gate_proj/up_proj/down_proj Linears (the layout vLLM's Gemma 4 loader and llm-compressor use); "
                     "router kept unquantized (in `ignore`)")
    modules = {u.module for u in units if u.module}
    quantized = dict(quantized or {})
    input_scales = dict(input_scales or {})
    for name in list(quantized) + list(input_scales):
        if name not in modules:
            raise GemmaQuantError(f"'{name}' is not a quantizable Linear of {ckpt.path} "
                                  f"(expected a module name like 'model.layers.0.self_attn.q_proj')")
    static = scheme.input_activations is not None and not scheme.input_activations.dynamic
    if static:
        missing = [m for m in sorted(modules) if m not in input_scales
                   and not (isinstance(quantized.get(m), FloatQuantized) and quantized[m].input_scale is not None)]
        if missing:
            raise GemmaQuantError(f"scheme '{scheme.name}' has static activation scales, which come from "
                                  f"calibration; none given for '{missing[0]}' ({len(missing)} Linears in all)")
    elif input_scales:
        raise GemmaQuantError(f"scheme '{scheme.name}' has dynamic or no activation quantization; "
                              "it takes no input scales")
    for m, p in quantized.items():  # fail before writing anything
        _check_packed(p, next(u for u in units if u.module == m))
    overrides = dict(overrides or {})
    copied = {u.source for u in units if u.module is None}
    for name, t in overrides.items():
        if name not in copied:
            raise GemmaQuantError(f"override '{name}' is not a copied (non-Linear) tensor of {ckpt.path}")
        if t.dtype != ckpt.dtype(name) or tuple(t.shape) != ckpt.shape(name):
            raise GemmaQuantError(f"override '{name}': {t.dtype} {list(t.shape)} does not match the source "
                                  f"{ckpt.dtype(name)} {list(ckpt.shape(name))}")

    shards = _shards(units, max_shard_bytes)
    names = [SINGLE_NAME] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    files = {fn: [o for u in sh for o in u.outs] for fn, sh in zip(names, shards)}
    report = Report(out_dir=out_dir, scheme=scheme.name, files=[], shards=len(shards), quantized=[], copied=[],
                    skipped=skipped, tensor_bytes=sum(o.nbytes for outs in files.values() for o in outs),
                    source_bytes=ckpt.weight_nbytes(), notes=notes)
    num_bits = scheme.weights.num_bits
    digests: dict[str, str] = {}
    total, done = sum(_source_bytes(ckpt, u) for u in units), 0
    with atomic_output(out_dir, force=force, kind="dir") as tmp:
        for fname, shard in zip(names, shards):
            header, offsets = _header(files[fname])
            with open(tmp / fname, "wb") as f:
                f.write(header)
                for u in shard:
                    if progress:
                        progress(done, total, u.source)
                    if u.module is None and u.source in overrides:
                        t = overrides[u.source].detach().cpu().to(u.outs[0].dtype).contiguous()
                        _check_finite(t, u.source, ckpt.file_of(u.source))
                        parts = {u.outs[0].name: _bytes_of(t)}
                        report.notes.append(f"{u.source}: rewritten (calibration folded scales into it)")
                    elif u.module is None:
                        src_view = ckpt.tensor(u.source).reshape(-1)
                        for i in range(0, src_view.numel(), 1 << 24):  # a 1.8 GB embedding: 32 MB at a time
                            _check_finite(src_view[i:i + (1 << 24)], u.source, ckpt.file_of(u.source))
                            release_pages(src_view[i:i + (1 << 24)])  # copied below, also released behind
                        parts = {u.outs[0].name: ckpt.raw_bytes(u.source) if to is None
                                 else _bytes_of(ckpt.tensor(u.source).to(to))}
                        report.copied.append(u.source)
                    else:
                        p, report.weight_error[u.module] = _linear_packed(
                            ckpt, u, scheme, quantized.get(u.module), input_scales.get(u.module), num_bits)
                        got = _check_packed(p, u)
                        parts = {k: _bytes_of(t) for k, t in got.items()}
                        report.quantized.append(u.module)
                    for name, buf in parts.items():
                        f.seek(len(header) + offsets[name])
                        h = hashlib.blake2b(digest_size=16)
                        for part in stream_bytes(buf):  # mapped source pages released per chunk
                            f.write(part)
                            h.update(part)
                        digests[name] = h.hexdigest()
                    done += _source_bytes(ckpt, u)
                    if progress:
                        progress(done, total, u.source)
        if len(names) > 1:
            index = {"metadata": {"total_size": report.tensor_bytes},
                     "weight_map": {o.name: fn for fn, outs in files.items() for o in outs}}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        qc = quantization_config(scheme, actorder, ignore_list(ckpt.config) + list(scheme.extra_ignore))
        src_cfg = ckpt.path / "config.json"
        (tmp / "config.json").write_text(config_with_quantization(src_cfg.read_text(encoding="utf-8"), qc,
                                                                  str(src_cfg), to), encoding="utf-8")
        for p in ckpt.side_files():
            if p.name != "config.json":
                shutil.copyfile(p, tmp / p.name)
        base = base_model or base_model_of(ckpt.source, ckpt.path, ckpt.config.raw)
        errs = list(report.weight_error.values())
        stats = {"Quantized Linears": str(len(report.quantized)),
                 "Weight bytes": f"{report.tensor_bytes / 1e6:.1f} MB (source {report.source_bytes / 1e6:.1f} MB)",
                 "Relative weight error ||W_q - W|| / ||W|| (mean / max over Linears)":
                     f"{sum(errs) / len(errs):.4f} / {max(errs):.4f}" if errs else "n/a", **(card_stats or {})}
        card = render_model_card(
            title=f"{ckpt.name}-{scheme.label}", base_model=base,
            license=source_license(ckpt.path, ckpt.config.model_type), source=ckpt.source,
            tags=["gemma", ckpt.config.model_type.replace("_text", ""), "compressed-tensors", "vllm", "quantized",
                  scheme.label.lower(), "gemmaquant"],
            scheme_name=scheme.name, scheme_summary=scheme.summary, engine=scheme.engine,
            ct_format=scheme.ct_format, quantization_config=qc, command=command or "(not recorded)",
            algorithm_note=algorithm_note, calibration_note=calibration_note, drift=drift, stats=stats)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        _verify(tmp, files, digests)
        write_marker(tmp, format="compressed-tensors", scheme=scheme.name)  # what --force may replace later
        report.files = sorted(p.name for p in tmp.iterdir())
    return report
