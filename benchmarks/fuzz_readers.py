"""Fuzz the readers gemmaquant owns with hypothesis, for a bounded time each (issue 8 §4).

    python benchmarks/fuzz_readers.py [--seconds 20] [--only gguf_header,safetensors] [--save DIR]

Each reader gets inputs derived from a small valid seed file: byte flips, 32/64-bit fields overwritten
with extreme values (0, 2^31, 2^32-1, 2^60, 2^63-1, 2^64-1, the file size), truncation, insertion and
deletion, so most inputs get past the magic and exercise the length/offset checks. Structured readers
(recipes, config.json, index files, tokenizer_config.json, generation_config.json) get random JSON/TOML
values in place of valid ones, extreme numbers and nesting thousands deep included. The config, tokenizer
and recipe readers are fuzzed through the files a user hands over (`load_config`, `load_tokenizer`, the
GGUF header's vocabulary and metadata, `load_recipe`), not only through their dict-level validators.

Pass: the reader returns or raises GemmaQuantError. Failures: any other exception (kept with its input,
`--save` writes them for tests/reliability/test_fuzz_regressions.py), an example slower than
--max-example-seconds (a hang), or peak RSS growing by more than --max-rss-mb (an allocation the
header should have refused). Prints a markdown table: executions, seconds, failures per reader.
"""

from __future__ import annotations

import argparse
import importlib
import json
import resource
import struct
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gemmaquant.errors import GemmaQuantError  # noqa: E402

INTERESTING = [0, 1, 2, 7, 255, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**60, 2**63 - 1, 2**64 - 1]


# -- seeds -------------------------------------------------------------------------------------------
def seed_gguf(tmp: Path) -> bytes:
    import gguf

    p = tmp / "seed.gguf"
    w = gguf.GGUFWriter(p, "gemma3")
    w.add_uint32("general.alignment", 32)
    w.add_string("general.name", "seed")
    w.add_array("tokenizer.ggml.tokens", ["<pad>", "<eos>", "a"])
    w.add_array("tokenizer.ggml.scores", [0.0, -1.0, -2.0])
    w.add_tensor("token_embd.weight", np.ones((3, 32), dtype=np.float32))
    w.add_tensor("blk.0.attn_q.weight", np.zeros((2, 34), dtype=np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return p.read_bytes()


def seed_safetensors(tmp: Path) -> bytes:
    import torch
    from safetensors.torch import save

    return save({"a": torch.ones(2, 3, dtype=torch.bfloat16), "b": torch.arange(4, dtype=torch.int32),
                 "c": torch.zeros(0)}, metadata={"format": "pt"})


def seed_spm(tmp: Path) -> bytes:
    from gemmaquant.formats.spm_proto import BYTE, CONTROL, NORMAL, UNKNOWN, encode_model_proto

    pieces = [("<pad>", 0.0, CONTROL), ("<eos>", 0.0, CONTROL), ("<bos>", 0.0, CONTROL), ("<unk>", 0.0, UNKNOWN),
              ("<0x00>", 0.0, BYTE), ("\u2581a", -1.0, NORMAL), ("b", -2.0, NORMAL)]
    return encode_model_proto(pieces, unk_id=3, bos_id=2, eos_id=1, pad_id=0, bos_piece="<bos>")


def seed_imatrix_legacy(tmp: Path) -> bytes:
    name = b"blk.0.attn_q.weight"
    return (struct.pack("<ii", 1, len(name)) + name + struct.pack("<ii", 4, 4) + struct.pack("<4f", 1, 2, 3, 4)
            + struct.pack("<ii", 10, 4) + b"data")


def seed_imatrix_gguf(tmp: Path) -> bytes:
    import torch

    from gemmaquant.formats.gguf.imatrix import write_imatrix

    p = tmp / "seed.imatrix.gguf"
    write_imatrix(p, {"blk.0.attn_q.weight": torch.ones(32)}, {"blk.0.attn_q.weight": 4}, datasets=["d"],
                  chunk_count=1, chunk_size=32)
    return p.read_bytes()


# -- byte mutations -------------------------------------------------------------------------------------
def mutated(seed: bytes):
    edit = st.tuples(st.sampled_from(["flip", "u32", "u64", "cut", "insert", "delete", "byte"]),
                     st.integers(0, len(seed)), st.integers(0, 2**64 - 1), st.binary(max_size=16))
    return st.lists(edit, min_size=1, max_size=4).map(lambda edits: apply_edits(seed, edits))


def apply_edits(seed: bytes, edits) -> bytes:
    b = bytearray(seed)
    for kind, pos, v, blob in edits:
        pos = min(pos, len(b))
        big = INTERESTING[v % len(INTERESTING)] if v % 3 else v
        if kind == "flip" and pos < len(b):
            b[pos] ^= 1 << (v % 8)
        elif kind == "byte" and pos < len(b):
            b[pos] = v & 0xFF
        elif kind == "u32":
            b[pos:pos + 4] = struct.pack("<I", big & 0xFFFFFFFF)
        elif kind == "u64":
            b[pos:pos + 8] = struct.pack("<Q", (len(seed) if v % 7 == 0 else big) & (2**64 - 1))
        elif kind == "cut":
            del b[pos:]
        elif kind == "insert":
            b[pos:pos] = blob
        elif kind == "delete":
            del b[pos:pos + 1 + v % 16]
    return bytes(b)


# -- structured inputs -------------------------------------------------------------------------------
json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12),
                           lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                           max_leaves=12)


