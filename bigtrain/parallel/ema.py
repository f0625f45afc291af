"""EMA of the weights (`optim.ema_decay`): an fp32 moving average of the parameters a rank holds.

After each optimizer step `t` (counted like the loop's steps, a skipped non-finite step included):

    ema = params                                   while t < optim.ema_start_step
    ema = decay · ema + (1 − decay) · params       from t = optim.ema_start_step on (a skipped step: unchanged)

starting from the weights training starts from. The average lives where the parameters do: whole on
every rank under single/ddp, this rank's shards (DTensors with the parameters' layout) under fsdp, so
sharding it costs no full copy per rank. The engine saves it with its checkpoint in its own format
(`ema.pt` beside `model.pt`; the `ema.` keys of a DCP checkpoint) under the model's state-dict names,
so a resume on another world size reshards it like the weights, and `open_weights(folder, ema=True)`
reads it like the weights (export --ema). `eval.use_ema` evaluates with these weights (`swapped_in`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn

EMA_FILE = "ema.pt"  # single/ddp checkpoints
EMA_KEY = "ema"      # the DCP state's top-level key (fsdp)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The part of `tensor` this rank holds (a DTensor's shard; a plain tensor whole)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def trainable_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """`module`'s trainable parameters under their state-dict names (tied weights under each name, one tensor)."""
    named = module.state_dict(keep_vars=True)
    return {name: t for name, t in named.items() if isinstance(t, nn.Parameter) and t.requires_grad}


class EMA:
    """fp32 moving average of the tensors `params` names (a module's trainable parameters, or what a strategy
    holds of them: DeepSpeed ZeRO-3's partitions), under their state-dict names. `after_swap`, when given, runs
    after `swapped_in` puts weights into those tensors (ZeRO-3 releases the parameters it holds gathered)."""

    def __init__(self, params: dict[str, torch.Tensor] | nn.Module, decay: float, start_step: int, *,
                 after_swap=None):
        self.decay, self.start_step, self.after_swap = decay, start_step, after_swap
        self.step = 0  # optimizer steps taken (the loop's step count; run.py sets it on resume)
        if isinstance(params, nn.Module):
            params = trainable_tensors(params)
        shadows: dict[int, torch.Tensor] = {}
        with torch.no_grad():
            for t in params.values():
                if id(t) not in shadows:
                    shadows[id(t)] = t.detach().to(torch.float32, copy=True)
        self.averages = {name: shadows[id(t)] for name, t in params.items()}
        unique = {id(t): t for t in params.values()}
        self._params = [_local(t.detach()) for t in unique.values()]
        self._shadows = [_local(shadows[key]) for key in unique]

    @torch.no_grad()
    def update(self, applied: bool | torch.Tensor) -> None:
        """After optimizer step number self.step + 1: average the new weights in (`applied`: not skipped; a device
        bool tensor is not read on the host: a skipped step then averages in with weight 0)."""
        self.step += 1
        if isinstance(applied, torch.Tensor):
            weight = applied.float() * (1.0 if self.step < self.start_step else 1.0 - self.decay)
            # weight 1 is a copy, 0 no change; torch's stub lacks the tensor-weight overload the op has
            torch._foreach_lerp_(self._shadows, self._float_params(), weight)  # type: ignore[call-overload]
            return
        if not applied:
            return
        if self.step < self.start_step:
            torch._foreach_copy_(self._shadows, self._params)
            return
        torch._foreach_lerp_(self._shadows, self._float_params(), 1.0 - self.decay)

    def _float_params(self) -> list[torch.Tensor]:
        return [p if p.dtype == torch.float32 else p.float() for p in self._params]  # bf16-pure weights

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.averages)

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        missing = sorted(set(self.averages) - set(state))
        if missing:
            raise KeyError(f"the checkpoint's EMA lacks {', '.join(missing[:3])}")
        for name, average in self.averages.items():
            if state[name] is not average:
                _local(average).copy_(_local(state[name]))

    def restart_from_weights(self) -> None:
        """Set the average to the current weights (a checkpoint saved without EMA)."""
        with torch.no_grad():
            torch._foreach_copy_(self._shadows, self._params)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The model holds the averaged weights (cast to its dtype) inside; its own weights again after."""
        with torch.no_grad():
            saved = [p.clone() for p in self._params]
            torch._foreach_copy_(self._params, self._shadows)
            if self.after_swap:
                self.after_swap()
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self._params, saved)
                if self.after_swap:
                    self.after_swap()


def ema_weights(engine, use: bool):
    """The context evaluation runs in: the engine's EMA weights swapped in when `use`, else nothing."""
    return engine.ema.swapped_in() if use else contextlib.nullcontext()
