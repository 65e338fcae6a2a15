"""Do the calibration statistics depend on the thread count? Runs the statistics pass (`run_layers`, every
Linear input's XᵀX, float layers) over a checkpoint on 1 and then 2 torch threads and prints the sha256 of
each XᵀX and of the final hidden states, side by side (RESULTS.md §11, fourteenth round).

    python benchmarks/make_synthetic.py gemma-4-31b /tmp/synth/g431-L2 --layers 2
    python benchmarks/thread_determinism.py /tmp/synth/g431-L2 --samples 4 --len 64
"""

from __future__ import annotations

import argparse
import hashlib

import torch


def main(argv=None):
    from gemmaquant.calib.data import calibration_batches, load_tokenizer_for
    from gemmaquant.calib.runner import run_layers
    from gemmaquant.formats.checkpoint import Checkpoint

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--len", type=int, default=64)
    a = ap.parse_args(argv)
    ckpt = Checkpoint(a.model)
    tok = load_tokenizer_for(ckpt.path, rows=ckpt.config.vocab_size)
    ids = calibration_batches(tok, None, a.samples, a.len, bos_id=ckpt.config.bos_token_id)
    digests = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        got = {}

        def on_layer(i, layer, stats):
            for name, st in stats.items():
                if st.xtx is not None:
                    got[name] = hashlib.sha256(st.xtx.numpy().tobytes()).hexdigest()[:12]

        h = run_layers(ckpt, ids, kinds={"xtx"}, on_layer=on_layer, sequential=False)
        got["final hidden states"] = hashlib.sha256(h.numpy().tobytes()).hexdigest()[:12]
        digests[threads] = got
    differ = 0
    for name, one in digests[1].items():
        two = digests[2][name]
        differ += one != two
        print(f"{name:45s} {one} {two} {'same' if one == two else 'DIFFERENT'}")
    print(f"{differ} of {len(digests[1])} differ between 1 and 2 threads")


if __name__ == "__main__":
    main()
