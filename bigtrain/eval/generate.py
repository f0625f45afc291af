"""`bigtrain generate SOURCE`: sampling with a KV cache from a `Generator` (generator.py: any run, checkpoint or
Hugging Face folder).

`generate_ids` is the token loop: prompts left-padded into one batch with a key padding mask and per-row
positions (so a batched row computes what it would alone), one forward of the prompt, then one position per step
against the KV cache (or, with use_cache=False, the whole sequence again), picking each token greedily or by
temperature / top-k / top-p sampling from a seeded torch.Generator. Greedy output equals transformers'
`generate(do_sample=False)` token for token (tests/unit/test_generate.py). `generate_text` adds the text
around it: the chat template, stop strings (cut from the completion), streaming a single prompt's
tokens to stdout as they come, and the tokens/s line on stderr.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, TextIO

import torch

from bigtrain.core.errors import UserError
from bigtrain.eval.generator import Generator

if TYPE_CHECKING:
    import tokenizers

    from bigtrain.models.transformer import Transformer


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is picked. temperature 0 is greedy (argmax); above 0 it samples, after top_k
    (keep the k likeliest) and top_p (keep the smallest set whose probability reaches p), in that order."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise UserError(f"generate --max-new-tokens={self.max_new_tokens}: must be at least 1")
        if self.temperature < 0:
            raise UserError(f"generate --temperature={self.temperature}: must be >= 0 (0 is greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"generate --top-k={self.top_k}: must be at least 1")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UserError(f"generate --top-p={self.top_p}: must be in (0, 1]")
        if self.greedy and (self.top_k is not None or self.top_p is not None):
            raise UserError("generate --top-k/--top-p sample: set --temperature above 0 (temperature 0 is greedy)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# --------------------------------------------------------------------------- the token loop


def pick_next(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Next ids (B,) from last-position logits (B, V) in fp32: argmax, or a sample after temperature, top-k, top-p."""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    logits = logits / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.size(-1):
        kth = logits.topk(sampling.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the likelier ones already reach top_p (the likeliest is always kept)
        drop = (probs.cumsum(dim=-1) - probs) >= sampling.top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def _left_padded(prompts: list[list[int]], length: int, pad: int, device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts as one left-padded batch: ids (B, length), `pad` before each row's tokens, and the mask
    (B, length), True at a real token."""
    ids = torch.full((len(prompts), length), pad, dtype=torch.long, device=device)
    mask = torch.zeros(len(prompts), length, dtype=torch.bool, device=device)  # True = a real token
    for b, prompt in enumerate(prompts):
        ids[b, length - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[b, length - len(prompt):] = True
    return ids, mask


@torch.no_grad()
def generate_ids(model: Transformer, prompts: list[list[int]], sampling: SamplingConfig, *,
                 eos_ids: tuple[int, ...] = (), use_cache: bool = True, vocab_limit: int | None = None,
                 on_tokens: Callable[[list[int]], list[bool]] | None = None) -> list[list[int]]:
    """The new ids of every prompt (an EOS it stops at included), at most sampling.max_new_tokens each.

    on_tokens(ids) is called with the step's id of every row (finished rows included) and returns which
    rows should stop now (e.g. a stop string appeared); rows stop at EOS on their own. The prompts run
    as one left-padded batch: row b's positions count only its real tokens, pads are masked out as keys.
    """
    device = model.tok_emb.weight.device
    if any(not p for p in prompts):
        raise UserError("generate: an empty prompt — give at least one token of text")
    B, L = len(prompts), max(map(len, prompts))
    max_new = min(sampling.max_new_tokens, model.spec.max_seq_len - L)
    if max_new < 1:
        raise UserError(f"generate: a prompt of {L} tokens leaves no room under the model's max_seq_len="
                        f"{model.spec.max_seq_len}")
    pad = eos_ids[0] if eos_ids else 0
    ids, mask = _left_padded(prompts, L, pad, device)  # (B, L) each
    padded = not bool(mask.all())
    positions = (mask.long().cumsum(dim=-1) - 1).clamp(min=0)  # (B, L): 0 at each row's first real token
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    generator = None
    if not sampling.greedy:
        generator = torch.Generator(device=device)
        generator.manual_seed(sampling.seed if sampling.seed is not None else torch.seed())
    cache = None
    if use_cache:
        from bigtrain.models.attention import KVCache

        cache = KVCache(model.spec, B, L + max_new, dtype=model.tok_emb.weight.dtype, device=device)

    out = torch.empty(B, 0, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    counts = torch.zeros(B, dtype=torch.long, device=device)  # new tokens of each row before it stopped
    step_ids, step_pos = ids, positions  # what the next forward reads
    for _ in range(max_new):
        key_mask = mask[:, None, None, :] if padded else None  # (B, 1, 1, S) key padding
        if cache is None:  # the whole sequence again
            logits = model(ids, key_mask, positions=positions if padded else None)
        else:
            logits = model(step_ids, key_mask, positions=step_pos if padded else None, cache=cache)
        logits = logits[:, -1].float()  # (B, V)
        if vocab_limit is not None:
            logits[:, vocab_limit:] = float("-inf")
        token = pick_next(logits, sampling, generator).masked_fill(done, pad)  # (B,)
        out = torch.cat([out, token[:, None]], dim=1)
        stop = done | torch.isin(token, eos)
        if on_tokens is not None:
            stop |= torch.tensor(on_tokens(token.tolist()), dtype=torch.bool, device=device)
        ids, mask = torch.cat([ids, token[:, None]], dim=1), torch.cat([mask, ~done[:, None]], dim=1)
        step_ids, step_pos = token[:, None], positions[:, -1:] + 1  # (B, 1)
        positions = torch.cat([positions, step_pos], dim=1)
        counts += (~done).long()
        done = stop
        if bool(done.all()):
            break
    return [row[:n] for row, n in zip(out.tolist(), counts.tolist())]


# --------------------------------------------------------------------------- text


class Completion:
    """One prompt's completion as its tokens arrive: decoded, cut before the first stop string, and how much
    of it is safe to print (not the start of a stop string, not half a UTF-8 character)."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, stops: tuple[str, ...], eos_ids: tuple[int, ...]):
        self.tokenizer, self.stops, self.eos_ids = tokenizer, stops, eos_ids
        self.ids: list[int] = []
        self.text, self.printed, self.finished = "", 0, False

    def add(self, token: int) -> str:
        """Take the next token (ignored once finished); return the text newly safe to print."""
        if self.finished:
            return ""
        self.ids.append(token)
        self.finished = token in self.eos_ids
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        hits = [i for i in (text.find(stop) for stop in self.stops) if i >= 0]
        if hits:
            text, self.finished = text[:min(hits)], True
        self.text = text
        safe = len(text) if self.finished else len(text) - _held_back(text, self.stops)
        new = text[self.printed:safe]
        self.printed = max(self.printed, safe)
        return new

    def rest(self) -> str:
        """What is left to print once generation ended."""
        new, self.printed = self.text[self.printed:], len(self.text)
        return new


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of `text` not yet printable: a partial UTF-8 character, or a stop string's start."""
    held = len(text) - len(text.rstrip("\ufffd"))
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:k]):
                held = k
                break
    return held


