"""The README stays a short first page, and the docs it links cover every option."""

from __future__ import annotations

import re
from pathlib import Path

from tokenswift.cli import options_markdown
from tokenswift.params import PARAMS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_the_readme_is_short_and_starts_with_the_two_commands():
    lines = README.splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines (at most 300; move detail into docs/)"
    head = "\n".join(lines[:40])
    assert "pip install torch==2.13.0" in head and "tokenswift generate" in head, \
        "set-up command not in the first 40 lines"
    assert "python -m pytest" in head, "test command not in the first 40 lines"


def test_every_docs_page_is_linked_from_the_readme_and_every_link_resolves():
    pages = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    assert len(pages) >= 3, pages
    linked = set(re.findall(r"\]\(docs/([\w.-]+\.md)", README))
    assert set(pages) <= linked, f"docs pages not linked from the README: {sorted(set(pages) - linked)}"
    for src in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", src.read_text(encoding="utf-8")):
            if "://" in target:
                continue
            assert (src.parent / target).exists(), f"{src.name} links to {target}, which does not exist"


def test_the_cli_page_lists_every_option_as_the_parser_has_it():
    page = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    generated = options_markdown()
    assert generated in page, (
        "docs/cli.md's option list is out of date: regenerate its '## Every option' part with "
        "python -c 'from tokenswift.cli import options_markdown as m; print(m())'")
    for p in PARAMS.values():
        if p.flag:
            assert f"`{p.flag}`" in page, f"{p.flag} ({p.name}) is not in docs/cli.md"
