"""Rows → token examples, per task: the columns a task reads and how one row becomes tokens.

Every example is one "document" of its split's token stream and ends with the EOS, which
`prepare` appends (so the encoders below return the tokens before it):

| task | columns read | one example | beside the shards |
| --- | --- | --- | --- |
| causal_lm, masked_lm | text | text + [eos] | — |
| classification | text (+ pair), label | [cls] + text (+ [sep] + pair) + [eos], ≤ seq_len | `labels.npy` |
| sft | prompt + response, or messages | prompt + response + [eos] | `loss_spans.npy` |

Classification labels are fixed by the training split: its sorted distinct values (ints
numerically, strings by code point) get ids 0..K-1. SFT's loss spans are the [start, stop)
stream positions of the tokens to predict (response tokens and the EOS). A `messages` row is
rendered with the tokenizer's own chat template when its folder has one (a Hugging Face model's, see
`interop/chat_template.py`): each assistant turn, from after the generation prompt through the template's
end-of-turn token, is loss; the EOS `prepare` appends only separates examples. A template must render a
conversation's prefixes as prefixes of it (turns are found that way), else it is a one-line error.
Without a template the row is rendered as plain text with `ROLE_HEADER` before each turn; every
assistant turn is loss, and the EOS after the last:

    <|system|>\\nBe brief.\\n<|user|>\\nHi\\n<|assistant|>\\nHello<|endoftext|>
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

import numpy as np

from bigtrain.core.errors import UserError
from bigtrain.interop.chat_template import ChatTemplate, chat_template_beside

if TYPE_CHECKING:
    import datasets

TASKS = ("causal_lm", "masked_lm", "classification", "sft")
ROLE_HEADER = "<|{role}|>\n"  # before each turn's content; turns after the first start on a new line
LABELS_FILE, LOSS_SPANS_FILE = "labels.npy", "loss_spans.npy"
# Per-task arrays written beside the shards, as {name: empty array} (an empty split still gets each file).
TASK_ARRAYS: dict[str, dict[str, np.ndarray]] = {
    "classification": {"labels": np.zeros(0, np.int64)},
    "sft": {"loss_spans": np.zeros((0, 2), np.int64)},
}
POSITION_ARRAYS = ("loss_spans",)  # values are token positions: relative to the batch here, to the stream on disk

# Config keys whose column is not plain text (everything else a task reads must hold strings).
_NOT_TEXT = ("data.label_column", "data.messages_column")
_SHOW_LABELS = 20


@dataclass
class EncodedBatch:
    """Token lists of a batch of examples (each without its final EOS) and their per-example arrays."""

    examples: list[list[int]]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # name -> rows; loss_spans relative to the batch


def check_task(task: str) -> None:
    if task not in TASKS:
        raise UserError(f"task.name: unknown task '{task}' (choose from {', '.join(TASKS)})")


def task_columns(cfg, task: str) -> dict[str, str]:
    """The columns `task` reads, as {config key: column name}; they are part of the cache key."""
    check_task(task)
    if task == "classification":
        pair = {"data.pair_column": cfg.pair_column} if cfg.pair_column else {}
        return {"data.text_column": cfg.text_column, **pair, "data.label_column": cfg.label_column}
    if task == "sft":
        if cfg.messages_column:
            return {"data.messages_column": cfg.messages_column}
        return {"data.prompt_column": cfg.prompt_column, "data.response_column": cfg.response_column}
    return {"data.text_column": cfg.text_column}


def sft_chat_template(cfg, task: str) -> ChatTemplate | None:
    """The chat template that renders `task`'s messages: the given tokenizer's own, if it has one."""
    if task != "sft" or not cfg.messages_column:
        return None
    return chat_template_beside(cfg.tokenizer)


def bpe_text_columns(cfg, task: str) -> tuple[str, ...]:
    """What a BPE trained for `task` reads (part of its key): the text columns, or the rendered messages."""
    columns = task_columns(cfg, task)
    if "data.messages_column" in columns:
        return (f"messages:{columns['data.messages_column']}",)
    return tuple(column for key, column in columns.items() if key not in _NOT_TEXT)


def check_columns(ds: "datasets.Dataset", cfg, task: str, source: str) -> None:
    """Every column `task` reads exists (text columns hold strings), else a one-line error naming it."""
    for key, column in task_columns(cfg, task).items():
        if column not in ds.column_names:
            have = ", ".join(ds.column_names) or "none"
            raise UserError(f"{key}: no column '{column}' in '{source}' (columns: {have})")
        dtype = getattr(ds.features[column], "dtype", None)
        if key not in _NOT_TEXT and dtype not in ("string", "large_string"):
            raise UserError(f"{key}: column '{column}' in '{source}' holds {dtype or 'non-text values'}, not text")


def check_seq_len(cfg, task: str) -> None:
    if task == "classification":
        need = 5 if cfg.pair_column else 3  # [cls] a [sep] b [eos] / [cls] a [eos]
        if cfg.seq_len < need:
            raise UserError(f"data.seq_len={cfg.seq_len} is too small for classification (need >= {need})")


def bpe_text_batches(docs: "datasets.Dataset", cfg, task: str, batch_rows: int = 1000) -> Iterator[list[str]]:
    """The texts a BPE for `task` trains on, in batches of strings."""
    columns = task_columns(cfg, task)
    if "data.messages_column" in columns:
        column = columns["data.messages_column"]
        for batch in docs.select_columns([column]).iter(batch_size=batch_rows):
            yield ["".join(text for text, _ in render_messages(m, column)) for m in batch[column]]
        return
    names = [column for key, column in columns.items() if key not in _NOT_TEXT]
    for batch in docs.select_columns(names).iter(batch_size=batch_rows):
        yield [text for name in names for text in batch[name] if text]


# --------------------------------------------------------------------------- labels


def label_set(values: list, column: str) -> list:
    """The training split's labels: sorted distinct values (ints numerically), id = position."""
    for value in values:
        if value is None or isinstance(value, float) or not isinstance(value, (str, int)):
            raise UserError(
                f"data.label_column '{column}': labels must be strings or integers, got {type(value).__name__} "
                f"({value!r}) in the training split"
            )
    distinct = set(values)
    if not distinct:
        raise UserError(f"data.label_column '{column}': the training split has no examples")
    if len({type(v) for v in distinct}) > 1:
        raise UserError(f"data.label_column '{column}': labels mix strings and integers — use one type")
    return sorted(distinct)


