"""Docs that cannot drift: README and the guides under docs/ are checked against the repository.

* every relative link and image resolves (the file exists; an ``#anchor`` names a heading of that file);
* every ``cervl ...`` command line in a code block parses with the real argument parser;
* every shipped config a guide names exists and loads.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"```(\w*)\n(.*?)```", re.S)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    return {_slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


def _links(path: Path) -> list[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    return [m.group(1) for m in LINK.finditer(text)]


def test_docs_exist_and_readme_is_a_front_page():
    assert len(DOCS) >= 10, "the guides live under docs/"
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; move detail into a guide under docs/"
    assert lines[2:6] == ["```bash", lines[3], lines[4], "```"] and lines[3].startswith("make demo") \
        and lines[4].startswith("make test"), "README starts with exactly the two set-up commands"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_relative_link_and_image_resolves(doc):
    bad = []
    for target in _links(doc):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target}: no heading '{anchor}' in {dest.name}")
    assert not bad, f"{doc.name}: " + "; ".join(bad)


def _command_lines(text: str) -> list[str]:
    """The ``cervl ...`` lines of the bash code blocks, continuations joined, comments dropped."""
    out = []
    for lang, body in FENCE.findall(text):
        if lang not in ("bash", "sh", ""):
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = re.split(r"\s#\s|\s#$|^#", line, maxsplit=1)[0].strip()
            m = re.match(r"(?:\.venv/bin/)?cervl (.*)", line) or re.search(r"-m cervl\.cli (.*)", line)
            if m:
                out.append(m.group(1))
    return out


def _argv(command: str) -> list[str]:
    # "[--workers N]" marks an optional part: parse it too, so optional flags cannot drift either.
    # "a|b" inside brackets offers alternatives: the first one is checked.
    command = re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split("|")[0], command)
    command = command.split(";")[0]
    return shlex.split(command)


def test_every_cervl_command_in_the_docs_parses():
    from cervl.cli.parser import build_parser

    parser = build_parser()
    checked, bad = 0, []
    for doc in DOCS:
        for command in _command_lines(doc.read_text(encoding="utf-8")):
            try:
                parser.parse_args(_argv(command))
            except SystemExit:
                bad.append(f"{doc.name}: cervl {command}")
            checked += 1
    assert checked >= 40, f"only {checked} command lines found: the extractor is broken"
    assert not bad, "these documented commands do not parse:\n" + "\n".join(bad)


def test_every_config_a_guide_names_exists_and_loads():
    from cervl.experiments.ablate import load_ablation
    from cervl.train.config import load_config

    named = set()
    for doc in DOCS:
        named |= set(re.findall(r"configs/[\w./-]+\.yaml", doc.read_text(encoding="utf-8")))
    assert len(named) >= 5
    for rel in sorted(named):
        path = ROOT / rel
        assert path.is_file(), f"a guide names {rel}, which does not exist"
        if "accelerate" in path.parts:
            assert yaml.safe_load(path.read_text())["num_processes"] >= 1
        elif path.name.startswith("ablation"):
            assert load_ablation(path)[1]
        else:
            assert load_config(path).stages
