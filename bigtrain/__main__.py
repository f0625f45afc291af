"""`python -m bigtrain …` — the same CLI as the `bigtrain` console script (torchrun/accelerate use this)."""

from bigtrain.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
