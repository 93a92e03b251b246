"""The README stays a front page, and every link of the docs leads somewhere.

A reader follows links from the README into docs/ and between pages; a link to a page or a
heading that was moved or renamed is a dead end they meet and we would not. Anchors are
checked as GitHub renders them (its heading slugs).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
#: the README is a front page: what it is, install, the two commands, a first job, links
README_MAX_BYTES = 12 * 1024


LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def without_code(text: str) -> list[str]:
    """The page's lines outside fenced code blocks, with inline code left in place."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`([^`]*)`", r"\1", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link in a heading keeps its text
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    for line in without_code(page.read_text()):
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(page: Path) -> list[str]:
    return [target for line in without_code(page.read_text()) for target in LINK.findall(line)]


def local_links(page: Path) -> list[str]:
    return [t for t in links(page) if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


def test_the_readme_is_a_front_page():
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes, over {README_MAX_BYTES}: move the detail into a docs/ page and link it"


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path):
    broken = []
    for target in local_links(page):
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        relative = dest.relative_to(ROOT.resolve()).as_posix() if dest.is_relative_to(ROOT.resolve()) else str(dest)
        if not dest.exists():
            broken.append(f"{target}: no such file")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {relative}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_every_docs_page_is_linked_from_the_readme_or_the_index():
    linked = set()
    for page in (README, DOCS / "index.md"):
        for target in local_links(page):
            path_part = target.partition("#")[0]
            if path_part:
                linked.add((page.parent / path_part).resolve())
    orphans = [p.name for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked and p.name != "index.md"]
    assert not orphans, f"docs pages no reader can find from README.md or docs/index.md: {orphans}"
    assert (DOCS / "index.md").resolve() in {(README.parent / t.partition("#")[0]).resolve() for t in local_links(README)}


def test_slugs_match_github():
    assert slug("Settings (`[batch_inference]`)") == "settings-batch_inference"
    assert slug("Starting fresh (`resume=False`)") == "starting-fresh-resumefalse"
    assert slug("From outside the cluster: Ray Client") == "from-outside-the-cluster-ray-client"
    assert slug("Deadlines, lost nodes and restarts: the failure matrix") == "deadlines-lost-nodes-and-restarts-the-failure-matrix"
