"""README.md model card for a quantized output: Hub front matter plus how it was made.

Front matter keys per https://huggingface.co/docs/hub/model-cards#model-card-metadata. `base_model`
must be a Hub repo id, so it is written only when the source is one. Gemma's terms apply to
derivatives, so the licence is carried over from the source card (default `gemma`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_FRONT = re.compile(r"\A---\s*\n(.*?)\n---\s*(\n|\Z)", re.S)


def is_repo_id(s: str | None) -> bool:
    return bool(s) and bool(_REPO_ID.match(s)) and not Path(s).exists()


def source_license(model_dir: Path) -> str | None:
    """`license:` from the source README's front matter, if any."""
    from ..errors import GemmaQuantError
    from ..inputs import read_bytes

    card = model_dir / "README.md"
    try:  # the source's card is optional: unreadable, not a regular file or huge means no licence line
        text = read_bytes(card, "README.md", 1 << 20).decode("utf-8")
    except (GemmaQuantError, UnicodeDecodeError):
        return None
    m = _FRONT.match(text)
    if not m:
        return None
    for line in m.group(1).splitlines():
        k, _, v = line.partition(":")
        if k.strip() == "license" and v.strip():
            return v.strip().strip("'\"")
    return None


def _yaml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid YAML scalar


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    rows = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            rows += _flatten(v, key + ".")
        else:
            rows.append((key, v))
    return rows


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def render_model_card(*, title: str, base_model: str | None, license: str, tags: list[str],
                      scheme_name: str, scheme_summary: str, engine: str, ct_format: str,
                      quantization_config: dict, command: str, algorithm_note: str,
                      calibration_note: str, drift: dict | None, stats: dict[str, str]) -> str:
    front = ["---"]
    if base_model:
        front += [f"base_model: {_yaml_str(base_model)}", "base_model_relation: quantized"]
    front += [f"license: {_yaml_str(license)}", "library_name: transformers", "pipeline_tag: text-generation",
              "tags:"] + [f"- {_yaml_str(t)}" for t in tags] + ["---", ""]
    body = [f"# {title}", ""]
    src = f"[`{base_model}`](https://huggingface.co/{base_model})" if base_model else "a Gemma checkpoint"
    body += [f"Quantized from {src} by gemmaquant: scheme `{scheme_name}`, compressed-tensors "
             f"format `{ct_format}`. {scheme_summary}.", "",
             f"Serve with {engine}: `vllm serve <this directory> --dtype bfloat16`. Gemma 2/3 must run in "
             "bf16 (fp16 overflows). It also loads in transformers with compressed-tensors installed "
             "(`AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)`).", ""]
    body += ["## How it was made", "", "Command:", "", "```", command, "```", "",
             f"- Scheme: `{scheme_name}`", f"- Algorithm: {algorithm_note}",
             f"- Calibration data: {calibration_note}",
             "- Not quantized: the token embedding (tied to the LM head, no `lm_head.weight` is stored) "
             "and all norms, copied byte for byte from the source."]
    body += [f"- {k}: {v}" for k, v in stats.items()]
    body += ["", "Quantization config (also in `config.json`):", "", "```json",
             json.dumps(quantization_config["config_groups"], indent=2), "```", ""]
    body += ["## Measured drift", ""]
    if drift:
        body += ["| metric | value |", "| --- | --- |"]
        body += [f"| {k} | {_fmt(v)} |" for k, v in _flatten(drift)]
    else:
        body += ["Not measured for this export (run `gemmaquant eval` to compare it with the source)."]
    body += ["", "## License", "", f"`{license}`. The terms of the base model apply to this derivative.", ""]
    return "\n".join(front + body)
