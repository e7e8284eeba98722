"""Write resources/quality/demo_heldout.txt: the demo model's held-out text for the quality step.

The demo corpus (resources/demo_corpus.txt) is Python standard-library docstrings, one paragraph a
line. This writes more of the same kind, from modules the corpus does not draw on, the same way:
each module's docstring and those of its public functions and classes, split into paragraphs at
blank lines, whitespace folded, leaving out doctest examples and shell sessions (`>>>`, `$ `),
paragraphs under 40 characters and any paragraph that is a line of the corpus. It reads the
docstrings of the Python running it; the bundled file came from CPython 3.11.7:

    .venv/bin/python resources/quality/demo_heldout.py resources/quality/demo_heldout.txt

tests/test_quality.py checks that no line of the result is a corpus line and that no run of 8
words from it is in the lines the demo model trains on.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# File, archive and text utilities, the corpus's kind of module, none of them in the corpus.
MODULES = ["zipfile", "gzip", "filecmp", "configparser", "shlex", "contextlib", "copy", "pprint"]
MIN_CHARS = 40


def paragraphs(doc: str | None) -> list[str]:
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", inspect.cleandoc(doc or ""))]


def module_paragraphs(name: str) -> list[str]:
    module = importlib.import_module(name)
    docs = [module.__doc__]
    for attribute in sorted(dir(module)):
        value = getattr(module, attribute)
        if (
            not attribute.startswith("_")
            and getattr(value, "__module__", None) == name
            and (inspect.isfunction(value) or inspect.isclass(value))
        ):
            docs.append(value.__doc__)
    return [p for doc in docs for p in paragraphs(doc)]


def heldout_lines(corpus_lines: set[str]) -> list[str]:
    seen, lines = set(corpus_lines), []
    for name in MODULES:
        for paragraph in module_paragraphs(name):
            if len(paragraph) < MIN_CHARS or ">>>" in paragraph or paragraph.startswith("$ ") or paragraph in seen:
                continue
            seen.add(paragraph)
            lines.append(paragraph)
    return lines


if __name__ == "__main__":
    corpus = (REPO / "resources/demo_corpus.txt").read_text(encoding="utf-8").splitlines()
    Path(sys.argv[1]).write_text("\n".join(heldout_lines(set(corpus))) + "\n", encoding="utf-8")
