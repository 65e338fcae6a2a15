"""Streaming quantization (issue 6): memory flat in model size, pages released, the disk-space check.

The memory tests quantize two checkpoints of the same width in real `gemmaquant quantize` subprocesses,
one with 1 decoder layer and one with 8 (≈ 250 MB more bf16 weights), and read each child's peak RSS
from the kernel (VmHWM). A writer that keeps what it read, or reads its output back through a
mapping, grows by the extra source/output bytes; a streaming one by no more than a couple of tensors.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gemmaquant.errors import OutputError

pytestmark = pytest.mark.subprocess  # peak memory of real quantize processes

REPO = Path(__file__).resolve().parents[1]
HIDDEN, INTER, HEADS, KV, HEAD_DIM, VOCAB = 1024, 4096, 4, 2, 256, 512
LARGEST_BF16 = INTER * HIDDEN * 2  # gate/up/down: 8 MB
# Allocator, import and page-cache noise between two runs of the same command: 16-23 MiB on a quiet machine, 71 MiB
# once for fp8 in a fresh CI venv at load 8-12. Still well under the 210 MiB the 8-layer model adds, which a
# writer holding the model would add at least (the test checks the bound stays below that).
SLACK = 96 << 20


def _config(layers: int) -> dict:
    return {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "vocab_size": VOCAB,
            "hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": layers,
            "num_attention_heads": HEADS, "num_key_value_heads": KV, "head_dim": HEAD_DIM,
            "query_pre_attn_scalar": HEAD_DIM, "sliding_window": 64, "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "max_position_embeddings": 2048, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
            "hidden_activation": "gelu_pytorch_tanh", "torch_dtype": "bfloat16"}


def _wide_checkpoint(d: Path, layers: int) -> Path:
    """A random bf16 Gemma 2 checkpoint, 2 shards with an index (as the hub shards big models)."""
    from safetensors.torch import save_file

    from gemmaquant.formats.config import config_from_dict

    from .reliability import tiny_tokenizer_model

    d.mkdir(parents=True)
    cfg = _config(layers)
    shapes = config_from_dict(cfg, "test").expected_shapes()
    g = torch.Generator().manual_seed(layers)
    names = list(shapes)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        tensors = {n: (torch.randn(shapes[n], generator=g) * (0.05 if n.endswith("norm.weight") else 0.02))
                   .to(torch.bfloat16) for n in part}
        save_file(tensors, str(d / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "tokenizer.model").write_bytes(tiny_tokenizer_model(VOCAB))
    return d


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("wide")
    return {n: _wide_checkpoint(root / f"wide-{n}L", n) for n in (1, 8)}


# VmHWM is the peak RSS of the process image since exec: ru_maxrss (wait4, /usr/bin/time) would also
# count the pytest process's pages that the forked child held before exec.
_RUN = """
import atexit, sys
def hwm():
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    sys.stderr.write("VmHWM-bytes %d\\n" % (int(line.split()[1]) * 1024))
atexit.register(hwm)
from gemmaquant.cli.app import main
sys.argv = ["gemmaquant"] + sys.argv[1:]
main()
"""


def _quantize(model: Path, scheme: str, out: Path) -> tuple[int, dict]:
    """Run the CLI in a child; return (its peak RSS in bytes as the kernel counted it, its summary)."""
    r = subprocess.run([sys.executable, "-c", _RUN, "quantize", str(model), "--scheme", scheme, "-o", str(out),
                        "--json"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    hwm = [int(ln.split()[1]) for ln in r.stderr.splitlines() if ln.startswith("VmHWM-bytes ")]
    return hwm[-1], json.loads(r.stdout)


def _tree_bytes(p: Path) -> int:
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


@pytest.mark.parametrize("scheme,out_name", [("bf16", "m.gguf"), ("fp8", "m-fp8")])
def test_peak_rss_flat_in_model_size(wide, tmp_path, scheme, out_name):
    rss = {}
    for n, model in wide.items():
        rss[n], summary = _quantize(model, scheme, tmp_path / f"{n}" / out_name)
        assert summary["output_bytes"] == _tree_bytes(tmp_path / f"{n}" / out_name)
    grown = sum(8 * _tree_bytes(p) for p in wide[8].glob("*.safetensors")) // 8 - \
        sum(_tree_bytes(p) for p in wide[1].glob("*.safetensors"))
    bound = 2 * LARGEST_BF16 + SLACK
    assert grown > bound + (64 << 20)  # the bigger model really is bigger: the bound below means something
    assert rss[8] - rss[1] <= bound, (f"{scheme}: peak RSS grew {(rss[8] - rss[1]) >> 20} MiB for "
                                      f"{grown >> 20} MiB more weights (1 layer {rss[1] >> 20} MiB, "
                                      f"8 layers {rss[8] >> 20} MiB); bound {bound >> 20} MiB")


def test_estimate_bounds_the_real_output(wide, tmp_path):
    """The disk check's estimate is at least the bytes actually written, and close to them."""
    from gemmaquant.formats.checkpoint import Checkpoint
    from gemmaquant.pipeline import QuantizeOptions, estimate_output_bytes, run_quantize
    from gemmaquant.schemes import get_scheme

    ckpt = Checkpoint(wide[1])
    for scheme, out in (("q8_0", tmp_path / "m.gguf"), ("int8-w8a16", tmp_path / "m-int8")):
        s = get_scheme(scheme)
        est = estimate_output_bytes(ckpt, s, QuantizeOptions())
        run_quantize(ckpt, s, out, QuantizeOptions())
        real = _tree_bytes(out)
        assert real <= est <= real + (2 << 20), (scheme, real, est)


