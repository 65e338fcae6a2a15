"""README.md model cards for our outputs: Hub front matter, how each output was made, measured drift.

Front matter follows the Hub's conventions for quantized models
(https://huggingface.co/docs/hub/model-cards#model-card-metadata): `base_model` (a Hub repo id, so it
is written only when we know one) with `base_model_relation: quantized`, `quantized_by`, and the
licence of the source, because Gemma's terms apply to derivatives.

A card is rendered from a small JSON document that it carries at its end in an HTML comment (the Hub
does not display it). That is how a later command updates a card it wrote: `compare --card` adds a
drift table, and a second GGUF written into the same folder joins the first one's card (a GGUF repo is
a folder of files plus one README.md). A README.md without that comment is not ours and is never
rewritten.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..formats.hub import front_matter, is_repo_id, valid_repo_id
from ..formats.inputs import human_bytes

CARD_VERSION = 1
MAX_CARD_BYTES = 1 << 20  # a card is a few KB; the Hub's largest READMEs are a few hundred
QUANTIZED_BY = "gemmaquant"
_DATA = re.compile(r"<!-- gemmaquant-card (\{.*\}) -->\s*\Z", re.S)
_HF_CACHE_DIR = re.compile(r"^models--([^/]+?)--([^/]+)$")


# -- what the source says about itself ----------------------------------------------------------
def _read_card_text(path: Path) -> str | None:
    """A README.md's text, or None when it is absent, not a regular file (a FIFO would block a plain
    read), larger than MAX_CARD_BYTES or not UTF-8: cards are optional, and such a file is not ours."""
    from ..errors import GemmaQuantError
    from ..formats.inputs import read_bytes

    try:
        return read_bytes(path, "README.md", MAX_CARD_BYTES).decode("utf-8")
    except (GemmaQuantError, UnicodeDecodeError):
        return None


def source_card(model_dir: Path) -> dict:
    """The front matter of the source's README.md ({} when it has none or cannot be read)."""
    text = _read_card_text(Path(model_dir) / "README.md")
    return front_matter(text) if text is not None else {}


def source_license(model_dir: Path, model_type: str | None = None) -> str:
    """The source card's `license`, else the family's: Gemma 1-3 are under the Gemma terms (`gemma`),
    Gemma 4 under Apache-2.0."""
    lic = source_card(model_dir).get("license")
    if isinstance(lic, str) and lic:
        return lic
    return "apache-2.0" if (model_type or "").startswith("gemma4") else "gemma"


def _single(v) -> str | None:
    if isinstance(v, list):
        return v[0] if len(v) == 1 else None
    return v or None


def base_model_of(source: str, model_dir: Path, config: dict) -> str | None:
    """The Hub repo id our output is a quantization of, when it can be known:
    the repo id the user typed; a directory in the Hugging Face cache (models--org--name/snapshots/..);
    config.json's `_name_or_path` when it is a repo id; a source card that says the source is itself a
    quantization of a repo (`base_model` + `base_model_relation: quantized`, as the demo's does). A card
    whose `base_model` is what the source was fine-tuned from is not used: our output was not quantized
    from that model."""
    if is_repo_id(source):
        return source
    parts = Path(model_dir).resolve().parts
    for i, part in enumerate(parts[:-2]):
        m = _HF_CACHE_DIR.match(part)
        if m and parts[i + 1] == "snapshots":
            return f"{m.group(1)}/{m.group(2)}"
    name = config.get("_name_or_path")
    if isinstance(name, str) and is_repo_id(name):
        return name
    card = source_card(model_dir)
    base = _single(card.get("base_model"))
    if card.get("base_model_relation") == "quantized" and isinstance(base, str) and valid_repo_id(base):
        return base
    return None


# -- the card's data ------------------------------------------------------------------------------
def new_card(*, fmt: str, title: str, base_model: str | None, source: str, license: str,
             tags: list[str]) -> dict:
    """An empty card of one format ("compressed-tensors" or "gguf"); outputs are added to it."""
    return {"version": CARD_VERSION, "format": fmt, "title": title, "base_model": base_model,
            "source": source, "license": license, "tags": tags, "outputs": []}


def add_output(card: dict, entry: dict) -> dict:
    """Add (or replace, by file name) one output: {file, scheme, summary, engine, command, algorithm,
    calibration, stats, types, quantization_config, drift}."""
    entry = {"drift": [], **entry}
    card["outputs"] = [o for o in card["outputs"] if o["file"] != entry["file"]] + [entry]
    card["outputs"].sort(key=lambda o: o["file"])
    return card


