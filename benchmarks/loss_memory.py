"""Peak memory of the LM loss part: the whole (B, T, V) logits vs `task.loss_chunk_tokens` chunks (CPU).

One forward + backward of the LM head and the summed cross-entropy (bigtrain.models.transformer's
`chunked_loss_sum`, chunk 0 = the whole sequence at once) on hidden states (B, T, C), each variant in a
fresh process: the figure is its peak RSS during forward + backward minus its RSS before (the head's weight,
the hidden states and the labels already made), i.e. what the loss adds.

    python benchmarks/loss_memory.py [--vocab 128256] [--seq 2048] [--batch 1] [--d-model 512] [--chunks 0,1024,256]
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


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def child(args) -> None:
    import torch

    from bigtrain.models.transformer import chunked_loss_sum

    torch.manual_seed(0)
    head = torch.nn.Linear(args.d_model, args.vocab, bias=False)
    h = torch.randn(args.batch, args.seq, args.d_model, requires_grad=True)
    labels = torch.randint(0, args.vocab, (args.batch, args.seq))
    with torch.no_grad():  # touch every page of what exists before the loss, so the baseline holds it
        head.weight.mul_(1.0)
    before = rss_gb()
    t0 = time.perf_counter()
    loss = chunked_loss_sum(head, h, labels, args.chunk)
    loss.backward()
    seconds = time.perf_counter() - t0
    print(json.dumps({"chunk": args.chunk, "loss": loss.item(), "grad_sum": float(h.grad.double().sum()),
                      "added_gb": rss_gb() - before, "seconds": seconds}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=128_256)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--chunks", default="0,1024,256")
    p.add_argument("--chunk", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.chunk is not None:
        return child(args)
    shape = ["--vocab", str(args.vocab), "--seq", str(args.seq), "--batch", str(args.batch), "--d-model", str(args.d_model)]
    results = []
    for chunk in [int(c) for c in args.chunks.split(",")]:
        out = subprocess.run([sys.executable, __file__, *shape, "--chunk", str(chunk)], capture_output=True, text=True,
                             check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    whole = results[0]
    fp32_logits = args.batch * args.seq * args.vocab * 4 / 1e9
    print(f"LM loss, vocab {args.vocab:,}, {args.batch} × {args.seq} positions, d_model {args.d_model} "
          f"(fp32 logits alone: {fp32_logits:.2f} GB)")
    for r in results:
        name = "whole logits" if r["chunk"] == 0 else f"chunks of {r['chunk']}"
        print(f"  {name:16s} +{r['added_gb']:.2f} GB ({r['added_gb'] / whole['added_gb']:.2f}×) · "
              f"{r['seconds']:.1f} s · loss {r['loss']:.6f} · Σ grad {r['grad_sum']:.6e}")


if __name__ == "__main__":
    main()
