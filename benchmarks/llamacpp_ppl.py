"""llama.cpp itself (through llama-cpp-python's C API) run by llama-perplexity's method.

Same chunking as llama-perplexity: llama.cpp's own tokenizer with BOS, chunks of ctx tokens, BOS in
front of each chunk, logits requested only for the second half, tokens ctx/2+1 .. ctx-1 scored.
Used by the benchmarks to compare our forward pass with llama.cpp's on the same GGUF and text.
"""

from __future__ import annotations

import ctypes
import math
import time

import numpy as np


class LlamaCpp:
    def __init__(self, gguf_path: str, n_ctx: int = 512, n_threads: int = 2):
        import llama_cpp as L

        self.L = L
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        self.model = L.llama_model_load_from_file(str(gguf_path).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf_path}")
        cp = L.llama_context_default_params()
        cp.n_ctx = cp.n_batch = cp.n_ubatch = n_ctx
        cp.n_threads = cp.n_threads_batch = n_threads
        self.ctx = L.llama_init_from_model(self.model, cp)
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.bos = L.llama_vocab_bos(self.vocab)
        self.n_ctx = n_ctx
        self.batch = L.llama_batch_init(n_ctx, 0, 1)

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        data = text.encode("utf-8")
        buf = (self.L.llama_token * (len(data) + 8))()
        n = self.L.llama_tokenize(self.vocab, data, len(data), buf, len(buf), add_bos, False)
        if n < 0:
            raise RuntimeError("tokenize buffer too small")
        return list(buf[:n])

    def chunk_logits(self, tokens: list[int], first: int) -> np.ndarray:
        """float32 logits [len - first, n_vocab] for positions first .. len-1."""
        L, b = self.L, self.batch
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
        b.n_tokens = len(tokens)
        for i, t in enumerate(tokens):
            b.token[i] = t
            b.pos[i] = i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = 1 if i >= first else 0
        if L.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        out = np.empty((len(tokens) - first, self.n_vocab), dtype=np.float32)
        for j, i in enumerate(range(first, len(tokens))):
            ptr = L.llama_get_logits_ith(self.ctx, i)
            out[j] = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), (self.n_vocab,))
        return out

    def perplexity(self, text: str, ctx: int, n_chunks: int | None = None) -> dict:
        tokens = self.tokenize(text)
        n = len(tokens) // ctx if not n_chunks else min(n_chunks, len(tokens) // ctx)
        first = ctx // 2
        nll = nll2 = 0.0
        count = 0
        times = []
        for c in range(n):
            chunk = tokens[c * ctx:(c + 1) * ctx]
            chunk[0] = self.bos
            t0 = time.perf_counter()
            logits = self.chunk_logits(chunk, first)
            times.append(time.perf_counter() - t0)
            lg = logits[:-1].astype(np.float64)
            lg -= lg.max(axis=1, keepdims=True)
            logp = lg - np.log(np.exp(lg).sum(axis=1, keepdims=True))
            tgt = np.array(chunk[first + 1:])
            v = -logp[np.arange(len(tgt)), tgt]
            nll += v.sum()
            nll2 += (v * v).sum()
            count += len(v)
        mean = nll / count
        var = nll2 / count - mean * mean
        ppl = math.exp(mean)
        return {"ppl": ppl, "ppl_stderr": math.sqrt(var / (count - 1)) * ppl, "tokens_scored": count,
                "chunks": n, "chunk_seconds": times, "tokens": tokens}

    def close(self):
        self.L.llama_batch_free(self.batch)
        self.L.llama_free(self.ctx)
        self.L.llama_model_free(self.model)
