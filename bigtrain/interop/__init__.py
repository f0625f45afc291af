"""Hugging Face model folders in and out.

`hf_config`: config.json ↔ the recipe's model keys / ModelSpec, per family (torch-free, so
`bigtrain launch` and `bigtrain check` can read an HF `model.init_from`).
`hf_weights`: tensor name and layout maps per family, reading an HF folder's weights one tensor at a
time (init_from), and writing one (`bigtrain export --format hf`), streamed and sharded.
`hf_encoders`: what is particular to the encoder families (BERT, RoBERTa): their config keys, export
classes and tensor names, which the two modules above dispatch to.

None imports `transformers`: the numerics are bigtrain's own, and the tests prove them equal to
transformers' (tests/unit/test_interop.py, tests/unit/test_interop_encoders.py).
"""
