"""Tests for bigtrain/data/docstrings.py: the python-stdlib-docstrings source (CPU, fast)."""

from __future__ import annotations

import dataclasses
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from bigtrain.config import DataConfig
from bigtrain.data import prepare_data
from bigtrain.data.docstrings import COLUMNS, NUM_FAMILIES, docstring_files, docstring_rows, top_families
from bigtrain.data.sources import load_documents, resolve_source


def quiet(_msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def docstrings(tmp_path_factory):
    """The first 150 stdlib files as docstring rows, a quarter of the files held out."""
    cache = tmp_path_factory.mktemp("cache")
    cfg = DataConfig(source="python-stdlib-docstrings", max_documents=150, validation_split=0.25, cache_dir=str(cache))
    return cfg, load_documents(cfg, resolve_source(cfg), cache_dir=cache, task="classification")


def test_rows_have_every_column_and_at_most_eight_families(docstrings):
    _, docs = docstrings
    for split in (docs.train, docs.validation):
        assert set(COLUMNS) <= set(split.column_names)
        assert all(text and text == prompt for text, prompt in zip(split["text"], split["prompt"]))
        assert all(r.startswith(("def ", "async def ")) and r.endswith("):") for r in split["response"])
        assert all(path.split("/")[0].removesuffix(".py") == label for path, label in zip(split["path"], split["label"]))
    families = Counter(docs.train["label"])
    assert 2 <= len(families) <= NUM_FAMILIES and set(docs.validation["label"]) <= set(families)
    assert not any(set(p.split("/")) & {"test", "tests", "idle_test"} for p in [*docs.train["path"], *docs.validation["path"]])


def test_split_is_by_file_disjoint_and_deterministic(docstrings):
    cfg, docs = docstrings
    train, val = set(docs.train["path"]), set(docs.validation["path"])
    assert train and val and train.isdisjoint(val)
    again = load_documents(cfg, resolve_source(cfg), cache_dir=Path(cfg.cache_dir), task="sft")
    assert list(again.train["response"]) == list(docs.train["response"])
    assert list(again.validation["path"]) == list(docs.validation["path"])
    assert resolve_source(cfg).identity.startswith("python-stdlib-docstrings:")


def test_rows_of_a_file_signatures_docstrings_and_families(tmp_path):
    root = tmp_path / "lib"
    (root / "email" / "mime").mkdir(parents=True)
    (root / "email" / "tests").mkdir()
    (root / "email" / "mime" / "text.py").write_text(textwrap.dedent('''
        class MIMEText:
            def __init__(self, _text, _subtype='plain', *, policy=None):
                """Create a text/* type MIME document.

                Base line.
                    Indented detail.
                """

            async def fetch(self, n: int = 1, **kw):
                """Fetch."""

                def inner(x, /, y):
                    """Nested."""

        def undocumented():
            pass
        '''))
    (root / "email" / "tests" / "test_x.py").write_text('def f():\n    """Test."""\n')
    (root / "broken.py").write_text("def f(:\n")
    files = tuple(sorted(root.rglob("*.py")))
    kept = docstring_files(files, root)
    assert [p.relative_to(root).as_posix() for p in kept] == ["broken.py", "email/mime/text.py"]
    assert docstring_rows(kept, root)["response"] == []  # broken.py does not parse; "email" spans one file only
    (root / "email" / "other.py").write_text('def g():\n    """G."""\n')
    rows = docstring_rows(docstring_files(tuple(sorted(root.rglob("*.py"))), root), root)
    assert rows["response"] == [  # file order, then source order
        "def __init__(self, _text, _subtype='plain', *, policy=None):",
        "async def fetch(self, n: int=1, **kw):",
        "def inner(x, /, y):",
        "def g():",
    ]
    assert rows["text"][0] == "Create a text/* type MIME document.\n\nBase line.\n    Indented detail."  # inspect.cleandoc
    assert rows["label"] == ["email"] * 4 and rows["path"][0] == "email/mime/text.py"


def test_top_families_need_two_files_and_break_ties_by_name():
    rows = [{"label": f, "path": f"{f}/{i % 2}.py"} for f, n in [("b", 5), ("a", 5), ("c", 9)] for i in range(n)]
    rows += [{"label": f"f{k}", "path": f"f{k}/{i}.py"} for k in range(8) for i in range(2)]
    rows += [{"label": "single", "path": "single.py"}] * 50
    top = top_families(rows)
    assert len(top) == NUM_FAMILIES and "single" not in top
    assert top == {"c", "a", "b", "f0", "f1", "f2", "f3", "f4"}


def test_classification_on_docstrings_labels_are_the_families(docstrings, tmp_path):
    cfg, docs = docstrings
    cfg = dataclasses.replace(cfg, max_documents=100, vocab_size=300, seq_len=32, cache_dir=str(tmp_path))
    data = prepare_data(cfg, task="classification", log=quiet)
    assert data.labels == sorted(set(load_documents(cfg, resolve_source(cfg), cache_dir=tmp_path,
                                                    task="classification").train["label"]))
    labels = np.array([data.train[i]["label"] for i in range(len(data.train))])
    assert set(labels.tolist()) == set(range(len(data.labels)))
