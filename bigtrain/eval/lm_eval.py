"""`bigtrain eval RUN --tasks …`: lm-evaluation-harness tasks (hellaswag, arc_easy, or custom YAML tasks)
on a decoder run or checkpoint, through an lm-eval model over bigtrain's own decoder.

`BigtrainLM` is lm-eval's `TemplateLM`, loaded as `bigtrain generate` loads a model (`load_generator`).
lm-eval itself splits each (context, continuation) pair into ids as its `hf` backend does (trailing
spaces moved to the continuation; the whole text encoded, then split); the tokenizer.json encodes with
its own special-token rules, as the exported PreTrainedTokenizerFast does. `_loglikelihood_tokens`
scores as the `hf` backend: (context + continuation)[-(max_len + 1):][:-1] as input, right-padded
batches under the causal mask, log_softmax in fp32 over every logit row, the continuation's log-probs
summed, and whether each continuation token was the argmax. So the scores are lm-eval's `hf` model's
on the `bigtrain export --format hf` folder (tests/unit/test_lm_eval_adapter.py). Generation tasks
(`generate_until`) are not supported yet: a one-line error.

`run_lm_eval` runs `lm_eval.simple_evaluate`; `task_scores` reduces its results to task -> metric -> value.
`InLoopTasks` runs `eval.tasks` at each eval of a training run, every rank scoring a share.
lm-eval is imported only here (`pip install 'bigtrain[eval]'`); this module is imported only by
`bigtrain eval --tasks` and by a run with `eval.tasks`, so the import happens there.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as torch_dist

from bigtrain.core.errors import UserError

try:
    import lm_eval
    from lm_eval.api.model import TemplateLM
except ImportError:  # run_lm_eval names the fix
    lm_eval = None
    TemplateLM = object

if TYPE_CHECKING:
    from bigtrain.eval.generator import Generator
    from bigtrain.parallel import Dist

INSTALL_HINT = "pip install 'bigtrain[eval]'"
REPORT_PREFIX = "lm-eval-"  # RUN/eval/lm-eval-step-NNNNNNN.json


def require_lm_eval() -> None:
    if lm_eval is None:
        raise UserError(f"eval --tasks needs lm-eval (lm-evaluation-harness), which is not installed — {INSTALL_HINT}")


class BigtrainLM(TemplateLM):
    """lm-eval's model interface over a bigtrain decoder (a `Generator` from `load_generator`, or over the
    model being trained). With `dist` of several ranks, lm-eval gives each rank a share of every task's
    documents (its rank / world_size split, request counts padded to the busiest rank) and gathers the
    per-document results on rank 0 through the collectives below. `forward_context` wraps each forward
    (training's autocast)."""

    def __init__(self, gen: Generator, batch_size: int = 16, dist: Dist | None = None, forward_context=None):
        super().__init__()
        from bigtrain.checkpoint.export import find_special_tokens
        from bigtrain.eval.generator import find_tokenizer_file

        self.gen, self.model, self.batch_size = gen, gen.model, batch_size
        self.max_length = gen.model.spec.max_seq_len
        self._device = dist.device if dist is not None else gen.model.tok_emb.weight.device
        self.dist = dist if dist is not None and dist.distributed else None
        if self.dist is not None:
            self._rank, self._world_size = self.dist.rank, self.dist.world_size
        self.forward_context = forward_context or contextlib.nullcontext
        if not gen.eos_ids:
            raise UserError(f"eval --tasks: the tokenizer of {gen.folder} has no end-of-text token "
                            f"(<|endoftext|>, </s>, …) — lm-eval needs one as the context of an empty prompt")
        # the BOS the HF export names (its tokenizer_config.json), else EOS: the hf backend's prefix_token_id
        bos = find_special_tokens(find_tokenizer_file(gen.folder), named=gen.template_tokens).get("bos")
        self._bos_text = bos[0] if bos else None
        self._prefix_id = bos[1] if bos else gen.eos_ids[0]

    @property
    def eot_token_id(self) -> int:
        return self.gen.eos_ids[0]

    @property
    def prefix_token_id(self) -> int:
        return self._prefix_id

    @property
    def device(self) -> torch.device:
        return self._device

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's `tensor`, stacked (a 0-d tensor per rank) or concatenated along dim 0."""
        if self.dist is None:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self._world_size)]
        torch_dist.all_gather(parts, tensor.contiguous())
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj, dst: int = 0):
        if self.dist is None:
            return [obj]
        out = [None] * self._world_size if self._rank == dst else None
        torch_dist.gather_object(obj, out, dst=dst)
        return out

    def barrier(self) -> None:
        if self.dist is not None:
            torch_dist.barrier()

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Ids of `string`; None: the tokenizer's own special-token rule, off when the text starts with BOS."""
        if add_special_tokens is None:
            add_special_tokens = not (self._bos_text and string.startswith(self._bos_text))
        return self.gen.tokenizer.encode(string, add_special_tokens=add_special_tokens).ids

    def tok_decode(self, tokens: list[int], **kwargs) -> str:
        return self.gen.tokenizer.decode(tokens, skip_special_tokens=False)

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probs, whether it is the greedy continuation) per
        ((context, continuation), context_ids, continuation_ids), longest first in batches."""
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        batches = -(-len(order) // self.batch_size)
        if self.dist is not None:
            # A sharded model's forward is collective (FSDP / ZeRO-3 gather parameters): every rank runs as
            # many as the busiest one (a rolling task's texts split into different numbers of windows).
            busiest = torch.tensor([batches], device=self._device)
            torch_dist.all_reduce(busiest, op=torch_dist.ReduceOp.MAX)
            for _ in range(int(busiest) - batches):
                with self.forward_context():
                    self.model(torch.zeros(1, 1, dtype=torch.long, device=self._device))
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            # the last token is only a target; too long: cut from the left, as the hf backend does
            inputs = [(requests[i][1] + requests[i][2])[-(self.max_length + 1):][:-1] for i in batch]
            ids = torch.zeros(len(batch), max(map(len, inputs)), dtype=torch.long)  # (B, T), right-padded
            for row, tokens in enumerate(inputs):
                ids[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            with self.forward_context():
                logits = self.model(ids.to(self._device))
            logprobs = logits.float().log_softmax(dim=-1)  # (B, T, V)
            for row, i in enumerate(batch):
                (request, _, continuation), n = requests[i], len(inputs[row])
                target = torch.tensor(continuation, dtype=torch.long, device=self._device)  # (C,)
                scores = logprobs[row, n - len(continuation):n]  # (C, V): the positions predicting the continuation
                answer = (float(scores.gather(-1, target[:, None]).sum()), bool((scores.argmax(-1) == target).all()))
                results[i] = answer
                if request is not None:
                    self.cache_hook.add_partial("loglikelihood", request, answer)
        return cast("list[tuple[float, bool]]", results)  # every request answered: batches cover `order`

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text: disjoint windows of max_length tokens (perplexity tasks)."""
        from lm_eval import utils

        totals = []
        for (text,) in [request.args for request in requests]:
            windows = [(None, *utils.make_disjoint_window(window)) for window in utils.get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1)]
            totals.append(sum(score for score, _ in self._loglikelihood_tokens(windows)))
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        raise UserError("eval --tasks: generation tasks (generate_until) are not supported yet — choose "
                        "loglikelihood or multiple-choice tasks (hellaswag, arc_easy, piqa, …)")


