"""`gemmaquant imatrix --llama-chunks`: llama-imatrix's chunking (tools/imatrix/imatrix.cpp).

llama-imatrix tokenizes the whole text with BOS, takes len // n_ctx consecutive chunks (at most
--chunks), overwrites each chunk's first token with BOS, and counts every token of every chunk.
Agreement of the statistics with llama-imatrix itself on the demo model (r >= 0.999998 on all 126
tensors) is measured by benchmarks/bench_imatrix_agreement.py; this checks the CLI's arithmetic.
"""

from __future__ import annotations

import gguf

from gemmaquant.calib.data import load_tokenizer_for
from gemmaquant.calib.imatrix import llama_chunks

from ..reliability import run_cli
from ..evaluate.test_artifact import tiny_hf_dir


def test_llama_chunks_cuts_like_llama_imatrix():
    ids = list(range(100, 171))  # BOS already first in real use; 71 tokens -> 2 chunks of 32
    c = llama_chunks(ids, 32, bos_id=2)
    assert c.shape == (2, 32) and c[:, 0].tolist() == [2, 2]
    assert c[0, 1:].tolist() == ids[1:32] and c[1, 1:].tolist() == ids[33:64]  # ids[32] is overwritten
    assert llama_chunks(ids, 32, 2, n_chunks=1).shape == (1, 32)


def test_imatrix_cli_llama_chunks(tmp_path, capsys):
    d = tmp_path / "m"
    tiny_hf_dir(d)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"p{i % 250 + 260}" for i in range(300)))
    n_tokens = len(load_tokenizer_for(d).encode(text.read_text(), add_bos=True, parse_special=True))
    out = tmp_path / "imatrix.gguf"
    res = run_cli(["imatrix", d, "--calib", text, "--calib-len", "64", "--calib-samples", "100",
                   "--llama-chunks", "-o", out], capsys)
    assert res.code == 0, res.stderr
    chunks = n_tokens // 64
    r = gguf.GGUFReader(out)
    assert r.fields["imatrix.chunk_count"].contents() == chunks
    assert r.fields["imatrix.chunk_size"].contents() == 64
    counts = {t.name: float(t.data[0]) for t in r.tensors if t.name.endswith(".counts")}
    assert counts and set(counts.values()) == {float(chunks * 64)}

    short = run_cli(["imatrix", d, "--calib", text, "--calib-len", "4096", "--llama-chunks",
                     "-o", tmp_path / "x.gguf"], capsys)
    assert short.code == 2 and "no chunk of 4096" in short.stderr
    assert not (tmp_path / "x.gguf").exists()