def _st_file(header, body_len: int, deep: int) -> bytes:
    h = json.dumps(header, default=str).encode() if deep == 0 else b"[" * deep + b"]" * deep
    return struct.pack("<Q", len(h)) + h + b"\0" * body_len


# safetensors headers with random JSON where the dtype / shape / data_offsets / __metadata__ go.
st_entry = st.fixed_dictionaries({}, optional={"dtype": st.sampled_from(["F32", "BF16", "I8", "F8_E4M3", "C64"]) | json_values,
                                               "shape": st.lists(st.integers(-1, 2**40), max_size=3) | json_values,
                                               "data_offsets": st.lists(st.integers(-1, 2**62), max_size=3) | json_values})
st_headers = st.builds(_st_file, st.dictionaries(st.sampled_from(["a", "b", "__metadata__"]), st_entry | json_values,
                                                 max_size=3),
                       st.integers(0, 64), st.sampled_from([0] * 9 + [50_000]))


def _deep(depth: int, kind: str) -> str:
    return ("[" * depth + "]" * depth) if kind == "list" else ('{"a": ' * depth + "1" + "}" * depth)


# JSON text: a random value, or one nested `depth` deep (RecursionError used to escape some readers)
deep_json = st.builds(_deep, st.sampled_from([10, 999, 5000, 100_000]), st.sampled_from(["list", "dict"]))
extreme_numbers = st.sampled_from([0, -1, 2**31, 2**32, 2**40, 2**63, 10**30, 1e308, -1e-6, float("nan"),
                                   float("inf"), 0.5, 1e-30])


def with_random_values(base: dict):
    keys = sorted(base) + ["text_config", "rope_scaling", "rope_parameters", "layer_types", "quantization_config"]
    return st.dictionaries(st.sampled_from(keys), json_values, max_size=4).map(lambda d: {**base, **d})


def _recipe_toml(d: dict) -> str:
    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v) if v == v and abs(v) != float("inf") else "nan"
        return json.dumps(str(v))
    return "".join(f"{k} = {val(v)}\n" for k, v in d.items())


def config_file(base: dict):
    """config.json text: random or extreme values in real keys, or deep nesting."""
    keys = sorted(base)
    edits = st.dictionaries(st.sampled_from(keys), json_values | extreme_numbers, max_size=3)
    return st.one_of(edits.map(lambda d: json.dumps({**base, **d}, default=str)), deep_json,
                     st.builds(lambda k, deep: json.dumps({**base, k: "__DEEP__"}).replace('"__DEEP__"', deep),
                               st.sampled_from(keys), deep_json))


TOKENIZER_CONFIG_KEYS = ["add_bos_token", "bos_token", "eos_token", "added_tokens_decoder", "pad_token",
                         "unk_token", "chat_template", "model_max_length"]