def add_drift(card: dict, file: str, measurement: dict) -> bool:
    """Record one `compare` result for `file`; a measurement with the same base, text, ctx, chunks and
    dtype replaces the earlier one. False when the card has no such output."""
    for o in card["outputs"]:
        if o["file"] == file:
            same = ("base", "text_sha256", "ctx", "chunks", "dtype")
            o["drift"] = [d for d in o.get("drift", []) if any(d.get(k) != measurement.get(k) for k in same)]
            o["drift"].append(measurement)
            return True
    return False


def read_card(path: Path) -> dict | None:
    """The data of a card we wrote; None when `path` is absent or not one of ours."""
    text = _read_card_text(path)
    if text is None:
        return None
    m = _DATA.search(text)
    if not m:
        return None
    try:
        data = json.loads(m.group(1))
    except ValueError:
        return None
    return data if isinstance(data, dict) and data.get("version") == CARD_VERSION else None


# -- rendering -----------------------------------------------------------------------------------
def _yaml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid YAML scalar


def _fmt(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def _front(card: dict) -> list[str]:
    lines = ["---"]
    if card["base_model"]:
        lines += [f"base_model: {_yaml_str(card['base_model'])}", "base_model_relation: quantized"]
    lib = "gguf" if card["format"] == "gguf" else "transformers"
    lines += [f"quantized_by: {QUANTIZED_BY}", f"license: {_yaml_str(card['license'])}", f"library_name: {lib}",
              "pipeline_tag: text-generation", "tags:"] + [f"- {_yaml_str(t)}" for t in card["tags"]] + ["---", ""]
    return lines


def _drift_rows(card: dict) -> list[str]:
    rows = []
    for o in card["outputs"]:
        name = card["title"] if o["file"] == "." else f"`{o['file']}`"
        for d in o.get("drift", []):
            rows.append(f"| {name} | {d['base']} | `{Path(d['text']).name}` (sha256 `{d['text_sha256'][:12]}`) | "
                        f"{d['chunks']}×{d['ctx']} | {d['base_ppl']:.4f} | {d['ppl']:.4f} | {d['delta_ppl_pct']:+.2f}% | "
                        f"{d['kl_mean']:.4f} / {d['kl_p99']:.4f} | {d['top1']:.3f} |")
    if not rows:
        return []
    return ["Measured with `gemmaquant compare BASE OUTPUT --card` (llama-perplexity's chunking; KL(base‖output) "
            "from the base's top-128 log-probs + the remainder mass, a lower bound of the exact KL):", "",
            "| output | base | text | chunks × ctx | base ppl | ppl | Δppl | KL mean / p99 | top-1 agreement |",
            "|---|---|---|---|---:|---:|---:|---:|---:|"] + rows


def _drift_section(card: dict) -> list[str]:
    lines = ["## Measured drift", ""]
    table = _drift_rows(card)
    extra = [(o["file"], o["drift_extra"]) for o in card["outputs"] if o.get("drift_extra")]
    if table:
        lines += table + [""]
    for _, values in extra:
        lines += ["| metric | value |", "| --- | --- |"] + [f"| {k} | {_fmt(v)} |" for k, v in values.items()] + [""]
    if not table and not extra:
        target = card["outputs"][0]["file"] if card["outputs"] else "OUTPUT"
        lines += [f"Not measured yet: `gemmaquant compare BASE {target} --card` measures it and writes the "
                  "table here.", ""]
    return lines


def _source(card: dict) -> str:
    """The base model as a link, and the checkpoint it was read from when that is not the repo itself."""
    base, src = card["base_model"], card["source"]
    if not base:
        return f"`{src}`"
    link = f"[`{base}`](https://huggingface.co/{base})"
    return link if src == base else f"{link} (read from the checkpoint `{src}`)"


def _ct_body(card: dict) -> list[str]:
    o = card["outputs"][0]
    src = _source(card)
    body = [f"# {card['title']}", "",
            f"Quantized from {src} by gemmaquant: scheme `{o['scheme']}`, compressed-tensors format "
            f"`{o['ct_format']}`. {o['summary']}.", "",
            f"Serve with {o['engine']}: `vllm serve <this directory> --dtype bfloat16`. Gemma 2/3 must run in "
            "bf16 (fp16 overflows). It also loads in transformers with compressed-tensors installed "
            "(`AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)`).", "",
            "## How it was made", "", "Command:", "", "```", o["command"], "```", "",
            f"- Scheme: `{o['scheme']}`", f"- Algorithm: {o['algorithm']}", f"- Calibration data: {o['calibration']}",
            "- Not quantized: the token embedding (tied to the LM head, no `lm_head.weight` is stored) "
            "and all norms, copied byte for byte from the source."]
    body += [f"- {k}: {v}" for k, v in o.get("stats", {}).items()]
    body += ["", "Quantization config (also in `config.json`):", "", "```json",
             json.dumps(o["config_groups"], indent=2), "```", ""]
    return body


def _gguf_body(card: dict) -> list[str]:
    src = _source(card)
    body = [f"# {card['title']}", "",
            f"GGUF files of {src} for llama.cpp, llamafile, ollama and other ggml engines, written by gemmaquant "
            "(the same bytes as llama.cpp's `convert_hf_to_gguf.py` followed by `llama-quantize` with the same "
            "preset" + ("; files made with `--algorithm gptq` or a size budget keep llama.cpp's block layout and "
                        "types but not its codes or type mix, see their notes" if any(o.get("tuned") for o in card["outputs"])
                        else "") + "). Run one with `llama-cli -m FILE` or `llama-server -m FILE`.", "",
            "## Files", "", "| file | scheme | size | bits/weight | tensor types |", "|---|---|---:|---:|---|"]
    for o in card["outputs"]:
        types = ", ".join(f"{k}×{v}" for k, v in sorted(o.get("types", {}).items(), key=lambda kv: -kv[1]))
        body.append(f"| `{o['file']}` | `{o['scheme']}` ({o['summary']}) | {human_bytes(o['bytes'], 2 if o['bytes'] >= 1e9 else 1)} | "
                    f"{o['bits_per_weight']:.2f} | {types} |")
    body += ["", "## How they were made", ""]
    for o in card["outputs"]:
        body += [f"`{o['file']}`:", "", "```", o["command"], "```", ""]
        body += [f"- {note}" for note in o.get("notes", [])] + ([""] if o.get("notes") else [])
    body += ["Norms stay F32 and, on Gemmas whose row length is not a multiple of 256, some tensors take "
             "llama.cpp's fallback types (Q5_0/Q5_1/Q8_0), exactly as `llama-quantize` does.", ""]
    return body


def render_card(card: dict) -> str:
    body = _gguf_body(card) if card["format"] == "gguf" else _ct_body(card)
    data = json.dumps(card, sort_keys=True).replace("--", "-\\u002d")  # "--" must not end the comment
    lic = ["## License", "", f"`{card['license']}`. The terms of the base model apply to these derivatives.", ""]
    return "\n".join(_front(card) + body + _drift_section(card) + lic + [f"<!-- gemmaquant-card {data} -->", ""])


def render_model_card(*, title: str, base_model: str | None, license: str, tags: list[str],
                      scheme_name: str, scheme_summary: str, engine: str, ct_format: str,
                      quantization_config: dict, command: str, algorithm_note: str,
                      calibration_note: str, drift: dict | None, stats: dict[str, str],
                      source: str = "a Gemma checkpoint") -> str:
    """The card of a compressed-tensors directory (one output, the directory itself: file ".")."""
    card = new_card(fmt="compressed-tensors", title=title, base_model=base_model, source=source,
                    license=license, tags=tags)
    add_output(card, {"file": ".", "scheme": scheme_name, "summary": scheme_summary, "engine": engine,
                      "ct_format": ct_format, "config_groups": quantization_config["config_groups"], "command": command,
                      "algorithm": algorithm_note, "calibration": calibration_note, "stats": stats,
                      "drift_extra": drift})
    return render_card(card)


# -- where cards live, and writing them ----------------------------------------------------------
def card_location(artifact: str | Path) -> tuple[Path, str]:
    """(README.md path, output key): a compressed-tensors directory holds its own card (key "."); a
    GGUF file's card is the README.md of its folder, which lists every GGUF file in it (key: file name)."""
    p = Path(artifact)
    return (p / "README.md", ".") if p.is_dir() else (p.parent / "README.md", p.name)


def gguf_card_target(readme: Path, title: str) -> dict | None:
    """The card a new GGUF joins: None for a new card, the existing data when README.md is a GGUF card
    of ours for the same model. Anything else at that path is refused before any work is done."""
    from ..errors import OutputError

    if not (readme.exists() or readme.is_symlink()):
        return None
    card = read_card(readme)
    if card is None:
        raise OutputError(f"{readme}: exists and is not a gemmaquant model card; --card never replaces it "
                          "(move it away, or write the GGUF into another folder)")
    if card.get("format") != "gguf" or card.get("title") != title:
        raise OutputError(f"{readme}: is the gemmaquant card of {card.get('title')!r}, not of {title!r}; "
                          "write the GGUF into a folder of its own")
    return card


def write_card(readme: Path, card: dict, inputs=()) -> None:
    """Replace README.md (a card of ours, or none yet) with `card`, all or nothing. `inputs`: what the
    command read (the output guard keeps the card off them, as it keeps every output)."""
    from .atomic import atomic_output

    text = render_card(card)
    with atomic_output(readme, force=True, kind="file", inputs=inputs, option="--card") as tmp:
        tmp.write_text(text, encoding="utf-8")
