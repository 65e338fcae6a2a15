"""The vision (and audio) towers of a multimodal Gemma as llama.cpp's `clip` GGUF (the "mmproj" file that
llama-mtmd-cli, llama-server and libmtmd load beside the text GGUF), identical to
`convert_hf_to_gguf.py --mmproj --outtype T` (docs/gguf-gemma.md §8). One pipeline for Gemma 3 and
Gemma 4; what differs (names, transforms, forced types, defaults) is data in mmproj_rules.py.

What the converter does, and so do we:
* tensors: Gemma 3: every `vision_tower.*` and `multi_modal_projector.*` tensor (SigLIP's unused `head.*`
  dropped); Gemma 4: every vision/audio tower and embedder tensor. Source files in order, names sorted
  within a file, named `v.*` / `a.*` / `mm.*`. Gemma 3: no reshapes (`mm.input_projection.weight` keeps
  HF's input-major [Hv, H] and clip.cpp transposes it); the converter reads layout A names only, and from
  layouts B/C/D (multimodal.py) we write the file it writes for the same tensors under A's names.
  Gemma 4: 0-d clip bounds become [1], the patch Linear the [H, 3, p, p] kernel, the depthwise conv [C, k].
* values: bf16 sources are widened to f32, f16 stays f16; Gemma 3's `mm.soft_emb_norm` gets the +1 of
  Gemma's RMSNorm (1 + w) in that dtype, SigLIP's LayerNorms do not; Gemma 4's audio `per_dim_scale`
  is stored as softplus(w), its norms as they are.
* types: 1-D tensors, norms, biases and other non-`.weight` tensors F32; Gemma 3: `mm.input_projection`
  F16 whatever the output type, patch and position embeddings F32; Gemma 4: position table and the
  audio convolutions (and, by the converter's test, every audio subsampling weight) F32, the patch kernel
  F16 for f16 and F32 otherwise; the other matrices the output type, where Q8_0 falls back to F16 for
  rows not a multiple of 32 (Gemma 3's ffn_down: 4304).
* keys: `clip` architecture, `mmproj` type, the model-card keys (size label from the mmproj's own
  parameter count), file type, the vision hyperparameters (the config class's defaults for absent keys,
  as transformers fills them in), image mean/std from preprocessor_config.json then processor_config.json
  (the later wins; a nested `image_processor` is flattened), Gemma 4: the audio hyperparameters when
  there is an audio tower; then the projector: Gemma 3 "gemma3" (a pooling scale factor only when it is
  not 4), Gemma 4 "gemma4v" / "gemma4a" with the layer-norm epsilons (1e-6 unless the configs name
  `layer_norm_eps`) and the mel bin count.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from ...formats.checkpoint import SOURCE_DTYPES, Checkpoint
from ...errors import GemmaQuantError
from ..atomic import atomic_output
from ..guard import check_output
from ...numerics.ggml.quantize import quantize
from ...numerics.ggml.types import GGMLType, row_bytes
from ...formats.inputs import read_json
from ...formats.safetensors import release_pages
from .workers import run_ordered
from .metadata import QUANTIZATION_VERSION, display_dir_name, general_metadata
from .mmproj_rules import (CLIP_BOUNDS, CLIP_N_MERGE, CLIP_ROPE_THETA, GEMMA4_AUDIO_DEFAULTS, GEMMA4_PROJECTORS,
                           MmprojRules, apply_transform, rules_for, transformed_shape)

# --outtype -> (general.file_type, type of the plain matrices)
OUTTYPES = {"f32": (0, GGMLType.F32), "f16": (1, GGMLType.F16), "bf16": (32, GGMLType.BF16),
            "q8_0": (7, GGMLType.Q8_0)}
DEFAULT_OUTTYPE = "f16"  # what llama.cpp's own Gemma 3 and Gemma 4 GGUF repositories ship beside the text model
DEFAULT_IMAGE_SEQ_LENGTH = 256  # Gemma3Processor's: 16x16 pooled tokens
CLIP_DEFAULT_MERGE = 4  # clip.cpp's Gemma 3 pooling when no scale factor key is written


@dataclass(frozen=True)
class MmprojTensor:
    hf_name: str  # Gemma 3: layout A name (multimodal.py); Gemma 4: as stored; the checkpoint resolves either
    name: str  # GGUF name
    shape: tuple[int, ...]  # written shape, HF order (GGUF ne is its reverse)
    type: GGMLType
    transform: str | None = None  # mmproj_rules' value change (None: the values as they are)

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return self.numel // self.shape[-1] * row_bytes(self.type, self.shape[-1])


@dataclass
class MmprojReport:
    path: Path
    outtype: str
    tensors: list[MmprojTensor]
    file_bytes: int


def _tensor_type(rules: MmprojRules, hf_name: str, name: str, shape: tuple[int, ...], outtype: str) -> GGMLType:
    """The converter's order: the generation's forced types, the base class's patch rule, then 1-D and
    norms F32 over anything, non-`.weight` tensors F32, the output type (Q8_0 -> F16 where gguf refuses)."""
    forced = None
    if any(s in hf_name for s in rules.forced_f16):
        forced = GGMLType.F16
    elif any(s in hf_name for s in rules.forced_f32) or (rules.forced_f32_if and rules.forced_f32_if(hf_name)):
        forced = GGMLType.F32
    elif ".patch_embd.weight" in name:  # MmprojModel: the patch kernel F16 only in an f16 file
        forced = GGMLType.F16 if outtype == "f16" else GGMLType.F32
    if len(shape) <= 1 or name.endswith("_norm.weight"):
        return GGMLType.F32
    if forced is not None:
        return forced
    if not name.endswith(".weight"):
        return GGMLType.F32
    plain = OUTTYPES[outtype][1]
    if plain == GGMLType.Q8_0 and shape[-1] % 32:
        return GGMLType.F16  # gguf's Q8_0 refuses the row; the converter falls back to F16
    return plain


def _outtype(outtype: str) -> tuple[int, GGMLType]:
    if outtype not in OUTTYPES:
        raise GemmaQuantError(f"mmproj type {outtype!r} is not supported (allowed: {', '.join(OUTTYPES)}, as "
                              "convert_hf_to_gguf.py --mmproj offers)")
    return OUTTYPES[outtype]


def plan_mmproj(ckpt: Checkpoint, outtype: str) -> list[MmprojTensor]:
    """The mmproj tensors in the converter's order, with their GGUF types."""
    if not ckpt.config.multimodal:
        wrapper = f"Gemma{4 if ckpt.config.generation == 4 else 3}ForConditionalGeneration"
        raise GemmaQuantError(f"{ckpt.path}: not a multimodal checkpoint (an mmproj needs {wrapper}'s vision tower)")
    _outtype(outtype)
    rules = rules_for(ckpt.config.generation)
    if rules.generation == 4:
        _check_gemma4_towers(ckpt)
    by_file: dict[Path, list[str]] = {}
    for a in ckpt.vision_names():
        by_file.setdefault(ckpt.file_of(a), []).append(a)
    out = []
    for f in sorted(by_file, key=lambda p: p.name):  # parts in order, names sorted within a part
        for a in sorted(by_file[f]):
            got = rules.name(a)
            if got is not None:
                if ckpt.dtype_name(a) not in SOURCE_DTYPES:
                    raise GemmaQuantError(f"{ckpt.file_of(a)}: tensor '{a}' is {ckpt.dtype_name(a)}; expected a "
                                          "bf16/f16/f32 vision tower (is this already quantized?)")
                name, transform = got
                shape = transformed_shape(transform, ckpt.shape(a), a)
                out.append(MmprojTensor(a, name, shape, _tensor_type(rules, a, name, shape, outtype), transform))
    if not any(t.name.startswith("v.blk.") for t in out):
        raise GemmaQuantError(f"{ckpt.path}: no vision tower tensors ({'model.' if rules.generation == 4 else ''}"
                              "vision_tower.*) to write an mmproj from")
    return out


