"""The `python-stdlib-docstrings` corpus: every documented function of the standard library.

One row per function or method (nested ones included, `async def` too) that has a docstring,
from the same files as `python-stdlib` minus test folders and files that do not parse:

    text      the docstring, cleaned (`inspect.cleandoc`)
    label     its module family: the first part of the path (email/mime/text.py → email)
    prompt    the docstring again (sft: docstring → signature)
    response  the signature, `def name(args):` or `async def name(args):`
    path      the file, relative to the stdlib folder (the validation split is drawn by file)

Only rows of the `NUM_FAMILIES` families with the most rows are kept (ties broken by name),
so the classification task has that many labels. A family must span at least two files:
the validation split is drawn by file, and a one-file family (argparse.py) would sit wholly
in one split. `sources.load_documents` then drops validation rows of any family that the
split left without training rows (possible only on tiny corpora), so every validation label
occurs in training. Needs no download; the same interpreter gives the same rows.
"""

from __future__ import annotations

import ast
import warnings
from collections import Counter
from pathlib import Path
from typing import Sequence

NUM_FAMILIES = 8
TEST_FOLDERS = frozenset({"test", "tests", "idle_test"})  # test/, tests/, idlelib/idle_test/, lib2to3/tests/
COLUMNS = ("text", "label", "prompt", "response", "path")


def docstring_files(files: Sequence[Path], root: Path) -> list[Path]:
    """The files that may hold rows: not inside a test folder."""
    return [p for p in files if not TEST_FOLDERS.intersection(p.relative_to(root).parts[:-1])]


def docstring_rows(files: Sequence[Path], root: Path) -> dict[str, list[str]]:
    """Columns of the rows of `files` (in file order, then source order), the top families only."""
    rows = [row for path in files for row in _file_rows(path, root)]
    top = top_families(rows)
    kept = [row for row in rows if row["label"] in top]
    return {column: [row[column] for row in kept] for column in COLUMNS}


def top_families(rows: list[dict[str, str]]) -> set[str]:
    """The NUM_FAMILIES families with the most rows among those of at least two files; ties by name."""
    counts = Counter(row["label"] for row in rows)
    files: dict[str, set[str]] = {}
    for row in rows:
        files.setdefault(row["label"], set()).add(row["path"])
    ranked = sorted((family for family in counts if len(files[family]) >= 2), key=lambda f: (-counts[f], f))
    return set(ranked[:NUM_FAMILIES])


def signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    prefix = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
    return f"{prefix} {node.name}({ast.unparse(node.args)}):"


def _file_rows(path: Path, root: Path) -> list[dict[str, str]]:
    relative = path.relative_to(root).as_posix()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SyntaxWarning for old escape sequences
            tree = ast.parse(path.read_bytes().decode("utf-8", errors="replace"), filename=relative)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return []  # files that do not parse are left out
    family = relative.split("/")[0].removesuffix(".py")
    rows = []
    for node in _functions(tree):
        doc = ast.get_docstring(node, clean=True)  # clean: inspect.cleandoc
        if doc:
            rows.append({"text": doc, "label": family, "prompt": doc, "response": signature(node), "path": relative})
    return rows


def _functions(node: ast.AST):
    """Function and method definitions in source order, nested ones included."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield child
        yield from _functions(child)