def task_manager(include_path: str | Path | None = None):
    """lm-eval's TaskManager with its own tasks and those of the folder `include_path` (YAML task files)."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise UserError(f"eval --include-path: '{include_path}' is not a folder of lm-eval task YAML files")
    return TaskManager(include_path=str(include_path) if include_path is not None else None)


def check_tasks(names: list[str], manager) -> list[str]:
    """The task names, each one lm-eval knows (a task, group or tag); else a UserError naming it."""
    if not names:
        raise UserError("eval --tasks: no task named — e.g. --tasks hellaswag,arc_easy")
    known = set(manager.all_tasks)
    for name in names:
        if name not in known:
            raise UserError(f"eval --tasks: unknown lm-eval task '{name}' — `lm-eval ls tasks` lists them; a custom "
                            f"task's YAML folder goes in --include-path DIR")
    return names


def run_lm_eval(gen: Generator, tasks: list[str], manager, *, limit: int | None = None, num_fewshot: int | None = None,
                batch_size: int = 16, log_samples: bool = False, dist: Dist | None = None,
                forward_context=None) -> dict[str, Any]:
    """lm_eval.simple_evaluate of `tasks` (known to `manager`, a `task_manager`) on the decoder `gen`; its
    results dict (with per-sample records under "samples" when log_samples) on rank 0, {} on the other ranks
    (with `dist` every rank scores its share; collective). lm-eval seeds Python's, NumPy's and torch's global
    generators (so few-shot picks are reproducible); their states are put back afterwards, so a training run
    draws the same dropout and masks after an eval as without one."""
    check_tasks(tasks, manager)
    if limit is not None and limit < 1:
        raise UserError(f"eval --limit={limit}: must be at least 1")
    if num_fewshot is not None and num_fewshot < 0:
        raise UserError(f"eval --num-fewshot={num_fewshot}: must be >= 0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    lm = BigtrainLM(gen, batch_size=batch_size, dist=dist, forward_context=forward_context)
    with _global_rng_kept():
        results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, num_fewshot=num_fewshot,
                                          task_manager=manager, log_samples=log_samples, bootstrap_iters=0)
    if results is None:  # simple_evaluate returns None on ranks other than 0
        return {}
    return results


@contextlib.contextmanager
def _global_rng_kept():
    import random

    import numpy as np

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


class InLoopTasks:
    """`eval.tasks` during training: at each eval every rank scores its share of the tasks' documents on the
    model being trained (its run dir's tokenizer); rank 0 gathers them. Called on every rank (collective);
    returns on every rank the same metrics: `lm_eval/<task>/<metric>` scalars (metrics.jsonl, wandb) and
    `lm_eval_report` (what `bigtrain eval --tasks` writes to RUN/eval/lm-eval-step-N.json). Built before the
    first step, so a task name lm-eval does not know fails the run at start, not at the first eval."""

    def __init__(self, eval_cfg, dist: Dist, run_dir: Path, batch_size: int):
        require_lm_eval()
        self.cfg, self.dist, self.run_dir, self.batch_size = eval_cfg, dist, Path(run_dir), batch_size
        self.manager = task_manager(eval_cfg.tasks_include_path)
        self.tasks = check_tasks(list(eval_cfg.tasks), self.manager)
        self._gen: Generator | None = None  # the tokenizer side, read from the run dir at the first eval only

    def __call__(self, model, forward_context=None) -> dict[str, Any]:
        from bigtrain.eval.generator import live_generator
        from bigtrain.parallel import broadcast_object

        if self._gen is None or self._gen.model is not model:
            self._gen = live_generator(model, self.run_dir)
        results = run_lm_eval(self._gen, self.tasks, self.manager,
                              limit=self.cfg.tasks_limit, num_fewshot=self.cfg.tasks_num_fewshot,
                              batch_size=self.batch_size, dist=self.dist, forward_context=forward_context)
        report = None
        if self.dist.is_main:
            report = {"tasks": task_scores(results),
                      "lm_eval": run_config(results, tasks=self.tasks, include_path=self.cfg.tasks_include_path,
                                            limit=self.cfg.tasks_limit, num_fewshot=self.cfg.tasks_num_fewshot)}
        report = broadcast_object(self.dist, report)
        flat = {f"lm_eval/{task}/{metric}": value for task, metrics in report["tasks"].items()
                for metric, value in metrics.items()}
        return {**flat, "lm_eval_report": report}


def task_scores(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """task -> metric -> value from lm-eval's results ("acc,none" -> "acc"; another filter stays in the name)."""
    scores: dict[str, dict[str, float]] = {}
    for task, metrics in {**results.get("results", {}), **results.get("groups", {})}.items():
        for key, value in metrics.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue  # alias, "N/A" stderr
            metric, _, filtered = key.partition(",")
            scores.setdefault(task, {})[metric if filtered in ("", "none") else f"{metric},{filtered}"] = float(value)
    return scores


def run_config(results: dict[str, Any], *, tasks: list[str], include_path, limit, num_fewshot) -> dict[str, Any]:
    """What the report records of how lm-eval ran."""
    return {"tasks": list(tasks), "include_path": None if include_path is None else str(include_path), "limit": limit,
            "num_fewshot": num_fewshot, "lm_eval_version": lm_eval.__version__, "n-shot": results.get("n-shot", {}),
            "n-samples": results.get("n-samples", {}), "versions": results.get("versions", {}),
            "task_configs": results.get("configs", {})}


def scores_table(scores: dict[str, dict[str, float]]) -> str:
    """task · metric · value (± stderr when lm-eval gives one), one metric per line."""
    rows = [(task, metric, value, metrics.get(f"{metric}_stderr")) for task, metrics in scores.items()
            for metric, value in metrics.items() if not metric.endswith("_stderr")]
    if not rows:
        return "(no scores)"
    tw, mw = max(4, *(len(r[0]) for r in rows)), max(6, *(len(r[1]) for r in rows))
    number = lambda v: "" if v is None else f"{v:.4f}" if abs(v) < 1e5 else f"{v:.4g}"  # noqa: E731
    lines = [f"{'task':<{tw}}  {'metric':<{mw}}  {'value':>10}  {'stderr':>8}"]
    lines += [f"{t:<{tw}}  {m:<{mw}}  {number(v):>10}  {number(s):>8}" for t, m, v, s in rows]
    return "\n".join(lines)
