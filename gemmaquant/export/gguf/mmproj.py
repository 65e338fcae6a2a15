"""The vision tower and projector of a multimodal Gemma 3 as llama.cpp's `clip` GGUF (the "mmproj" file that
llama-mtmd-cli, llama-server and libmtmd load beside the text GGUF), identical to
`convert_hf_to_gguf.py --mmproj --outtype T` (docs/gguf-gemma.md §8).

What the converter does, and so do we:
* tensors: every `vision_tower.*` and `multi_modal_projector.*` tensor (SigLIP's unused `head.*` dropped),
  source files in order, names sorted within a file, named `v.*` / `mm.*`; no reshapes or transposes
  (`mm.input_projection.weight` keeps HF's input-major [Hv, H] and clip.cpp transposes it).
  The converter reads layout A names only; from layouts B/C/D (multimodal.py) we write the file it writes
  for the same tensors under A's names.
* values: bf16 sources are widened to f32, f16 stays f16; `mm.soft_emb_norm` gets the +1 of Gemma's
  RMSNorm (1 + w) in that dtype (f16 for an f16 source), SigLIP's LayerNorms do not.
* types: `mm.input_projection` F16 whatever the output type; patch and position embeddings, norms and
  biases F32; the other matrices the output type, where Q8_0 falls back to F16 for rows not a multiple
  of 32 (Gemma 3's ffn_down: 4304).
* keys: `clip` architecture, `mmproj` type, the model-card keys (size label from the mmproj's own
  parameter count), file type, the vision hyperparameters (SigLIP's defaults for absent keys, as
  transformers fills them in), image mean/std from preprocessor_config.json then processor_config.json
  (the later wins; a nested `image_processor` is flattened), projector "gemma3", and a pooling scale
  factor only when it is not 4.
"""

from __future__ import annotations

import re
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
from .metadata import QUANTIZATION_VERSION, display_dir_name, general_metadata

# --outtype -> (general.file_type, type of the plain matrices)
OUTTYPES = {"f32": (0, GGMLType.F32), "f16": (1, GGMLType.F16), "bf16": (32, GGMLType.BF16),
            "q8_0": (7, GGMLType.Q8_0)}
DEFAULT_OUTTYPE = "f16"  # what llama.cpp's own Gemma 3 GGUF repositories ship beside the text model
# SiglipVisionConfig's defaults: the converter reads the config through transformers, which fills them in
SIGLIP_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       image_size=224, patch_size=16, layer_norm_eps=1e-6)
DEFAULT_IMAGE_SEQ_LENGTH = 256  # Gemma3Processor's: 16x16 pooled tokens
CLIP_DEFAULT_MERGE = 4  # clip.cpp's pooling when no scale factor key is written

_GLOBAL = {
    "multi_modal_projector.mm_input_projection_weight": "mm.input_projection.weight",
    "multi_modal_projector.mm_soft_emb_norm.weight": "mm.soft_emb_norm.weight",
}
_VISION = "vision_tower.vision_model."
_PARTS = {"embeddings.patch_embedding": "v.patch_embd", "embeddings.position_embedding": "v.position_embd",
          "post_layernorm": "v.post_ln"}
_BLOCK = {"layer_norm1": "ln1", "layer_norm2": "ln2", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
          "self_attn.v_proj": "attn_v", "self_attn.out_proj": "attn_out", "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down"}
_BLOCK_RE = re.compile(r"^encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")


@dataclass(frozen=True)
class MmprojTensor:
    hf_name: str  # layout A name (multimodal.py); the checkpoint resolves it in any layout
    name: str  # GGUF name
    shape: tuple[int, ...]  # HF shape (GGUF ne is its reverse)
    type: GGMLType

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


