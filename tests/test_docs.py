"""The README is a front page and the docs' links resolve. Pure Python: no torch, no network."""
from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TEST_COMMAND = "python -m pytest -q tests"
MAX_README_LINES = 200

_FENCE = re.compile(r"^\s*(```|~~~)")
_INLINE_CODE = re.compile(r"(`+)(.+?)\1")
# [text](target) or ![alt](target), with an optional "title"; text may hold nested brackets one deep.
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def _prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    out, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return out


def link_targets(text: str) -> list[str]:
    """Every inline link and image target in markdown text, outside code blocks and code spans."""
    targets = []
    for line in _prose_lines(text):
        line = _INLINE_CODE.sub(lambda m: "x" * len(m.group(2)), line)
        targets += [m.group(1) for m in _LINK.finditer(line)]
    return targets


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: rendered text, lowercased, punctuation except - and _ dropped,
    spaces to hyphens."""
    text = re.sub(r"!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\([^)]*\)", r"\1", heading)  # links -> their text
    text = re.sub(r"<[^>]+>", "", text)  # inline html tags
    text = text.replace("`", "")
    text = re.sub(r"(\*+|(?<!\w)_+|_+(?!\w))", "", text)  # emphasis markers, not snake_case
    out = []
    for ch in text.strip().lower():
        if ch in " -_" or ch.isalnum() or unicodedata.category(ch).startswith("M"):
            out.append("-" if ch == " " else ch)
    return "".join(out)


def heading_anchors(text: str) -> set[str]:
    """The anchors GitHub makes for a markdown file's headings (repeats get -1, -2, ...)."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    for line in _prose_lines(text):
        m = _HEADING.match(line)
        if not m:
            continue
        slug = github_slug(m.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    anchors.update(re.findall(r"<a\s+(?:name|id)=\"([^\"]+)\"", text))
    return anchors


def broken_links(md_file: Path, text: str | None = None) -> list[str]:
    """The relative links of one markdown file that do not resolve: a missing file, or an #anchor
    that names no heading of the markdown file it points to."""
    text = md_file.read_text(encoding="utf-8") if text is None else text
    bad = []
    for target in link_targets(text):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # http:, https:, mailto:, ...
            continue
        path, _, anchor = target.partition("#")
        if not path:  # an anchor in this same file
            if anchor and anchor not in heading_anchors(text):
                bad.append(f"{md_file.name}: {target} (no such heading)")
            continue
        dest = (md_file.parent / path).resolve()
        if not dest.exists():
            bad.append(f"{md_file.name}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and dest.is_file():
            if anchor not in heading_anchors(dest.read_text(encoding="utf-8")):
                bad.append(f"{md_file.name}: {target} (no such heading)")
    return bad


def _doc_files() -> list[Path]:
    return [README] + sorted((ROOT / "docs").glob("*.md"))


def test_readme_is_a_front_page():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines; move detail into docs/"


@pytest.mark.parametrize("md_file", _doc_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(md_file):
    assert broken_links(md_file) == []


def test_readme_states_the_ci_test_command():
    assert TEST_COMMAND in README.read_text(encoding="utf-8")
    ci = ROOT / ".ci" / "run"
    if ci.exists():
        assert TEST_COMMAND in ci.read_text(encoding="utf-8"), ".ci/run and the README disagree"


def test_github_slug():
    assert github_slug("6. Data and environments") == "6-data-and-environments"
    assert github_slug("Does EDIS help? A CPU-scale study") == "does-edis-help-a-cpu-scale-study"
    assert github_slug("Known limitations (measured on small problems in this repo's tests and probes)") == (
        "known-limitations-measured-on-small-problems-in-this-repos-tests-and-probes")
    assert github_slug("What the code does (design and math: [`docs/design.md`](docs/design.md))") == (
        "what-the-code-does-design-and-math-docsdesignmd")
    assert github_slug("3.9 Measured in this repo") == "39-measured-in-this-repo"
    assert github_slug("The `PointMaze_UMaze` run, *briefly*") == "the-pointmaze_umaze-run-briefly"
    assert heading_anchors("# A\n## A\n```\n# B\n```\n") == {"a", "a-1"}


def test_checker_finds_broken_links(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "pic.png").write_bytes(b"")
    (tmp_path / "docs" / "other.md").write_text("# Other\n\n## Part two\n", encoding="utf-8")
    md = tmp_path / "README.md"
    good = ("![pic](docs/pic.png) [o](docs/other.md#part-two) [self](#top) [web](https://x.org/a.md)"
            " [mail](mailto:a@b.c) `[not](a/link.md)`\n\n# Top\n\n```\n[in code](nowhere.md)\n```\n")
    assert broken_links(md, good) == []
    bad = "# Top\n[gone](docs/missing.md) ![pic](docs/nopic.png) [o](docs/other.md#part-three) [s](#nope)\n"
    assert broken_links(md, bad) == [
        "README.md: docs/missing.md (no such file)",
        "README.md: docs/nopic.png (no such file)",
        "README.md: docs/other.md#part-three (no such heading)",
        "README.md: #nope (no such heading)",
    ]
