"""Gemma 3 vocabularies from tokenizer.json alone (no tokenizer.model), as `convert_hf_to_gguf.py` writes
them, and the tokenizer read back from such a GGUF.

transformers 5's `save_pretrained` writes only tokenizer.json + tokenizer_config.json, so fine-tunes saved
with it have no SentencePiece model. The converter's Gemma 3 then takes its BPE route (`_set_vocab_gpt2`):
* `tokenizer.ggml.model` "gpt2"; `tokenizer.ggml.pre` from the sha256 of the token ids of a fixed probe
  text (with BOS). Gemma 3's hash is registered as "granite-embed-multi-311m", which llama.cpp runs as
  its Gemma pre-tokenizer (escaped whitespace, no byte encoding). Any other hash: the converter refuses.
* tokens: tokenizer.json's vocabulary (added tokens included) by id up to config `vocab_size`, missing
  ids as `[PAD{i}]` UNUSED; added tokens CONTROL when `special` or special-looking, else USER_DEFINED
  with ▁ written as a space; everything else NORMAL (byte tokens too). No scores.
* merges, special ids, add_bos/add_eos and the chat template: the `gguf` package's SpecialVocab.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ...errors import GemmaQuantError
from ...formats.spm_proto import CONTROL, NORMAL, UNUSED, USER_DEFINED

# llama.cpp's fixed pre-tokenizer probe (convert_hf_to_gguf.py `get_vocab_base_pre`, its `chktxt`).
PROBE = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d"
    "\U0001f32b\ufe0f (multiple emojis concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 "
    "33333 333333 3333333 33333333 3.3 3..3 3...3 \u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796"
    "\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785\U0001f601 ?\u6211\u60f3\u5728apple\u5de5\u4f5c1"
    "314151\u5929\uff5e ------======= \u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b"
    "\u0433\u0430\u0440\u0441\u043a\u0438 ''''''```````\"\"\"\"......!!!!!!?????? I've been 'to"
    "ld he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
# probe hash -> tokenizer.ggml.pre, for the tokenizers a Gemma 3 checkpoint carries
KNOWN_PRE = {"789696f5946cc0fc59371f39f6097cafed196b3acded6140432f26bbb1ae1669": "granite-embed-multi-311m"}
_SPACE_MARK = "\u2581"  # ▁


def looks_special(text: str) -> bool:
    """`TextModel.does_token_look_special`: added tokens that must be CONTROL even if not `special`
    (both routes: vocab.py's SentencePiece one and the gpt2 one here)."""
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))
            or (text.startswith("<unused") and text.endswith(">")))


def _load(path: Path):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - the tokenizers library's parse errors
        raise GemmaQuantError(f"{path}: not a tokenizer the tokenizers library reads ({e})") from None


def bpe_vocab(model_dir: Path, vocab_size: int) -> tuple[list[str], list[int], str]:
    """(tokens, token types, tokenizer.ggml.pre) of the converter's gpt2 route."""
    path = Path(model_dir) / "tokenizer.json"
    tok = _load(path)
    chk = hashlib.sha256(str(tok.encode(PROBE).ids).encode()).hexdigest()
    if chk not in KNOWN_PRE:
        raise GemmaQuantError(
            f"{path}: its pre-tokenizer (probe hash {chk[:16]}…) is not Gemma 3's; llama.cpp's converter only "
            "recognizes the Gemma 3 tokenizer without tokenizer.model (add the model's tokenizer.model)")
    vocab = tok.get_vocab(with_added_tokens=True)
    if max(vocab.values()) >= vocab_size:
        raise GemmaQuantError(f"{path}: token id {max(vocab.values())} is outside the model's vocab_size "
                              f"{vocab_size} (a tokenizer of another model?)")
    reverse = {i: t for t, i in vocab.items()}
    added = tok.get_added_tokens_decoder()  # id -> AddedToken
    added_ids = {t.content: i for i, t in added.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        text = reverse[i]
        if text in added_ids:
            info = added.get(i) or added[added_ids[text]]
            if not info.normalized:  # llama.cpp expects added tokens pre-normalized
                text = tok.decode(tok.encode(text, add_special_tokens=False).ids, skip_special_tokens=False)
            if info.special or looks_special(text):
                types.append(CONTROL)
            else:
                text = text.replace(_SPACE_MARK, " ")
                types.append(USER_DEFINED)
        else:
            types.append(NORMAL)
        tokens.append(text)
    return tokens, types, KNOWN_PRE[chk]