def check_labels(values: list, labels: list, column: str, split: str) -> None:
    """Every label of `split` is one of the training labels, else a one-line error naming it."""
    known = set(labels)
    for value in values:
        if value not in known:
            shown = ", ".join(map(str, labels[:_SHOW_LABELS])) + (", …" if len(labels) > _SHOW_LABELS else "")
            value_text = repr(value) if isinstance(value, str) else str(value)
            raise UserError(
                f"data.label_column '{column}': {split} label {value_text} does not occur in the training split "
                f"(labels: {shown})"
            )


# --------------------------------------------------------------------------- encoding


def encode_batch(rows: dict[str, list], cfg, task: str, tok, ids, *, label_ids: dict | None = None) -> EncodedBatch:
    """Encode one batch of rows for `task` (ids: the tokenizer's `SpecialIds`)."""
    columns = task_columns(cfg, task)
    if task == "classification":
        assert label_ids is not None  # a classification prepare gives the training split's label set
        return _encode_classification(rows, columns, cfg.seq_len, tok, ids, label_ids)
    if task == "sft":
        return _encode_sft(rows, columns, tok, sft_chat_template(cfg, task))
    return EncodedBatch(_encode(tok, [text or "" for text in rows[columns["data.text_column"]]]))


def pair_lengths(a: int, b: int, budget: int) -> tuple[int, int]:
    """Lengths of two texts cut to `budget` tokens in all, longest first (as Hugging Face's longest_first)."""
    budget = max(0, budget)
    if a + b <= budget:
        return a, b
    if 2 * min(a, b) <= budget:  # only the longer one is cut
        return (budget - b, b) if a >= b else (a, budget - a)
    return budget // 2, budget - budget // 2  # both cut; they end within one token of each other


def _encode(tok, texts: list[str]) -> list[list[int]]:
    return [enc.ids for enc in tok.encode_batch_fast(texts, add_special_tokens=False)]  # no offsets: faster


def _encode_classification(rows, columns, seq_len: int, tok, ids, label_ids: dict) -> EncodedBatch:
    texts = _encode(tok, [t or "" for t in rows[columns["data.text_column"]]])
    labels = np.array([label_ids[v] for v in rows[columns["data.label_column"]]], dtype=np.int64)
    if "data.pair_column" not in columns:
        examples = [[ids.cls] + a[: seq_len - 2] for a in texts]  # + [eos]
        return EncodedBatch(examples, {"labels": labels})
    pairs = _encode(tok, [t or "" for t in rows[columns["data.pair_column"]]])
    examples = []
    for a, b in zip(texts, pairs):
        keep_a, keep_b = pair_lengths(len(a), len(b), seq_len - 3)
        examples.append([ids.cls] + a[:keep_a] + [ids.sep] + b[:keep_b])  # + [eos]
    return EncodedBatch(examples, {"labels": labels})


