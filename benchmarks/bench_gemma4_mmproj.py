"""Gemma 4's mmproj at real tower sizes: gemmaquant's writer against `convert_hf_to_gguf.py --mmproj` of the
pinned llama.cpp, side by side (wall time and peak RSS of each as its own process, alternating), and
whether the bytes are the same.

    python benchmarks/bench_gemma4_mmproj.py [--outtype f16] [--repeats 3] [--keep DIR]

The checkpoint is a Gemma4ForConditionalGeneration saved by transformers with transformers' default
vision and audio tower configs (Gemma4VisionConfig / Gemma4AudioConfig: 768 × 16 layers, 1024 × 12 layers)
around the tiny E2B-like text model of tests/tiny_gemma4.py, random bf16 weights. Needs the test
dependencies (transformers) and the llama.cpp sources tests/export/gguf/llamacpp_ref.py fetches.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

OURS = """
import sys
from pathlib import Path
from gemmaquant.export.gguf.mmproj import write_mmproj
from gemmaquant.formats.checkpoint import Checkpoint
write_mmproj(Checkpoint(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), force=True)
"""
THEIRS = """
import sys
sys.path.insert(1, sys.argv[4] + "/gguf-py")
sys.path.insert(0, sys.argv[4])
import convert_hf_to_gguf
sys.argv = ["convert_hf_to_gguf.py", sys.argv[1], "--outtype", sys.argv[2], "--outfile", sys.argv[3], "--mmproj"]
convert_hf_to_gguf.main()
"""


def make_checkpoint(out: Path) -> Path:
    import torch
    import transformers

    from tests.tiny_gemma4 import text_config, tiny_tokenizer

    torch.manual_seed(0)
    cfg = transformers.Gemma4Config(text_config=text_config("e2b"), vision_config=transformers.Gemma4VisionConfig(),
                                    audio_config=transformers.Gemma4AudioConfig(),
                                    boi_token_id=265, eoi_token_id=266, image_token_id=267, video_token_id=267,
                                    audio_token_id=268, boa_token_id=268, eoa_token_index=268)
    model = transformers.Gemma4ForConditionalGeneration(cfg)
    with torch.no_grad():
        for n, b in model.named_buffers():  # unclipped bounds are ±inf; finite ones exercise the same path
            if b.dim() == 0 and not torch.isfinite(b):
                b.fill_(-1e4 if n.endswith("_min") else 1e4)
    model.to(torch.bfloat16).save_pretrained(out)
    tiny_tokenizer(out)
    (out / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "Gemma4ImageProcessor", "image_mean": [0.0, 0.0, 0.0], "image_std": [1.0, 1.0, 1.0]}))
    return out


def run(code: str, args: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in GiB) of `python -c code args` as its own process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("NO_LOCAL_GGUF", None)
    with tempfile.TemporaryFile() as log:  # a pipe left unread would stall the converter's logging
        t0 = time.perf_counter()
        p = subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.DEVNULL, stderr=log)
        _, status, usage = os.wait4(p.pid, 0)
        seconds = time.perf_counter() - t0
        if os.waitstatus_to_exitcode(status) != 0:
            log.seek(0)
            raise SystemExit(f"failed: {log.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss / 2**20


def main(argv=None) -> None:
    from tests.export.gguf.llamacpp_ref import llamacpp_tree

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--outtype", default="f16", choices=["f32", "f16", "bf16", "q8_0"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keep", type=Path, help="build the checkpoint here (reused when present)")
    a = ap.parse_args(argv)
    tree = str(llamacpp_tree())
    with tempfile.TemporaryDirectory() as tmp:
        src = a.keep or Path(tmp) / "gemma4-towers"
        if not (src / "config.json").is_file():
            make_checkpoint(src)
        from gemmaquant.formats.checkpoint import Checkpoint

        ck = Checkpoint(src)
        n = sum(math.prod(ck.shape(x)) for x in ck.vision_names())
        ours_out, theirs_out = Path(tmp) / "ours.gguf", Path(tmp) / "theirs.gguf"
        rows = {"gemmaquant": [], "convert_hf_to_gguf.py": []}
        for _ in range(a.repeats):
            rows["gemmaquant"].append(run(OURS, [str(src), a.outtype, str(ours_out)]))
            rows["convert_hf_to_gguf.py"].append(run(THEIRS, [str(src), a.outtype, str(theirs_out), tree]))
        same = ours_out.read_bytes() == theirs_out.read_bytes()
        print(f"towers: {n / 1e6:.0f} M parameters; --outtype {a.outtype}; {ours_out.stat().st_size / 1e6:.1f} MB; "
              f"byte-identical: {same}; load average {os.getloadavg()[0]:.1f}")
        print("| writer | median s | runs (s) | peak RSS GiB |\n|---|---:|---|---:|")
        for k, v in rows.items():
            print(f"| {k} | {statistics.median(s for s, _ in v):.1f} | {', '.join(f'{s:.1f}' for s, _ in v)} "
                  f"| {max(m for _, m in v):.2f} |")


if __name__ == "__main__":
    main()