GENERATION_KEYS = ["eos_token_id", "bos_token_id", "top_k", "top_p", "temperature", "repetition_penalty",
                   "min_p", "penalty_last_n"]
decoder_entries = st.dictionaries(st.sampled_from(["0", "2", "-1", "299", "300", "999999999", "x", ""]),
                                  st.fixed_dictionaries({}, optional={"content": json_values | st.text(max_size=6),
                                                                      "special": json_values}) | json_values,
                                  max_size=3)
side_files = st.fixed_dictionaries({}, optional={
    "tokenizer_config.json": st.one_of(
        st.dictionaries(st.sampled_from(TOKENIZER_CONFIG_KEYS), json_values | extreme_numbers | decoder_entries,
                        max_size=4).map(json.dumps), deep_json),
    "generation_config.json": st.one_of(
        st.dictionaries(st.sampled_from(GENERATION_KEYS), json_values | extreme_numbers, max_size=4)
        .map(lambda d: json.dumps(d, default=str)), deep_json),
    "added_tokens.json": st.dictionaries(st.text(max_size=6), json_values | extreme_numbers, max_size=3)
    .map(lambda d: json.dumps(d, default=str)),
})
recipe_nested = st.builds(lambda deep: 'scheme = "q8_0"\nx = ' + deep.replace("{", "[").replace("}", "]")
                          .replace('"a": ', "").replace("1", "") + "\n", deep_json)


recipe_values = st.one_of(st.booleans(), st.integers(-2**63, 2**63 - 1), st.floats(allow_nan=True),
                          st.text(max_size=10), st.sampled_from(["fp8", "q4_k_m", "w4a16", "gptq", "rtn", "awq"]))
recipes = st.dictionaries(st.sampled_from(["scheme", "algorithm", "calib_samples", "calib_len", "alpha", "imatrix",
                                            "model", "description", "calib", "bogus"]), recipe_values, max_size=6)