def gguf_name(hf_name: str) -> str | None:
    """GGUF name of a layout A vision/projector tensor; None for what the converter drops (SigLIP's head)."""
    if hf_name in _GLOBAL:
        return _GLOBAL[hf_name]
    if not hf_name.startswith(_VISION):
        raise GemmaQuantError(f"tensor '{hf_name}' is not part of Gemma 3's vision tower or projector")
    rest = hf_name[len(_VISION):]
    if rest.startswith("head."):
        return None
    for hf, g in _PARTS.items():
        if rest.startswith(hf + "."):
            return g + rest[len(hf):]
    m = _BLOCK_RE.match(rest)
    if m and m.group(2) in _BLOCK:
        return f"v.blk.{m.group(1)}.{_BLOCK[m.group(2)]}.{m.group(3)}"
    raise GemmaQuantError(f"tensor '{hf_name}' has no llama.cpp mmproj name (not a SigLIP tower tensor)")


def _tensor_type(hf_name: str, name: str, shape: tuple[int, ...], plain: GGMLType) -> GGMLType:
    if len(shape) <= 1 or name.endswith("_norm.weight"):
        return GGMLType.F32
    if "input_projection" in hf_name:
        return GGMLType.F16
    if ".embeddings." in hf_name or not name.endswith(".weight"):
        return GGMLType.F32
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
        raise GemmaQuantError(f"{ckpt.path}: not a multimodal checkpoint (an mmproj needs "
                              "Gemma3ForConditionalGeneration's vision tower)")
    _, plain = _outtype(outtype)
    by_file: dict[Path, list[str]] = {}
    for a in ckpt.vision_names():
        by_file.setdefault(ckpt.file_of(a), []).append(a)
    out = []
    for f in sorted(by_file, key=lambda p: p.name):  # parts in order, names sorted within a part
        for a in sorted(by_file[f]):
            name = gguf_name(a)
            if name is not None:
                if ckpt.dtype_name(a) not in SOURCE_DTYPES:
                    raise GemmaQuantError(f"{ckpt.file_of(a)}: tensor '{a}' is {ckpt.dtype_name(a)}; expected a "
                                          "bf16/f16/f32 vision tower (is this already quantized?)")
                shape = ckpt.shape(a)
                out.append(MmprojTensor(a, name, shape, _tensor_type(a, name, shape, plain)))
    if not any(t.name.startswith("v.blk.") for t in out):
        raise GemmaQuantError(f"{ckpt.path}: no vision tower tensors (vision_tower.*) to write an mmproj from")
    return out


def _vision_config(ckpt: Checkpoint) -> dict:
    vc = ckpt.config.raw.get("vision_config")
    if not isinstance(vc, dict):
        raise GemmaQuantError(f"{ckpt.path / 'config.json'}: no 'vision_config' object (needed for the mmproj)")
    return {**SIGLIP_DEFAULTS, **{k: v for k, v in vc.items() if v is not None}}


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
                                  "(the image processor's normalization, needed for the mmproj)")
    return merged


def _source(ckpt: Checkpoint, t: MmprojTensor) -> torch.Tensor:
    x = ckpt.tensor(t.hf_name)
    if not torch.isfinite(x).all():
        raise GemmaQuantError(f"{ckpt.file_of(t.hf_name)}: tensor '{t.hf_name}' contains NaN or Inf")
    if x.dtype != torch.float16:
        x = x.float()  # bf16 widens exactly; f16 stays f16, so the +1 below rounds as the converter's does
    if t.name == "mm.soft_emb_norm.weight":
        x = x + 1
    return x


def _data(ckpt: Checkpoint, t: MmprojTensor) -> np.ndarray:
    x = _source(ckpt, t)
    rows = x.reshape(-1, t.shape[-1]) if x.dim() > 1 else x.reshape(1, -1)
    return quantize(rows, t.type).contiguous().numpy().reshape(-1)


def mmproj_metadata(ckpt: Checkpoint, outtype: str, tensors: list[MmprojTensor]) -> gguf.GGUFWriter:
    """A GGUFWriter (no file yet) with the converter's keys in its order and the tensor infos."""
    file_type, _ = _outtype(outtype)
    vc = _vision_config(ckpt)
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
        for t in tensors:  # one tensor at a time: the 27B's tower is 0.4 B parameters
            w.write_tensor_data(_data(ckpt, t))
        w.close()
        size = tmp.stat().st_size
    return MmprojReport(out, outtype, tensors, size)
