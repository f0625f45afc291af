"""`bigtrain` subcommands: train, check, prepare, bench, eval, export, generate, verify, plot, launch. Bad input exits
2 with one line; no traceback. Owns the parser (`parser`) and one module per group of subcommands (`train`: train,
prepare, bench; `check`; `evaluate`: eval, generate, plot; `checkpoints`: export, verify). The top layer: may import
any layer below and the launcher; nothing imports it but `bigtrain.__main__`."""

from __future__ import annotations

import sys

from bigtrain.cli.check import cmd_check
from bigtrain.cli.checkpoints import cmd_export, cmd_verify
from bigtrain.cli.evaluate import cmd_eval, cmd_generate, cmd_plot
from bigtrain.cli.parser import build_parser
from bigtrain.cli.train import cmd_bench, cmd_prepare, cmd_train
from bigtrain.core.errors import UserError, say


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["launch"]:  # the launcher has its own flags and imports no torch
        from launcher.cli import main as launch_main

        return launch_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        commands = {"train": cmd_train, "check": cmd_check, "prepare": cmd_prepare, "bench": cmd_bench,
                    "eval": cmd_eval, "export": cmd_export, "generate": cmd_generate, "verify": cmd_verify,
                    "plot": cmd_plot}
        return commands[args.command](args)
    except UserError as e:
        say(f"bigtrain: error: {e}")
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # TrainingError and friends: one clear line, keep the traceback for bugs
        from bigtrain.train.accounting import TrainingError

        if isinstance(e, TrainingError):
            say(f"bigtrain: training stopped: {e}")
            return 1
        raise