def _check_gemma4_towers(ckpt: Checkpoint) -> None:
    """What the converter asserts or clip.cpp cannot represent, as one line each."""
    raw, where = ckpt.config.raw, ckpt.path / "config.json"
    audio_tensors = [a for a in ckpt.vision_names() if "audio_tower." in a or "embed_audio." in a]
    if audio_tensors and not isinstance(raw.get("audio_config"), dict):
        raise GemmaQuantError(f"{where}: no 'audio_config' object, but the checkpoint has audio tower tensors "
                              f"('{audio_tensors[0]}')")
    vc = _vision_config(ckpt)
    if vc["pooling_kernel_size"] != CLIP_N_MERGE:
        raise GemmaQuantError(f"{where}: vision_config.pooling_kernel_size is {vc['pooling_kernel_size']!r}; "
                              f"llama.cpp's Gemma 4 vision encoder pools {CLIP_N_MERGE}x{CLIP_N_MERGE} (allowed: 3)")
    rope = vc.get("rope_parameters")
    theta = rope.get("rope_theta", CLIP_ROPE_THETA) if isinstance(rope, dict) else CLIP_ROPE_THETA
    if theta != CLIP_ROPE_THETA:
        raise GemmaQuantError(f"{where}: vision_config.rope_parameters.rope_theta is {theta!r}; llama.cpp's Gemma 4 "
                              f"vision encoder uses {CLIP_ROPE_THETA:g} (allowed: 100)")


