"""Activation memory and step time of `parallel.activation_checkpointing` none / full / selective (CPU).

One forward + backward of a decoder (the model built and its weights touched first) in a fresh process per
mode: the memory figure is the process's peak RSS during it minus its RSS before, i.e. the activations,
gradients and transient buffers that step adds. Gradients are the same in every mode (tests).

    python benchmarks/checkpointing_memory.py [--d-model 512] [--layers 8] [--seq 512] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODES = ("none", "full", "selective")


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def child(args) -> None:
    import torch

    from bigtrain.config import ModelConfig
    from bigtrain.models import build_model
    from bigtrain.parallel.transforms import apply_activation_checkpointing

    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="debug", n_layers=args.layers, d_model=args.d_model, n_heads=8,
                                    d_ff=4 * args.d_model, max_seq_len=args.seq), args.vocab)
    if args.mode != "none":
        apply_activation_checkpointing(model, args.mode)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    before = rss_gb()
    t0 = time.perf_counter()
    loss = torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
    loss.backward()
    print(json.dumps({"mode": args.mode, "added_gb": rss_gb() - before, "seconds": time.perf_counter() - t0,
                      "loss": loss.item()}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:
        return child(args)
    shape = ["--d-model", str(args.d_model), "--layers", str(args.layers), "--seq", str(args.seq),
             "--batch", str(args.batch), "--vocab", str(args.vocab)]
    results = [json.loads(subprocess.run([sys.executable, __file__, *shape, "--mode", mode], capture_output=True,
                                         text=True, check=True).stdout.strip().splitlines()[-1]) for mode in MODES]
    print(f"decoder d_model {args.d_model} × {args.layers} layers, {args.batch} × {args.seq} tokens, vocab "
          f"{args.vocab}, fp32: one forward + backward")
    for r in results:
        print(f"  {r['mode']:10s} +{r['added_gb']:.2f} GB ({r['added_gb'] / results[0]['added_gb']:.2f}×) · "
              f"{r['seconds']:.1f} s ({r['seconds'] / results[0]['seconds']:.2f}×) · loss {r['loss']:.6f}")


if __name__ == "__main__":
    main()