def _encode_sft(rows, columns, tok, template: ChatTemplate | None) -> EncodedBatch:
    """Each row as pieces of (text, is_loss) -> tokens and loss spans, the whole batch encoded at once.
    Prompt/response pairs and role-header chats encode each piece on its own; a chat rendered by a
    template is encoded whole (as transformers' apply_chat_template does) and a token is loss when its
    characters overlap an assistant turn."""
    if "data.messages_column" in columns:
        column = columns["data.messages_column"]
        if template is None:
            rendered = [render_messages(m, column) for m in rows[column]]
        else:
            rendered = [template_pieces(template, m, column) for m in rows[column]]
    else:
        prompts, responses = rows[columns["data.prompt_column"]], rows[columns["data.response_column"]]
        rendered = [[(p or "", False), (r or "", True)] for p, r in zip(prompts, responses)]
    if template is None:
        encoded = iter(_encode(tok, [text for pieces in rendered for text, _ in pieces]))
        per_piece = ([(next(encoded), is_loss) for _, is_loss in pieces] for pieces in rendered)
    else:
        whole = tok.encode_batch(["".join(text for text, _ in pieces) for pieces in rendered], add_special_tokens=False)
        per_piece = (_tokens_in_turns(pieces, enc) for pieces, enc in zip(rendered, whole))
    examples, spans, pos = [], [], 0
    for pieces in per_piece:
        tokens: list[int] = []
        own: list[list[int]] = []  # this example's spans (never merged with the previous example's)
        for piece, is_loss in pieces:
            if is_loss and piece:
                _add_span(own, pos + len(tokens), pos + len(tokens) + len(piece))
            tokens += piece
        if template is None:  # the EOS ends the response; with a template, its end-of-turn token does
            _add_span(own, pos + len(tokens), pos + len(tokens) + 1)
        examples.append(tokens)
        spans += own
        pos += len(tokens) + 1
    return EncodedBatch(examples, {"loss_spans": np.array(spans, dtype=np.int64).reshape(-1, 2)})


def _tokens_in_turns(pieces: list[tuple[str, bool]], encoding) -> list[tuple[list[int], bool]]:
    """A whole text's tokens as runs of (ids, is_loss): loss where a token's characters overlap a loss piece."""
    loss_chars, at = [], 0
    for text, is_loss in pieces:
        if is_loss:
            loss_chars.append((at, at + len(text)))
        at += len(text)
    runs: list[tuple[list[int], bool]] = []
    for token, (start, stop) in zip(encoding.ids, encoding.offsets):
        is_loss = any(start < b and a < max(stop, start + 1) for a, b in loss_chars)
        if runs and runs[-1][1] == is_loss:
            runs[-1][0].append(token)
        else:
            runs.append(([token], is_loss))
    return runs


def _add_span(spans: list[list[int]], start: int, stop: int) -> None:
    if spans and spans[-1][1] == start:
        spans[-1][1] = stop  # adjacent: one span
    else:
        spans.append([start, stop])


def check_messages(messages, column: str) -> list[dict[str, str]]:
    """A row's chat as a list of {role, content} dicts of strings (a missing content is ""), else a UserError."""
    if not isinstance(messages, list):
        got = type(messages).__name__
        raise UserError(f"data.messages_column '{column}': expected a list of {{role, content}} messages, got {got}")
    chat = []
    for message in messages:
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(role, str) or not isinstance(content, (str, type(None))):
            raise UserError(
                f"data.messages_column '{column}': each message must be a {{role, content}} dict of strings, got {message!r:.80}"
            )
        chat.append({"role": role, "content": content or ""})
    return chat


def render_messages(messages, column: str) -> list[tuple[str, bool]]:
    """A chat as (text, is_loss) pieces: a role header (never loss), then the content (loss for assistant)."""
    pieces = []
    for i, message in enumerate(check_messages(messages, column)):
        pieces.append((("\n" if i else "") + ROLE_HEADER.format(role=message["role"]), False))
        pieces.append((message["content"], message["role"] == "assistant"))
    return pieces


def template_pieces(template: ChatTemplate, messages, column: str) -> list[tuple[str, bool]]:
    """A chat rendered by its tokenizer's template as (text, is_loss) pieces. An assistant turn is the text
    that rendering it adds after the generation prompt of the turns before it (its content and the
    template's end-of-turn token; whitespace after that is not loss)."""
    chat = check_messages(messages, column)
    pieces, done = [], ""
    for i, message in enumerate(chat):
        if message["role"] != "assistant":
            continue
        prompt = template.render(chat[:i], add_generation_prompt=True)
        turn = template.render(chat[: i + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not turn.startswith(prompt):
            raise UserError(f"data.messages_column '{column}': the {template.where} renders a conversation's "
                            f"earlier turns differently once later turns follow (assistant turn {i}), so its "
                            f"assistant turns cannot be found — render the data to prompt/response columns")
        reply = turn[len(prompt):]
        kept = reply.rstrip()
        pieces += [(prompt[len(done):], False), (kept, True), (reply[len(kept):], False)]
        done = turn
    whole = template.render(chat, add_generation_prompt=False)
    if not whole.startswith(done):
        raise UserError(f"data.messages_column '{column}': the {template.where} renders the last turns "
                        f"differently once later turns follow — render the data to prompt/response columns")
    pieces.append((whole[len(done):], False))
    return [piece for piece in pieces if piece[0]]