def test_release_pages_drops_rss_and_keeps_data(wide):
    from gemmaquant.formats.safetensors import SafetensorsFile, release_pages, stream_bytes

    shard = sorted(wide[8].glob("*.safetensors"))[-1]

    def resident() -> int:
        """Resident bytes of this file's mapping (not the whole process: other memory moves too)."""
        lines = Path("/proc/self/smaps").read_text().splitlines()
        for i, line in enumerate(lines):
            head = line.split()
            if "-" in head[0] and int(head[0].split("-")[0], 16) == f._base:
                rss = next(ln for ln in lines[i + 1:] if ln.startswith("Rss:"))
                return int(rss.split()[1]) * 1024
        raise AssertionError("mapping not found in /proc/self/smaps")

    with SafetensorsFile(shard) as f:
        name = max(f.keys(), key=f.nbytes)
        t = f.get(name)
        before = resident()
        want = t.float().sum()  # touches every page of the tensor
        touched = resident()
        assert touched - before >= 0.9 * f.nbytes(name)
        assert release_pages(t) == f.nbytes(name)
        assert touched - resident() >= 0.9 * f.nbytes(name)
        assert t.float().sum() == want  # pages fault back in from the file, unchanged
        n = sum(len(part) for part in stream_bytes(f.raw_bytes(name), chunk=1 << 20))
        assert n == f.nbytes(name) and resident() - before < f.nbytes(name) // 2
    heap = torch.ones(1 << 20)
    assert release_pages(heap) == 0 and bool((heap == 1).all())  # never touches non-mapped memory


def test_disk_full_is_refused_before_writing(wide, tmp_path, monkeypatch):
    from gemmaquant.formats.checkpoint import Checkpoint
    from gemmaquant.pipeline import QuantizeOptions, run_quantize
    from gemmaquant.schemes import get_scheme

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=10 << 20))
    out = tmp_path / "sub" / "m.gguf"  # parent does not exist yet: its existing ancestor is checked
    with pytest.raises(OutputError) as e:
        run_quantize(Checkpoint(wide[1]), get_scheme("q8_0"), out, QuantizeOptions())
    msg = str(e.value)
    assert str(out) in msg and "not enough disk space" in msg and f"({10 << 20} bytes) free" in msg
    assert not (tmp_path / "sub").exists() and list(tmp_path.iterdir()) == []
