"""A Hugging Face tokenizer's chat template: read it from a model folder, render it into a prompt.

The template is the folder's `chat_template.jinja` (what transformers 5 saves) or the `chat_template` of
its `tokenizer_config.json` (a string, or a list of named templates: "default" is taken). It is rendered
as transformers' `apply_chat_template` does: jinja2's immutable sandbox (a template runs no code beyond
jinja2's own; see DESIGN "no code runs from a file"), trim_blocks and lstrip_blocks, `raise_exception`,
`strftime_now` and a `tojson` filter, with the tokenizer's special tokens (`bos_token`, `eos_token`, ...)
as variables. jinja2 is imported only here, on first use (`pip install bigtrain[hf]`).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from bigtrain.core.errors import UserError

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


def read_tokenizer_config(folder: str | Path) -> dict:
    """tokenizer_config.json of `folder` as a dict ({} when there is none)."""
    path = Path(folder) / TOKENIZER_CONFIG
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    return config if isinstance(config, dict) else {}


def read_chat_template(folder: str | Path) -> str | None:
    """The chat template of the tokenizer in `folder`, or None when it has none."""
    path = Path(folder) / TEMPLATE_FILE
    if path.is_file():
        return path.read_text()
    template = read_tokenizer_config(folder).get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template.strip() else None


def special_tokens(folder: str | Path) -> dict[str, str]:
    """bos_token, eos_token, ... of the folder's tokenizer_config.json as text."""
    return special_tokens_of(read_tokenizer_config(folder))


def special_tokens_of(config: dict) -> dict[str, str]:
    """bos_token, eos_token, ... of a tokenizer_config dict as text (a token given as {"content": ...} too)."""
    tokens = {}
    for key in SPECIAL_TOKEN_KEYS:
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            tokens[key] = value
    return tokens


@dataclass(frozen=True)
class ChatTemplate:
    """A tokenizer folder's chat template with its special tokens (the variables it may use)."""

    text: str
    variables: dict[str, str] = field(default_factory=dict)
    where: str = "chat template"

    def render(self, messages: list[dict[str, str]], *, add_generation_prompt: bool) -> str:
        return render_chat(self.text, messages, add_generation_prompt=add_generation_prompt,
                           variables=self.variables, where=self.where)

    def identity(self) -> str:
        """What rendered data depends on (part of the data cache key)."""
        return hashlib.sha256(json.dumps([self.text, sorted(self.variables.items())]).encode()).hexdigest()


@functools.lru_cache(maxsize=8)
def chat_template_beside(tokenizer_file: str | None) -> ChatTemplate | None:
    """The chat template of the folder holding `tokenizer_file` (a Hugging Face model folder, or a run dir
    or checkpoint of an imported model), or None: no tokenizer given, or no template beside it."""
    if tokenizer_file is None:
        return None
    folder = Path(tokenizer_file).expanduser().parent
    text = read_chat_template(folder)
    return None if text is None else ChatTemplate(text, special_tokens(folder), where=f"chat template in {folder}")


def render_chat(template: str, messages: list[dict[str, str]], *, add_generation_prompt: bool = True,
                variables: dict[str, str] | None = None, where: str = "chat template") -> str:
    """The prompt text of `messages` ([{"role": "user", "content": ...}]) under `template`."""
    try:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise UserError("a chat template needs jinja2 to render it — pip install 'bigtrain[hf]'") from None

    def raise_exception(message: str):
        raise TemplateError(message)

    def strftime_now(fmt: str) -> str:
        from datetime import datetime

        return datetime.now().strftime(fmt)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                **(variables or {}))
    except TemplateError as e:
        raise UserError(f"{where}: cannot render it: {e}") from None
