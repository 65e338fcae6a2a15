"""A Hugging Face checkpoint directory, its tensors read lazily, one at a time, from memory-mapped
safetensors (a single file, or shards with an index), and THE reader of a shard index
(`read_shard_index`: the checkpoint, the compressed-tensors loader and `inspect` all go through it).

Pickle checkpoints (.bin/.pt/.pth) are refused, never unpickled: unpickling runs arbitrary code.
`resolve_model` turns a MODEL argument (a directory, a Hub repo id, `demo`) into a Checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import GemmaQuantError
from .config import GemmaConfig, load_config
from .hub import REPO_ID, download
from .inputs import read_json
from .multimodal import media_name
from .safetensors import SafetensorsFile

if TYPE_CHECKING:  # torch is imported when a tensor is first read, not to parse a config or headers
    import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# What a source checkpoint stores: F8_E4M3/F8_E5M2 weights are already quantized (they reached
# the quantizers as NotImplementedError), F64 no converter or engine expects.
SOURCE_DTYPES = ("BF16", "F16", "F32")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def text_name(name: str) -> str | None:
    """HF tensor name of the text model, or None for vision/audio/projector tensors."""
    for prefix in ("language_model.model.", "model.language_model."):
        if name.startswith(prefix):
            return "model." + name[len(prefix):]
    if name.startswith("language_model.lm_head."):
        return name[len("language_model."):]
    if name.startswith(("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                        "model.multi_modal_projector.", "audio_tower.", "model.audio_tower.",
                        "model.embed_vision.", "model.embed_audio.")):
        return None
    return name


def _safe_child(base: Path, name: str, what: str) -> Path:
    """A file named by an index must be a plain file name inside the model directory."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", "..") \
            or "\x00" in name:
        raise GemmaQuantError(f"{what}: shard name {name!r} is not a plain file name in {base}")
    return base / name


@dataclass(frozen=True)
class ShardIndex:
    path: Path  # the index file
    weight_map: dict[str, str]  # tensor name (as stored) -> shard file name
    shards: list[Path]  # every shard it names, sorted, each a plain file of the directory