# -- targets -----------------------------------------------------------------------------------------------
class Targets:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.file = tmp / "input.bin"
        self._ckpt = None

    def _to_file(self, data: bytes, name: str = "input.bin") -> Path:
        p = self.tmp / name
        p.write_bytes(data)
        return p

    def gguf_header(self, data: bytes):
        from gemmaquant.formats.gguf.reader import read_gguf_header

        read_gguf_header(self._to_file(data))

    def gguf_file(self, data: bytes):
        from gemmaquant.formats.gguf.reader import GGUFFile

        GGUFFile(self._to_file(data)).close()

    def safetensors(self, data: bytes):
        from gemmaquant.formats.safetensors import SafetensorsFile

        f = SafetensorsFile(self._to_file(data))
        for k in f.keys():
            f.get(k)
        f.close()

    def spm_proto(self, data: bytes):
        from gemmaquant.formats.spm_proto import decode_model_proto

        decode_model_proto(data)

    def imatrix(self, data: bytes):
        from gemmaquant.formats.gguf.imatrix import read_imatrix

        read_imatrix(self._to_file(data))

    def recipe(self, d: dict):
        from gemmaquant.recipes import load_recipe

        load_recipe(str(self._to_file(_recipe_toml(d).encode(), "r.toml")))

    def recipe_bytes(self, data: bytes):
        from gemmaquant.recipes import load_recipe

        load_recipe(str(self._to_file(data, "r.toml")))

    def config(self, d: dict):
        from gemmaquant.formats.config import config_from_dict

        config_from_dict(d)

    def config_file(self, text: str | bytes):
        from gemmaquant.formats.config import load_config

        self._to_file(text if isinstance(text, bytes) else text.encode(), "config.json")
        load_config(self.tmp / "config.json")

    def _tok_dir(self) -> Path:
        """A tiny model directory (config + 300-piece tokenizer.model + tokenizer.json) for the tokenizer readers."""
        d = self.tmp / "tok"
        if not d.exists():
            from gemmaquant.formats.spm_proto import decode_model_proto
            from gemmaquant.formats.tokenizer_json import tokenizer_json_text
            from tests.reliability import tiny_tokenizer_model

            d.mkdir()
            self.spm = tiny_tokenizer_model(300)
            self.tok_json = tokenizer_json_text(decode_model_proto(self.spm).pieces, unk_id=3, bos_id=2).encode()
            (d / "config.json").write_text(json.dumps({**TINY_CFG, "vocab_size": 300}))
        for f in d.iterdir():
            if f.name != "config.json":
                f.unlink()
        (d / "tokenizer.model").write_bytes(self.spm)
        return d

    def tokenizer_json(self, data: bytes):
        from gemmaquant.formats.tokenizer import load_tokenizer

        d = self._tok_dir()
        (d / "tokenizer.json").write_bytes(data)
        load_tokenizer(d, rows=300).encode("the cat\n\nsat")

    def tokenizer_model(self, data: bytes):
        from gemmaquant.formats.tokenizer import load_tokenizer

        d = self._tok_dir()
        (d / "tokenizer.model").write_bytes(data)
        load_tokenizer(d, rows=300).encode("the cat\n\nsat")

    def tokenizer_side_files(self, files: dict):
        from gemmaquant.formats.tokenizer import load_tokenizer

        d = self._tok_dir()
        (d / "tokenizer.json").write_bytes(self.tok_json)
        for name, text in files.items():
            (d / name).write_text(text)
        load_tokenizer(d, rows=300).encode("the cat\n\nsat")

    def gguf_header_side_files(self, files: dict):
        """The GGUF header build (vocab.py + gguf's own readers of the same files) on random side files."""
        from gemmaquant.formats.config import load_config
        from gemmaquant.export.gguf.header import header_bytes
        from gemmaquant.export.gguf.plan import plan_types, preset

        d = self._tok_dir()
        for name, text in files.items():
            (d / name).write_text(text)
        cfg = load_config(d)
        s = preset("q8_0")
        header_bytes(d, cfg, s, plan_types(cfg, s, False, has_lm_head=False), None)

    def index(self, wm):
        from gemmaquant.formats.checkpoint import Checkpoint

        d = self._tiny_ckpt()
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
        Checkpoint(d).close()

    def seed_tokenizer_json(self) -> bytes:
        """A small tokenizer.json: the 300-piece model's merges and vocabulary, compacted (the mutations
        then land in structure, not only in a 20 kB vocabulary)."""
        self._tok_dir()
        return self.tok_json

    def seed_spm300(self) -> bytes:
        self._tok_dir()
        return self.spm

    def _tiny_ckpt(self) -> Path:
        if self._ckpt is None:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
            from tests.formats.test_checkpoint import write_ckpt

            self._ckpt = self.tmp / "ckpt"
            write_ckpt(self._ckpt)
            (self._ckpt / "model.safetensors").rename(self._ckpt / "shard.safetensors")
        return self._ckpt


TINY_CFG = {"model_type": "gemma3_text", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
            "sliding_window": 4}


def plan(tmp: Path) -> dict:
    """reader -> (strategy, target)."""
    t = Targets(tmp)
    for mod in ("formats.checkpoint", "formats.gguf.imatrix", "recipes", "export.gguf.header", "formats.tokenizer"):
        importlib.import_module("gemmaquant." + mod)  # imported before RSS is measured
    names = st.sampled_from(["shard.safetensors", "../shard.safetensors", "/etc/passwd", "", ".", "..",
                             "missing.safetensors", "a\x00b"])
    weight_maps = st.one_of(json_values, st.dictionaries(st.text(max_size=30), names | json_values, max_size=5),
                            st.builds(lambda extra: {"model.norm.weight": "shard.safetensors", **extra},
                                      st.dictionaries(st.text(max_size=30), names, max_size=3)))
    return {
        "gguf_header (inspect)": (mutated(seed_gguf(tmp)), t.gguf_header),
        "gguf_file (eval/compare)": (mutated(seed_gguf(tmp)), t.gguf_file),
        "safetensors_io": (mutated(seed_safetensors(tmp)), t.safetensors),
        "safetensors_io (header JSON)": (st_headers, t.safetensors),
        "spm_proto": (mutated(seed_spm(tmp)), t.spm_proto),
        "imatrix_io (legacy .dat)": (mutated(seed_imatrix_legacy(tmp)), t.imatrix),
        "imatrix_io (GGUF)": (mutated(seed_imatrix_gguf(tmp)), t.imatrix),
        "recipes (values)": (recipes, t.recipe),
        "recipes (bytes)": (mutated(b'scheme = "q4_k_m"\nalgorithm = "rtn"\ncalib_samples = 8\nalpha = 0.5\n'),
                            t.recipe_bytes),
        "config.json": (with_random_values(TINY_CFG), t.config),
        "config.json (file: values, nesting)": (config_file(TINY_CFG), t.config_file),
        "config.json (file: bytes)": (mutated(json.dumps(TINY_CFG).encode()), t.config_file),
        "checkpoint index": (weight_maps, t.index),
        "tokenizer.json (bytes)": (mutated(t.seed_tokenizer_json()), t.tokenizer_json),
        "tokenizer.model via load_tokenizer": (mutated(t.seed_spm300()), t.tokenizer_model),
        "tokenizer side files (load_tokenizer)": (side_files, t.tokenizer_side_files),
        "tokenizer side files (GGUF header)": (side_files, t.gguf_header_side_files),
        "recipes (nesting)": (recipe_nested.map(str.encode), t.recipe_bytes),
    }