def encode_prompts(gen: Generator, prompts: list[str], *, chat: bool = False) -> list[list[int]]:
    """Token ids of each prompt: the tokenizer's own special tokens added (e.g. a BOS), or with chat=True the
    chat template rendered around it as one user turn (its special tokens are in the template)."""
    if not chat:
        return [enc.ids for enc in gen.tokenizer.encode_batch(prompts)]
    from bigtrain.interop.chat_template import render_chat

    if gen.chat_template is None:
        raise UserError(f"generate --chat: the tokenizer of {gen.folder} has no chat template (no chat_template in "
                        f"tokenizer_config.json, no chat_template.jinja) — drop --chat to send the prompt as it is")
    texts = [render_chat(gen.chat_template, [{"role": "user", "content": p}], variables=gen.template_tokens,
                         where=f"generate --chat: the chat template of {gen.folder}") for p in prompts]
    return [enc.ids for enc in gen.tokenizer.encode_batch(texts, add_special_tokens=False)]


def generate_text(gen: Generator, prompts: list[str], sampling: SamplingConfig, *, stops: tuple[str, ...] = (),
                  chat: bool = False, use_cache: bool = True, batch_size: int = 16, stream: TextIO | None = None,
                  log: Callable[[str], None] | None = None) -> list[str]:
    """The completion of every prompt (the prompt not repeated, a stop string and what follows cut).

    A single prompt's text goes to `stream` as it is generated. `log` (default: stderr) gets one line: prompts,
    new tokens, seconds, tokens/s (new tokens over wall time, prompt processing included), time to first token.
    """
    if batch_size < 1:
        raise UserError(f"generate --batch-size={batch_size}: must be at least 1")
    if any(not stop for stop in stops):
        raise UserError("generate --stop: an empty stop string would stop before the first token — drop it")
    encoded = encode_prompts(gen, prompts, chat=chat)
    texts: list[str] = []
    new_tokens, first_token_s = 0, None
    start = time.perf_counter()
    for at in range(0, len(encoded), batch_size):
        rows = [Completion(gen.tokenizer, stops, gen.eos_ids) for _ in encoded[at:at + batch_size]]

        def on_tokens(tokens: list[int]) -> list[bool]:
            nonlocal first_token_s
            first_token_s = first_token_s if first_token_s is not None else time.perf_counter() - start
            for row, token in zip(rows, tokens):
                new = row.add(token)
                if stream is not None and len(prompts) == 1 and new:
                    stream.write(new)
                    stream.flush()
            return [row.finished for row in rows]

        ids = generate_ids(gen.model, encoded[at:at + batch_size], sampling, eos_ids=gen.eos_ids,
                           use_cache=use_cache, vocab_limit=gen.vocab_limit, on_tokens=on_tokens)
        new_tokens += sum(map(len, ids))
        for row in rows:
            rest = row.rest()
            if stream is not None and len(prompts) == 1:
                stream.write(rest + "\n")
                stream.flush()
            texts.append(row.text)
    seconds = time.perf_counter() - start
    weights = gen.model.tok_emb.weight
    (log or _to_stderr)(
        f"bigtrain: {len(prompts)} prompt{'s' if len(prompts) != 1 else ''} · {new_tokens} new tokens in "
        f"{seconds:.2f} s · {new_tokens / seconds:.1f} tokens/s · first token after {first_token_s or 0:.3f} s · "
        f"{'KV cache' if use_cache else 'no cache'} · {weights.device.type} {str(weights.dtype).removeprefix('torch.')}")
    return texts


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def read_prompts(path: str | Path) -> list[str]:
    """Prompts of a file: one per line, or for *.jsonl one JSON string or {"prompt": ...} per line; blank lines skipped."""
    path = Path(path).expanduser()
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"generate --prompts: cannot read '{path}': {e}") from None
    prompts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            prompts.append(line)
            continue
        try:
            item = json.loads(line)
        except ValueError:
            raise UserError(f"generate --prompts: {path}:{n} is not JSON") from None
        prompt = item.get("prompt") if isinstance(item, dict) else item
        if not isinstance(prompt, str):
            raise UserError(f"generate --prompts: {path}:{n} must be a JSON string or an object with a \"prompt\" string")
        prompts.append(prompt)
    if not prompts:
        raise UserError(f"generate --prompts: no prompt in '{path}'")
    return prompts