def _vision_config(ckpt: Checkpoint) -> dict:
    vc = ckpt.config.raw.get("vision_config")
    if not isinstance(vc, dict):
        raise GemmaQuantError(f"{ckpt.path / 'config.json'}: no 'vision_config' object (needed for the mmproj)")
    rules = rules_for(ckpt.config.generation)
    out = {**rules.vision_defaults, **{k: v for k, v in vc.items() if v is not None}}
    if rules.image_size is not None:
        out["image_size"] = rules.image_size
    return out


def _audio_config(ckpt: Checkpoint) -> dict | None:
    """Gemma 4's audio config with its class's defaults; None without an audio tower."""
    ac = ckpt.config.raw.get("audio_config") if ckpt.config.generation == 4 else None
    if not isinstance(ac, dict):
        return None
    return {**GEMMA4_AUDIO_DEFAULTS, **{k: v for k, v in ac.items() if v is not None}}


def processor_config(model_dir: Path) -> dict:
    """preprocessor_config.json, then processor_config.json over it (nested processor dicts flattened)."""
    merged: dict = {}
    for fname, nested in (("preprocessor_config.json", "media_proc_cfg"), ("processor_config.json", "image_processor")):
        p = Path(model_dir) / fname
        if p.is_file():
            cfg = read_json(p, fname)
            inner = cfg.get(nested)
            merged.update({**cfg, **inner} if isinstance(inner, dict) else cfg)
    for key in ("image_mean", "image_std"):
        v = merged.get(key)
        if not (isinstance(v, list) and v and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)):
            raise GemmaQuantError(f"{model_dir}: no '{key}' list in preprocessor_config.json or processor_config.json "
                                  "(the image processor's normalization, needed for the mmproj; quantize --mmproj "
                                  "none writes the GGUF without it)")
    return merged


def _source(ckpt: Checkpoint, t: MmprojTensor) -> torch.Tensor:
    x = ckpt.tensor(t.hf_name)
    if x.dtype != torch.float16:
        x = x.float()  # bf16 widens exactly; f16 stays f16, so the transforms round as the converter's do
    # min and max carry any NaN or ±inf (and take a fifth of torch.isfinite's time on bf16 rows)
    lo, hi = torch.aminmax(x) if x.numel() else (torch.zeros(()), torch.zeros(()))
    inf_ok = t.hf_name.endswith(CLIP_BOUNDS) and not rules_for(ckpt.config.generation).finite_bounds
    if torch.isnan(lo) or (not inf_ok and not (torch.isfinite(lo) and torch.isfinite(hi))):
        # an unclipped Linear's bounds are ±inf (transformers' default): values, not corruption
        raise GemmaQuantError(f"{ckpt.file_of(t.hf_name)}: tensor '{t.hf_name}' contains NaN or Inf")
    return apply_transform(t.transform, x, t.shape)


def _data(ckpt: Checkpoint, t: MmprojTensor) -> np.ndarray:
    x = _source(ckpt, t)
    rows = x.reshape(-1, t.shape[-1])
    return quantize(rows, t.type).contiguous().numpy().reshape(-1)


def mmproj_metadata(ckpt: Checkpoint, outtype: str, tensors: list[MmprojTensor]) -> gguf.GGUFWriter:
    """A GGUFWriter (no file yet) with the converter's keys in its order and the tensor infos."""
    file_type, _ = _outtype(outtype)
    vc = _vision_config(ckpt)
    ac = _audio_config(ckpt)
    proc = processor_config(ckpt.path)
    w = gguf.GGUFWriter(None, "clip")
    w.add_type(gguf.GGUFType.MMPROJ)
    general_metadata(ckpt.path, sum(t.numel for t in tensors)).set_gguf_meta_model(w)
    w.add_file_type(file_type)
    w.add_clip_has_vision_encoder(True)
    w.add_vision_projection_dim(ckpt.config.hidden_size)
    w.add_vision_image_size(vc["image_size"])
    w.add_vision_patch_size(vc["patch_size"])
    w.add_vision_embedding_length(vc["hidden_size"])
    w.add_vision_feed_forward_length(vc["intermediate_size"])
    w.add_vision_block_count(vc["num_hidden_layers"])
    w.add_vision_head_count(vc["num_attention_heads"])
    w.add_vision_image_mean(proc["image_mean"])
    w.add_vision_image_std(proc["image_std"])
    if ac is not None:
        w.add_clip_has_audio_encoder(True)
        w.add_audio_projection_dim(ckpt.config.hidden_size)
        w.add_audio_embedding_length(ac["hidden_size"])
        w.add_audio_feed_forward_length(ac["hidden_size"] * 4)  # the converter's, whatever the config says
        w.add_audio_block_count(ac["num_hidden_layers"])
        w.add_audio_head_count(ac["num_attention_heads"])
    if ckpt.config.generation == 4:
        w.add_clip_vision_projector_type(GEMMA4_PROJECTORS[0])
        w.add_vision_attention_layernorm_eps(vc["layer_norm_eps"])
        if ac is not None:
            w.add_clip_audio_projector_type(GEMMA4_PROJECTORS[1])
            w.add_audio_num_mel_bins(ac["input_feat_size"])
            w.add_audio_attention_layernorm_eps(ac["layer_norm_eps"])
    else:
        w.add_clip_projector_type(gguf.VisionProjectorType.GEMMA3)
        w.add_vision_attention_layernorm_eps(vc["layer_norm_eps"])
        w.add_vision_use_gelu(True)
        # tokens per image side = patches per side / scale factor; clip.cpp assumes 4 without the key
        seq = proc.get("image_seq_length", DEFAULT_IMAGE_SEQ_LENGTH)
        factor = (vc["image_size"] // vc["patch_size"]) // int(seq ** 0.5)
        if factor > 0 and factor != CLIP_DEFAULT_MERGE:
            w.add_vision_projector_scale_factor(factor)
    w.add_quantization_version(QUANTIZATION_VERSION)
    for t in tensors:
        w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=gguf.GGMLQuantizationType(t.type))
    return w


