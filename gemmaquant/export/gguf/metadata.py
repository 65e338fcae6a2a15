"""The GGUF key/value list for Gemma 1/2/3/4, in the order the llama.cpp pipeline leaves it.

`convert_hf_to_gguf.py` adds keys in this order (`ModelBase.prepare_metadata`, docs/gguf-gemma.md §1.2-1.3):
`general.architecture`, `general.type`, the model-card/name keys (`gguf.Metadata.set_gguf_meta_model`:
sampling defaults from generation_config.json, name, basename, size_label, licence, tags, ...), the
architecture's hyperparameters ending with `general.file_type`, `general.quantization_version`, then
the tokenizer keys. `llama-quantize` copies that list, re-sets quantization_version and file_type (a
re-set key moves to the end) and appends `quantize.imatrix.*` when it used an importance matrix. We
write that final order for every preset, so each output equals convert(bf16) + llama-quantize.

Keys go into a `gguf.GGUFWriter`, whose `add_*` methods fix the value types exactly as the converter's.
A duplicate add keeps the key's first position (the writer's dict), which is what Gemma 3's
overwrite-after-super() relies on.
"""

from __future__ import annotations

from pathlib import Path

import gguf

from ...formats.config import FULL, GENERATIONS, SLIDING, GemmaConfig

ARCH = {g: arch for g, (_, arch) in GENERATIONS.items()}  # generation -> general.architecture
QUANTIZATION_VERSION = 2  # GGML_QNT_VERSION
IMATRIX_KEYS = ("quantize.imatrix.file", "quantize.imatrix.dataset",
                "quantize.imatrix.entries_count", "quantize.imatrix.chunks_count")


def display_dir_name(model_dir: Path) -> str:
    """The directory name the converter derives general.name from. A Hugging Face cache snapshot
    (`models--org--name/snapshots/<sha>`) would give the commit hash, so use the repo name there."""
    model_dir = Path(model_dir)
    if model_dir.parent.name == "snapshots" and model_dir.parent.parent.name.startswith("models--"):
        return model_dir.parent.parent.name.split("--")[-1]
    return model_dir.name


def general_metadata(model_dir: Path, total_params: int, experts: tuple[int, int, int] = (0, 0, 0)) -> gguf.Metadata:
    """`gguf.Metadata.load` for `model_dir`, with the name heuristics run on `display_dir_name`.
    `experts`: (shared, per-expert, expert count) parameters of a mixture of experts, which the
    converter's size label reads ("16x211K"); zeros for a dense model."""
    model_dir = Path(model_dir)
    meta = gguf.Metadata.load(None, model_dir, None, total_params)
    # The converter's own gguf-py (newer than PyPI gguf 0.19) also reads HF's name for it.
    gen = gguf.Metadata.load_generation_config(model_dir)
    if "penalty_repeat" not in gen and "repetition_penalty" in gen:
        meta.sampling_penalty_repeat = gen["repetition_penalty"]
    shown = display_dir_name(model_dir)
    if shown != model_dir.name:
        alt = gguf.Metadata.apply_metadata_heuristic(
            gguf.Metadata(), gguf.Metadata.load_model_card(model_dir),
            gguf.Metadata.load_hf_parameters(model_dir), Path(shown), total_params)
        for field in ("name", "organization", "basename", "finetune", "version", "size_label"):
            setattr(meta, field, getattr(alt, field))
    if meta.name is None:  # ModelBase.prepare_metadata's last resort
        meta.name = shown
    if meta.size_label is None and total_params > 0:
        shared, per_expert, n_expert = experts if experts[2] else (total_params, 0, 0)
        meta.size_label = gguf.size_label(total_params, shared, per_expert, n_expert)
    return meta


