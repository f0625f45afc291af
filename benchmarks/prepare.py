"""`bigtrain prepare` throughput and memory on a synthetic jsonl corpus, against a bare `tokenizers` loop.

The corpus: documents of 40 consecutive stdlib source lines, repeated to the asked size. The tokenizer: a
byte-level BPE of 8192 tokens trained once on its first 20 MB (given as data.tokenizer, so the runs only
tokenize). Each run is a fresh process (its peak RSS is its own; a worker's is the largest of them):

- bare: `Tokenizer.encode_batch_fast` (no offsets) over batches of 1000 documents read from the jsonl with `json.loads`,
  each followed by EOS, written as uint16 into shards of 2^27 tokens — what prepare does, minus everything else;
- bigtrain --workers N: `prepare_data(workers=N)` into a fresh cache: datasets' jsonl → Arrow conversion, then
  the pieces, then their join. "tokenize" counts from the first piece to the join's end.

The bare loop and `--workers 1` run with TOKENIZERS_PARALLELISM=false (one core each: the per-core figure);
workers fork and set it themselves.

    python benchmarks/prepare.py [--gb 1.0] [--workers 1,2] [--rss-sizes 0.25,1.0]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def make_corpus(path: Path, gb: float) -> int:
    lines = [line for f in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))[:3000]
             for line in f.read_text(errors="replace").splitlines()]
    docs = ["\n".join(lines[i:i + 40]) for i in range(0, len(lines), 40)]
    target, written, n = gb * 1e9, 0, 0
    with open(path, "w") as out:
        while written < target:
            for doc in docs:
                line = json.dumps({"text": doc}) + "\n"
                out.write(line)
                written += len(line)
                n += 1
                if written >= target:
                    break
    return n


def train_tokenizer(corpus: Path, out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=8192, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())

    def sample():
        with open(corpus) as f:
            read = 0
            for line in f:
                read += len(line)
                yield json.loads(line)["text"]
                if read > 20e6:
                    return

    tok.train_from_iterator(sample(), trainer)
    tok.save(str(out))


def run_bare(corpus: Path, tokenizer: Path, out: Path) -> dict:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer))
    eos = tok.token_to_id("<|endoftext|>")
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # no character offsets, as prepare asks for
    shard_tokens, shard, buffered, tokens = 2**27, 0, [], 0
    t0 = time.perf_counter()

    def flush(arrays):
        nonlocal shard
        np.concatenate(arrays).astype(np.uint16).tofile(out / f"tokens-{shard:05d}.bin")
        shard += 1

    with open(corpus) as f:
        batch = []
        for line in [*f, None]:
            if line is not None:
                batch.append(json.loads(line)["text"])
            if len(batch) == 1000 or (line is None and batch):
                for enc in encode(batch, add_special_tokens=False):
                    ids = enc.ids
                    ids.append(eos)
                    buffered.append(np.array(ids, dtype=np.uint16))
                    tokens += len(ids)
                batch = []
                if sum(len(a) for a in buffered) >= shard_tokens or line is None:
                    flush(buffered)
                    buffered = []
    return {"tokens": tokens, "seconds": time.perf_counter() - t0, "tokenize_s": time.perf_counter() - t0}


def run_bigtrain(corpus: Path, tokenizer: Path, out: Path, workers: int) -> dict:
    from bigtrain.config import DataConfig
    from bigtrain.data import prepare_data

    cfg = DataConfig(source=str(corpus), tokenizer=str(tokenizer), seq_len=1024, cache_dir=str(out),
                     max_documents=None, validation_split=0.001)
    marks = {}

    def log(message: str) -> None:
        if "documents from" in message and "first" not in marks:
            marks["first"] = time.perf_counter()  # the documents are loaded: tokenizing starts

    t0 = time.perf_counter()
    data = prepare_data(cfg, workers=workers, log=log)
    seconds = time.perf_counter() - t0
    return {"tokens": data.train.num_tokens + data.validation.num_tokens, "seconds": seconds,
            "tokenize_s": time.perf_counter() - marks.get("first", t0)}


def child(args) -> None:
    with tempfile.TemporaryDirectory(dir=args.tmp) as out:
        result = (run_bare(args.corpus, args.tokenizer, Path(out)) if args.run == "bare" else
                  run_bigtrain(args.corpus, args.tokenizer, Path(out), int(args.run)))
    result["rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    result["worker_rss_gb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9
    print(json.dumps(result))


def measure(run: str, corpus: Path, tokenizer: Path, tmp: Path) -> dict:
    env = dict(os.environ)
    if run in ("bare", "1"):
        env["TOKENIZERS_PARALLELISM"] = "false"
    out = subprocess.run([sys.executable, __file__, "--child", run, "--corpus", str(corpus), "--tokenizer",
                          str(tokenizer), "--tmp", str(tmp)], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", type=float, default=1.0, help="corpus size for the throughput runs")
    p.add_argument("--workers", default="1,2", help="bigtrain worker counts to run")
    p.add_argument("--rss-sizes", default="", help="extra corpus sizes (GB) for bigtrain's peak RSS, e.g. 0.25")
    p.add_argument("--tmp", default=None, help="folder for corpora and caches (default: the system temp)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--tokenizer", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.run = args.child
        return child(args)
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="bigtrain-prepare-bench-") as tmp:
        tmp = Path(tmp)
        sizes = [args.gb] + [float(s) for s in args.rss_sizes.split(",") if s]
        workers = [w for w in args.workers.split(",") if w]
        for gb in sizes:
            corpus = tmp / f"corpus-{gb}.jsonl"
            docs = make_corpus(corpus, gb)
            tokenizer = tmp / "tokenizer.json"
            if not tokenizer.exists():
                train_tokenizer(corpus, tokenizer)
            print(f"corpus {corpus.stat().st_size / 1e9:.2f} GB, {docs:,} documents, {os.cpu_count()} CPUs")
            runs = ["bare", *workers] if gb == args.gb else workers[-1:]
            results = {run: measure(run, corpus, tokenizer, tmp) for run in runs}
            bare = results.get("bare")
            for run, r in results.items():
                rate = r["tokens"] / r["tokenize_s"]
                name = "bare tokenizers loop" if run == "bare" else f"bigtrain --workers {run}"
                ratio = f" · {rate / (bare['tokens'] / bare['tokenize_s']):.2f}× bare" if bare and run != "bare" else ""
                print(f"  {name:24s} {r['tokens']:,} tokens · tokenize {r['tokenize_s']:.1f} s = {rate:,.0f} tokens/s"
                      f"{ratio} · total {r['seconds']:.1f} s · peak RSS {r['rss_gb']:.2f} GB"
                      + (f" (largest worker {r['worker_rss_gb']:.2f} GB)" if run not in ("bare", "1") else ""))
            corpus.unlink()


if __name__ == "__main__":
    main()