def fuzz(strategy, target, seconds: float, max_example_s: float) -> dict:
    stats = {"runs": 0, "failures": [], "slowest": 0.0}

    @settings(max_examples=100, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def one(data):
        t0 = time.perf_counter()
        try:
            target(data)
        except GemmaQuantError:
            pass
        except Exception as e:  # noqa: BLE001 - anything else is a finding
            where = traceback.extract_tb(e.__traceback__)[-1]
            stats["failures"].append((f"{type(e).__name__} at {Path(where.filename).name}:{where.lineno}",
                                      str(e)[:160], data))
        dt = time.perf_counter() - t0
        stats["slowest"] = max(stats["slowest"], dt)
        if dt > max_example_s:
            stats["failures"].append((f"slow example ({dt:.2f} s)", "", data))
        stats["runs"] += 1

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t_end = time.monotonic() + seconds
    t0 = time.monotonic()
    while time.monotonic() < t_end:
        one()
    stats["seconds"] = time.monotonic() - t0
    stats["rss_growth_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    return stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="time per reader")
    ap.add_argument("--only", default="", help="comma-separated reader name prefixes")
    ap.add_argument("--save", type=Path, help="write failing inputs here")
    ap.add_argument("--max-example-seconds", type=float, default=2.0)
    ap.add_argument("--max-rss-mb", type=float, default=256.0)
    args = ap.parse_args(argv)
    rows, bad = [], 0
    with tempfile.TemporaryDirectory(prefix="gq-fuzz-") as tmp:
        readers = plan(Path(tmp))
        for name, (strategy, target) in readers.items():
            if args.only and not any(name.startswith(p) for p in args.only.split(",")):
                continue
            s = fuzz(strategy, target, args.seconds, args.max_example_seconds)
            kinds = sorted({f[0] for f in s["failures"]})
            if s["rss_growth_mb"] > args.max_rss_mb:
                kinds.append(f"RSS grew {s['rss_growth_mb']:.0f} MB")
            bad += bool(kinds)
            rows.append((name, s["runs"], s["seconds"], len(s["failures"]), s["slowest"], s["rss_growth_mb"], kinds))
            for i, (kind, msg, data) in enumerate(s["failures"][:3]):
                print(f"[{name}] {kind}: {msg}", file=sys.stderr)
                if args.save:
                    args.save.mkdir(parents=True, exist_ok=True)
                    safe = name.split()[0]
                    raw = data if isinstance(data, bytes) else json.dumps(data, default=str).encode()
                    (args.save / f"{safe}-{i}.bin").write_bytes(raw)
    print("| reader | executions | seconds | failures | slowest example (s) | peak RSS growth (MB) | kinds |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for name, runs, secs, nf, slow, rss, kinds in rows:
        print(f"| {name} | {runs} | {secs:.1f} | {nf} | {slow:.3f} | {rss:.1f} | {'; '.join(kinds) or '-'} |")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