def check_mmproj(ckpt: Checkpoint, outtype: str) -> list[MmprojTensor]:
    """Everything write_mmproj would refuse, from headers and configs only (before any other output is
    written); returns the plan."""
    tensors = plan_mmproj(ckpt, outtype)
    mmproj_metadata(ckpt, outtype, tensors)
    return tensors


def mmproj_contents(ckpt: Checkpoint) -> str:
    """What the mmproj holds, for messages: Gemma 3's vision tower + projector, Gemma 4's towers."""
    if ckpt.config.generation != 4:
        return "vision tower + projector"
    return "vision and audio towers + embedders" if _audio_config(ckpt) is not None else "vision tower + embedder"


def default_mmproj_path(ckpt: Checkpoint, outtype: str, folder: Path) -> Path:
    """`mmproj-<name>-<TYPE>.gguf`, as the converter names it given an output directory
    (gemma-3-4b-it: mmproj-gemma-3-4b-it-F16.gguf)."""
    # the name heuristics weigh a size in the directory name against the parameter count, so count them
    meta = general_metadata(ckpt.path, sum(t.numel for t in plan_mmproj(ckpt, outtype)))
    shown = gguf.naming_convention(meta.name or display_dir_name(ckpt.path), meta.basename, meta.finetune,
                                   meta.version, size_label=None, output_type=outtype.upper(), model_type=None)
    return Path(folder) / f"mmproj-{shown}.gguf"


def same_mmproj(path: Path, ckpt: Checkpoint, outtype: str) -> bool:
    """Whether `path` already is this model's mmproj of this type (a second GGUF preset written into the
    same folder shares it): a clip GGUF with the same file type, tensor names, types and shapes."""
    from ...formats.gguf.reader import GGUFFile

    try:
        gf = GGUFFile(path)
    except (GemmaQuantError, OSError):
        return False
    try:
        want = plan_mmproj(ckpt, outtype)
        return (gf.get("general.architecture") == "clip" and gf.get("general.file_type") == OUTTYPES[outtype][0]
                and [(t.name, t.type, t.shape) for t in want]
                == [(n, i.qtype, tuple(i.shape)) for n, i in gf.tensors.items()])
    finally:
        gf.close()


def write_mmproj(ckpt: Checkpoint, outtype: str, out: Path, *, force: bool = False, inputs=()) -> MmprojReport:
    """Write the mmproj GGUF to `out` (all or nothing; the output guard applies as for any output)."""
    out = Path(out).absolute()
    tensors = plan_mmproj(ckpt, outtype)
    w = mmproj_metadata(ckpt, outtype, tensors)
    check_output(out, force=force, kind="file", inputs=[ckpt.path, *inputs])
    with atomic_output(out, force=force, kind="file", inputs=[ckpt.path, *inputs]) as tmp:
        w.fout = None
        w.write_header_to_file(path=tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        # a few tensors in flight (the 27B's tower is 0.4 B parameters), on the text writer's threads with one
        # torch thread each: 2-thread torch ops on a busy machine made Q8_0 ~50x slower (RESULTS.md §10)
        jobs = ((t, (lambda t=t: _data(ckpt, t)), None) for t in tensors)
        for t, data in run_ordered(jobs, torch.get_num_threads()):
            w.write_tensor_data(data)
            release_pages(ckpt.tensor(t.hf_name))  # its source pages stop counting in RSS once written
        w.close()
        size = tmp.stat().st_size
    return MmprojReport(out, outtype, tensors, size)