def read_shard_index(directory: Path) -> ShardIndex | None:
    """`model.safetensors.index.json` of `directory` (None when there is none), validated: a JSON
    object whose 'weight_map' maps tensor names to plain file names of shards that exist."""
    index = Path(directory) / INDEX_NAME
    if not index.is_file():
        return None
    try:
        data = read_json(index, INDEX_NAME, expect=None)
        weight_map = data["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError
    except (GemmaQuantError, KeyError, TypeError, IndexError):
        raise GemmaQuantError(f"{index}: not a valid index (expected JSON with a 'weight_map' object of "
                              "tensor name -> shard file name)") from None
    names = sorted(set(weight_map.values()))
    shards = [_safe_child(Path(directory), s, str(index)) for s in names]
    for s, p in zip(names, shards):
        if not p.is_file():
            raise GemmaQuantError(f"{index}: names shard '{s}', which is missing from {directory}")
    return ShardIndex(index, weight_map, shards)


class Checkpoint:
    """A Gemma text checkpoint on disk. `tensor(name)` takes HF text names (`model.layers.0...`)."""

    def __init__(self, path: str | Path, source: str | None = None):
        self.path = Path(path)
        self.source = source or str(path)
        if not self.path.exists():
            raise GemmaQuantError(f"{self.path}: no such directory")
        if not self.path.is_dir():
            raise GemmaQuantError(f"{self.path}: expected a model directory, got a file")
        if not any(self.path.iterdir()):
            raise GemmaQuantError(f"{self.path}: the model directory is empty")
        self.config: GemmaConfig = load_config(self.path)
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, tuple[str, str]] = {}  # text name -> (file name, stored name)
        self._mm: dict[str, tuple[str, str]] = {}  # multimodal: vision/projector, layout A name -> same
        self._index_files()
        self._check_shapes()

    # -- discovery ------------------------------------------------------------------------------
    def _index_files(self):
        index = read_shard_index(self.path)
        single = self.path / SINGLE_NAME
        if index is not None:
            for p in index.shards:
                self._files[p.name] = SafetensorsFile(p)
            for name, s in index.weight_map.items():
                if name not in self._files[s].entries:
                    raise GemmaQuantError(f"{index.path}: says '{name}' is in '{s}', but that shard has no such tensor")
        elif single.is_file():
            self._files[SINGLE_NAME] = SafetensorsFile(single)
        else:
            shards = sorted(p.name for p in self.path.glob("*.safetensors"))
            pickles = sorted(p.name for p in self.path.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles and not shards:
                raise GemmaQuantError(
                    f"{self.path}: holds only pickle weights ({', '.join(pickles[:3])}); gemmaquant never "
                    "unpickles (loading a pickle can run arbitrary code). Convert it to safetensors with a "
                    "trusted tool first, or download the repo's safetensors files."
                )
            if not shards:
                raise GemmaQuantError(f"{self.path}: no {SINGLE_NAME} or {INDEX_NAME} found")
            for s in shards:
                self._files[s] = SafetensorsFile(self.path / s)
        for fname, f in self._files.items():
            for stored in f.keys():
                text = text_name(stored)
                if text is None:
                    a = media_name(stored, self.config.generation) if self.config.multimodal else None
                    if a is not None:
                        if a in self._mm:
                            raise GemmaQuantError(f"{self.path}: tensor '{a}' appears twice (under more than one "
                                                  "multimodal name layout)")
                        self._mm[a] = (fname, stored)
                    continue
                if text in self._where:
                    raise GemmaQuantError(f"{self.path}: tensor '{text}' appears in more than one file")
                self._where[text] = (fname, stored)

    def _check_shapes(self):
        expected = self.config.expected_shapes()
        for name, shape in expected.items():
            if name not in self._where:
                raise GemmaQuantError(f"{self.path}: tensor '{name}' is missing (required by config.json)")
            got = self.shape(name)
            if got != shape:
                raise GemmaQuantError(
                    f"{self.path}: tensor '{name}' has shape {list(got)}, config.json implies {list(shape)}"
                )
            dt = self.dtype_name(name)
            if dt not in SOURCE_DTYPES:
                raise GemmaQuantError(
                    f"{self.path}: tensor '{name}' is {dt}; expected a bf16/f16/f32 source checkpoint "
                    "(is this already quantized?)"
                )
        extra = set(self._where) - set(expected) - {"lm_head.weight"} - set(self.config.optional_shapes())
        if extra:
            raise GemmaQuantError(
                f"{self.path}: unexpected tensor '{sorted(extra)[0]}' for a {self.config.model_type} "
                "checkpoint (already quantized, or not a Gemma text model?)"
            )

    # -- access ---------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """The text model's tensors, named as in a text-only checkpoint (`model.layers.0…`)."""
        return list(self._where)

    def vision_names(self) -> list[str]:
        """A multimodal checkpoint's vision tower and projector tensors (Gemma 4: and its audio tower
        and media embedders), in stored order: Gemma 3's by their layout A names
        (`vision_tower.vision_model.…`, `multi_modal_projector.…`), Gemma 4's as stored (multimodal.py)."""
        return list(self._mm)

    def stored_name(self, name: str) -> str:
        """The name the files spell a tensor with (`model.language_model.layers.0…` for a text name
        `model.layers.0…` of a multimodal checkpoint)."""
        return self._file(name)[1]

    def stored_names(self) -> list[str]:
        """Every tensor name as the files spell it."""
        return [s for _, s in (*self._where.values(), *self._mm.values())]

    def _file(self, name: str) -> tuple[SafetensorsFile, str]:
        if name not in self._where and name not in self._mm:
            raise GemmaQuantError(f"{self.path}: no tensor named '{name}'")
        fname, stored = self._where[name] if name in self._where else self._mm[name]
        return self._files[fname], stored

    def file_of(self, name: str) -> Path:
        f, _ = self._file(name)
        return f.path

    def shape(self, name: str) -> tuple[int, ...]:
        f, s = self._file(name)
        return f.shape(s)

    def dtype(self, name: str) -> "torch.dtype":
        f, s = self._file(name)
        return f.dtype(s)

    def dtype_name(self, name: str) -> str:
        """The stored dtype as safetensors names it ('BF16')."""
        f, s = self._file(name)
        return f.dtype_name(s)

    def raw_bytes(self, name: str) -> memoryview:
        f, s = self._file(name)
        return f.raw_bytes(s)

    def tensor(self, name: str) -> "torch.Tensor":
        """A zero-copy view of the stored tensor, in its stored dtype."""
        f, s = self._file(name)
        return f.get(s)

    def weight_nbytes(self) -> int:
        return sum(f.nbytes(s) for f, s in (self._file(n) for n in self._where))

    def side_files(self) -> list[Path]:
        """Non-weight files to carry into an output (configs, tokenizer, templates, licence)."""
        skip = {INDEX_NAME, "README.md", "gemmaquant.json"}  # the card and our marker are made per output
        return sorted(p for p in self.path.iterdir()
                      if p.is_file() and p.suffix != ".safetensors" and p.name not in skip
                      and p.suffix not in PICKLE_SUFFIXES and not p.name.startswith("."))

    @property
    def name(self) -> str:
        return self.path.name if self.source == str(self.path) else self.source.rstrip("/").split("/")[-1]

    def close(self):
        for f in self._files.values():
            f.close()


def resolve_model(model: str) -> Checkpoint:
    """MODEL argument → Checkpoint: a directory, `demo`, or a Hugging Face repo id."""
    if model == "demo":
        from .demo import ensure_demo_checkpoint

        return Checkpoint(ensure_demo_checkpoint(), source="demo")
    p = Path(model).expanduser()
    if p.exists() or model.startswith((".", "/", "~")) or not REPO_ID.match(model):
        return Checkpoint(p)
    return Checkpoint(download(model), source=model)
