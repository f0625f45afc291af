"""What a trained model does after (or between) training steps: loading a decoder to generate from (generator.py),
sampling with a KV cache (`bigtrain generate`), eval reports (scalars, eval files, the console table) and the
lm-eval adapter. Imports checkpoint and the layers below it; never train or the CLI."""
