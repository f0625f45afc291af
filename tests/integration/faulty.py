"""`bigtrain` CLI with one injected fault, for tests of what a job does when one rank misbehaves.

    BIGTRAIN_FAULT=KIND:rank=R:step=S[:key=value…] torchrun … tests/integration/faulty.py train RECIPE [overrides]
    BIGTRAIN_FAULT=stall:rank=R:at=PHASE:seconds=N …

Kinds (at training step S on rank R only; other ranks and steps run untouched):
    sleep:seconds=N   the forward of the step's first micro-batch sleeps N seconds (a rank that stops arriving)
    nan               every micro-batch's loss of the step is multiplied by NaN (NaN loss and gradients)
    slow_save:seconds=N   the save of step S sleeps N seconds before writing its trainer files (with async
                      saves: in the background thread, so the save is still in flight while training goes on)
    slow_tasks:seconds=N  each eval.tasks (lm-eval) forward of the eval after step S sleeps N seconds
    stall:at=PHASE:seconds=N  rank R sleeps N seconds before a phase outside the loop: prepare (rank 0's data
                      preparation), init_from (loading its weights), resume (loading the checkpoint), final-barrier

The fault goes in by wrapping the task's `loss_sum` and the loop's batch fetch (which tags each batch with its step), so
production code carries no test hooks. Without BIGTRAIN_FAULT this is exactly `python -m bigtrain`.
"""

from __future__ import annotations

import os
import sys
import time

import bigtrain.checkpoint
import bigtrain.checkpoint.store
import bigtrain.train.build
import bigtrain.train.loop
import bigtrain.train.run
from bigtrain.cli import main


def parse_fault(text: str) -> dict:
    """'sleep:rank=1:step=3:seconds=300' → {'kind': 'sleep', 'rank': 1, 'step': 3, 'seconds': 300.0}."""
    kind, *pairs = text.split(":")
    fault = {"kind": kind}
    for pair in pairs:
        key, _, value = pair.partition("=")
        fault[key] = int(value) if key in ("rank", "step") else value if key == "at" else float(value)
    where = "at" if kind == "stall" else "step"
    if kind not in FAULTS or "rank" not in fault or where not in fault or fault.get("at", "prepare") not in STALLS:
        raise SystemExit(f"BIGTRAIN_FAULT={text!r}: want KIND:rank=R:step=S[:key=value] with KIND one of {FAULTS}, "
                         f"or stall:rank=R:at=PHASE:seconds=N with PHASE one of {list(STALLS)}")
    return fault


def sleep_in_forward(fault: dict, loss_sum, model, batch):
    if not fault.get("fired"):
        fault["fired"] = True
        print(f"faulty: rank {fault['rank']} sleeps {fault['seconds']:g} s in step {fault['step']}", file=sys.stderr, flush=True)
        time.sleep(fault["seconds"])
    return loss_sum(model, batch)


def nan_loss(fault: dict, loss_sum, model, batch):
    return loss_sum(model, batch) * float("nan")


def install_slow_save(fault: dict) -> None:
    write = bigtrain.checkpoint.store._write_trainer_files

    def slow_write(tmp, state, *args, **kwargs):
        if state.step == fault["step"]:
            print(f"faulty: rank {fault['rank']}'s save of step {state.step} sleeps {fault['seconds']:g} s",
                  file=sys.stderr, flush=True)
            time.sleep(fault["seconds"])
        return write(tmp, state, *args, **kwargs)

    bigtrain.checkpoint.store._write_trainer_files = slow_write


def install_slow_tasks(fault: dict) -> None:
    """eval.tasks forwards after step S sleep: an in-loop lm-eval long enough to signal during it."""
    in_loop_tasks = bigtrain.train.run.in_loop_tasks

    def slow_in_loop_tasks(cfg, dist, run_dir):
        tasks = in_loop_tasks(cfg, dist, run_dir)
        evals = 0

        def slow(model, forward_context):
            nonlocal evals
            evals += 1
            if evals * cfg.eval.every != fault["step"]:
                return tasks(model, forward_context)
            print(f"faulty: rank {fault['rank']}'s eval.tasks forwards after step {fault['step']} sleep "
                  f"{fault['seconds']:g} s each", file=sys.stderr, flush=True)

            def slow_context():
                time.sleep(fault["seconds"])
                return forward_context()

            return tasks(model, slow_context)

        return slow if tasks is not None else None

    bigtrain.train.run.in_loop_tasks = slow_in_loop_tasks


# where each stall goes: (module, function name) the phase calls
STALLS = {"prepare": (bigtrain.train.build, "prepare_sources"), "init_from": (bigtrain.checkpoint, "load_init_weights"),
          "resume": (bigtrain.checkpoint, "resume"), "final-barrier": (bigtrain.train.run, "barrier")}


def install_stall(fault: dict) -> None:
    module, name = STALLS[fault["at"]]
    original = getattr(module, name)

    def stalled(*args, **kwargs):
        print(f"faulty: rank {fault['rank']} sleeps {fault['seconds']:g} s before {fault['at']}", file=sys.stderr,
              flush=True)
        time.sleep(fault["seconds"])
        return original(*args, **kwargs)

    setattr(module, name, stalled)


LOSS_FAULTS = {"sleep": sleep_in_forward, "nan": nan_loss}
OTHER_FAULTS = {"slow_save": install_slow_save, "slow_tasks": install_slow_tasks, "stall": install_stall}
FAULTS = [*LOSS_FAULTS, *OTHER_FAULTS]


def install(fault: dict) -> None:
    """Wrap the loop's batch fetch (to know the step) and the built task's loss (to misbehave at that step), or
    the function of the other kinds."""
    if int(os.environ.get("RANK", "0")) != fault["rank"]:
        return
    if fault["kind"] in OTHER_FAULTS:
        OTHER_FAULTS[fault["kind"]](fault)
        return
    fetch, build_task = bigtrain.train.loop.fetch_micro_batches, bigtrain.train.build.build_task

    def fetch_with_step(ctx, sampler, consumed):  # (made a step ahead, on the loop's batch thread)
        batches = fetch(ctx, sampler, consumed)
        for batch in batches:
            batch["faulty_step"] = consumed // ctx.cfg.train.global_batch_size + 1
        return batches

    def build_faulty_task(*args, **kwargs):
        task = build_task(*args, **kwargs)
        loss_sum = task.loss_sum

        def faulty_loss_sum(model, batch):
            if model.training and batch.get("faulty_step") == fault["step"]:
                return LOSS_FAULTS[fault["kind"]](fault, loss_sum, model, batch)
            return loss_sum(model, batch)

        task.loss_sum = faulty_loss_sum
        return task

    bigtrain.train.loop.fetch_micro_batches = fetch_with_step
    bigtrain.train.build.build_task = build_faulty_task


if __name__ == "__main__":
    if os.environ.get("BIGTRAIN_FAULT"):
        install(parse_fault(os.environ["BIGTRAIN_FAULT"]))
    raise SystemExit(main())
