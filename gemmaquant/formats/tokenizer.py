"""The checkpoint's tokenizer: tokenizer.json through the `tokenizers` library, or tokenizer.model
converted in memory when that is all a checkpoint has. No transformers or sentencepiece at run time.

`encode` with parse_special=True (the default, as transformers' tokenizers do) turns control-token
text such as "<start_of_turn>" into its id; parse_special=False treats it as plain text, as
llama.cpp's `llama_tokenize(..., parse_special=false)` and llama-perplexity do. User-defined pieces
(runs of spaces, newlines, tabs; "<table>") always match whole, in both modes and in llama.cpp.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import GemmaQuantError
from .spm_proto import decode_model_proto
from .tokenizer_json import tokenizer_json_text


# llama.cpp's vocab loader promotes pieces with these texts to CONTROL whatever their stored type
# (`src/llama-vocab.cpp`, its end-of-generation list, matched by string), so with
# parse_special=false it tokenizes them as plain text. Gemma's vocabulary has "</s>" (id 212) as a
# user-defined piece: HF matches it whole, llama.cpp (parse_special=false) spells it "</", "s", ">".
LLAMA_CPP_FORCED_CONTROL = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>",
)


class Tokenizer:
    def __init__(self, backend, *, bos_id: int | None, eos_ids: list[int], add_bos: bool, source: Path):
        from tokenizers import AddedToken

        self._tok = backend  # tokenizers.Tokenizer, with its post-processor removed (we add BOS)
        # Mark llama.cpp's forced-control pieces special (in memory only: the files stay as Gemma's),
        # so parse_special=False leaves them as text exactly as llama.cpp does.
        added = backend.get_added_tokens_decoder()
        promote = [AddedToken(t.content, special=True, normalized=False, single_word=t.single_word,
                              lstrip=t.lstrip, rstrip=t.rstrip)
                   for t in added.values() if t.content in LLAMA_CPP_FORCED_CONTROL and not t.special]
        if promote:
            backend.add_special_tokens(promote)
        self.bos_id = bos_id
        self.eos_ids = eos_ids
        self.add_bos = add_bos
        self.source = source

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = True) -> list[int]:
        """Token ids of `text`; add_bos None → the checkpoint's default (tokenizer_config add_bos_token)."""
        if add_bos is None:
            add_bos = self.add_bos
        self._tok.encode_special_tokens = not parse_special
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos:
            if self.bos_id is None:
                raise GemmaQuantError(f"{self.source}: the tokenizer has no BOS token to add")
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids, skip_special: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)


def _read_json(path: Path) -> dict:
    from .inputs import read_json

    return read_json(path, path.name)


# Embedding rows a checkpoint may have beyond its tokenizer's tokens: unused padding (Gemma 3's
# multimodal configs: 262,208 rows for 262,145 tokens). More tokens than rows, or many more rows
# than tokens, means the tokenizer belongs to another model.
VOCAB_PAD_ROWS = 1024


def check_vocab_rows(tokens: int, rows: int, where) -> None:
    """One line naming both numbers when a tokenizer does not fit the embedding table."""
    if tokens > rows or rows - tokens > VOCAB_PAD_ROWS:
        raise GemmaQuantError(f"{where}: the tokenizer has {tokens:,} tokens but the embedding has {rows:,} rows "
                              f"(a tokenizer of another model?); allowed: as many rows as tokens, or up to "
                              f"{VOCAB_PAD_ROWS} unused rows more")


def _token_text(value) -> str | None:
    """tokenizer_config writes special tokens as "<bos>" or as {"content": "<bos>", ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def load_tokenizer(model_dir: str | Path, rows: int | None = None) -> Tokenizer:
    """tokenizer.json if present, else tokenizer.model; BOS/EOS from tokenizer_config.json and
    generation_config.json when present. `rows`: the model's embedding rows, checked against the
    tokenizer's size (`check_vocab_rows`)."""
    from tokenizers import Tokenizer as HFTokenizer

    from .inputs import MAX_JSON_BYTES, read_bytes

    model_dir = Path(model_dir)
    tj, tm = model_dir / "tokenizer.json", model_dir / "tokenizer.model"
    spm_bos = spm_eos = None
    if tj.exists():
        data = read_bytes(tj, "tokenizer.json", MAX_JSON_BYTES)
        try:
            backend = HFTokenizer.from_str(data.decode("utf-8"))
        except Exception as e:  # tokenizers raises its own exception types with a message
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise GemmaQuantError(f"{tj}: not a valid tokenizer.json ({msg})") from None
        source = tj
    elif tm.exists():
        spm = decode_model_proto(read_bytes(tm, "tokenizer.model", MAX_JSON_BYTES), what=str(tm))
        if spm.model_type != 2:
            raise GemmaQuantError(f"{tm}: SentencePiece model type {spm.model_type} is not supported; "
                                  "Gemma tokenizers are BPE (2)")
        ids = {n: i for i, (n, _, _) in enumerate(spm.pieces)}
        spm_bos, spm_eos = ids.get(spm.bos_piece), ids.get(spm.eos_piece)
        text = tokenizer_json_text(spm.pieces, unk_id=spm.unk_id, bos_id=spm_bos or 0, add_bos=False)
        backend = HFTokenizer.from_str(text)
        source = tm
    else:
        raise GemmaQuantError(f"{model_dir}: no tokenizer (expected tokenizer.json or tokenizer.model)")
    # BOS is added by encode() itself, as the config says, not by the tokenizer's own template.
    backend.post_processor = None

    config = _read_json(model_dir / "tokenizer_config.json") if (model_dir / "tokenizer_config.json").exists() else {}
    add_bos = config.get("add_bos_token", True)
    if not isinstance(add_bos, bool):
        raise GemmaQuantError(f"{model_dir / 'tokenizer_config.json'}: add_bos_token must be true or false, got {add_bos!r}")
    bos_id = _lookup(backend, _token_text(config.get("bos_token")), spm_bos, "<bos>")
    eos_ids = [i for i in [_lookup(backend, _token_text(config.get("eos_token")), spm_eos, "<eos>")] if i is not None]
    gen = model_dir / "generation_config.json"
    if gen.exists():
        eos = _read_json(gen).get("eos_token_id")
        for i in eos if isinstance(eos, list) else [eos]:
            if isinstance(i, int) and i not in eos_ids:
                eos_ids.append(i)
    tok = Tokenizer(backend, bos_id=bos_id, eos_ids=eos_ids, add_bos=add_bos, source=source)
    if rows is not None:
        check_vocab_rows(tok.vocab_size, rows, source)
    return tok


def _lookup(backend, name: str | None, fallback: int | None, default_piece: str) -> int | None:
    if name is not None:
        return backend.token_to_id(name)
    if fallback is not None:
        return fallback
    return backend.token_to_id(default_piece)