def add_hparams(w: gguf.GGUFWriter, c: GemmaConfig, file_type: int) -> None:
    """`{Gemma,Gemma2,Gemma3}Model.set_gguf_parameters` (Gemma 3 runs TextModel's first)."""
    if c.generation in (1, 2):
        w.add_context_length(c.max_position_embeddings)
        w.add_embedding_length(c.hidden_size)
        w.add_block_count(c.num_hidden_layers)
        w.add_feed_forward_length(c.intermediate_size)
        w.add_head_count(c.num_attention_heads)
        w.add_head_count_kv(c.num_key_value_heads)
        w.add_layer_norm_rms_eps(c.rms_norm_eps)
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
        w.add_file_type(file_type)
        if c.generation == 2:
            w.add_attn_logit_softcapping(c.attn_logit_softcapping)
            w.add_final_logit_softcapping(c.final_logit_softcapping)
            w.add_sliding_window(c.sliding_window)
        return
    if c.generation == 4:
        _add_gemma4_hparams(w, c, file_type)
        return
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    if c.rope_scaling_factor != 1.0:  # linear scaling on global layers (Gemma 3 4B and up: 8)
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(c.rope_scaling_factor)
    w.add_rope_freq_base(c.rope_theta)
    w.add_rope_freq_base_swa(c.rope_local_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_file_type(file_type)
    if c.final_logit_softcapping:
        w.add_final_logit_softcapping(c.final_logit_softcapping)
    if any(t != FULL for t in c.layer_types):  # converter: unless sliding_window_pattern == 1
        w.add_sliding_window(c.sliding_window)


def _add_gemma4_hparams(w: gguf.GGUFWriter, c: GemmaConfig, file_type: int) -> None:
    """`Gemma4Model.set_gguf_parameters` after Gemma3Model's: re-added keys (feed-forward and kv-head
    arrays, the full-layer key/value length) keep the position of their first add."""
    full, swa = c.head_dim_of_kind(FULL), c.head_dim_of_kind(SLIDING) if SLIDING in c.layer_types else c.head_dim
    n = c.num_hidden_layers
    w.add_block_count(n)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    if c.use_double_wide_mlp:  # written as an array even when no layer is shared
        w.add_feed_forward_length([c.intermediate_of(i) for i in range(n)])
    else:
        w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    kv_full = c.kv_heads_of(c.layer_types.index(FULL))
    if kv_full != c.num_key_value_heads:  # a full-layer override in per_layer_config (k_eq_v models)
        w.add_head_count_kv([c.kv_heads_of(i) for i in range(n)])
    else:
        w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_theta)
    w.add_rope_freq_base_swa(c.rope_local_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    if c.is_moe:
        w.add_expert_count(c.num_experts)
        w.add_expert_used_count(c.top_k_experts)
    w.add_key_length(full)
    w.add_value_length(full)
    w.add_file_type(file_type)
    if c.final_logit_softcapping:
        w.add_final_logit_softcapping(c.final_logit_softcapping)
    w.add_sliding_window(c.sliding_window)
    w.add_shared_kv_layers(c.num_kv_shared_layers)
    w.add_embedding_length_per_layer_input(c.hidden_size_per_layer_input)
    w.add_sliding_window_pattern([t == SLIDING for t in c.layer_types])
    w.add_key_length_swa(swa)
    w.add_value_length_swa(swa)
    if c.is_moe:
        w.add_expert_feed_forward_length(c.moe_intermediate_size)
    w.add_rope_dimension_count(full)  # partial rotation lives in rope_freqs
    w.add_rope_dimension_count_swa(swa)


def add_model_kvs(w: gguf.GGUFWriter, model_dir: Path, c: GemmaConfig, *, file_type: int,
                  total_params: int, experts: tuple[int, int, int] = (0, 0, 0)) -> None:
    """Everything before the tokenizer keys, in the converter's order (architecture is already in)."""
    w.add_type(gguf.GGUFType.MODEL)
    general_metadata(model_dir, total_params, experts).set_gguf_meta_model(w)
    add_hparams(w, c, file_type)
    w.add_quantization_version(QUANTIZATION_VERSION)


def finish_like_llama_quantize(w: gguf.GGUFWriter, file_type: int, imatrix_meta: dict | None,
                               extra_kv: dict | None = None) -> None:
    """Move quantization_version then file_type to the end and append the imatrix keys, as
    `llama_model_quantize_impl` + tools/quantize do (values up to 127 bytes, like its strncpy).
    `extra_kv` (key -> str or list of str): gemmaquant's own keys after them (optimized files only)."""
    kv = w.kv_data[0]
    kv.pop(gguf.Keys.General.QUANTIZATION_VERSION, None)
    kv.pop(gguf.Keys.General.FILE_TYPE, None)
    w.add_quantization_version(QUANTIZATION_VERSION)
    w.add_file_type(file_type)
    if imatrix_meta is not None:
        _imatrix_keys(w, imatrix_meta)
    for key, value in (extra_kv or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, list(value))


def _imatrix_keys(w: gguf.GGUFWriter, imatrix_meta: dict) -> None:
    if imatrix_meta.get("file"):
        w.add_string(IMATRIX_KEYS[0], _c_str127(imatrix_meta["file"]))
    if imatrix_meta.get("dataset"):
        w.add_string(IMATRIX_KEYS[1], _c_str127(imatrix_meta["dataset"]))
    w.add_uint32(IMATRIX_KEYS[2], int(imatrix_meta["entries_count"]))
    if imatrix_meta.get("chunks_count"):
        w.add_uint32(IMATRIX_KEYS[3], int(imatrix_meta["chunks_count"]))


def _c_str127(s: str) -> str:
    """strncpy(dst, s, 127): at most 127 bytes (a cut inside a UTF-8 sequence is dropped)."""
    return s.encode("utf-8")[:127].decode("utf-8", errors="ignore")
