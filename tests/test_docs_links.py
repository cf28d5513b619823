"""The documentation's relative links resolve, and the README stays a short front door.

Checks every markdown link ``[text](target)`` in ``README.md`` and ``docs/*.md`` whose target is not a URL:
the file or folder must exist, and a ``#fragment`` into a markdown file must name one of its headings
(GitHub's anchor rule: lower case, punctuation dropped, spaces to hyphens). Fenced code blocks are skipped.
"""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
README_MAX_LINES = 300


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set:
    body = FENCE.sub("", page.read_text(encoding="utf-8"))
    return {anchor(line.lstrip("#")) for line in body.splitlines() if re.match(r"#{1,6} ", line)}


def links(page: Path):
    body = FENCE.sub("", page.read_text(encoding="utf-8"))
    for match in LINK.finditer(body):
        target = match.group(1) or match.group(2)
        if not re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
            yield target


def broken_links(page: Path):
    for target in links(page):
        path, _, fragment = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            yield f"{target} (no such file)"
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            yield f"{target} (no heading #{fragment} in {dest.name})"


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_relative_links_resolve(page):
    broken = list(broken_links(page))
    assert not broken, f"{page.relative_to(ROOT)}: broken links: " + "; ".join(broken)


def test_readme_is_a_short_front_door():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES})"


def test_the_checker_finds_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "there.md").write_text("# A heading\n")
    page.write_text("[ok](there.md) [ok](there.md#a-heading) [bad](missing.md) [bad](there.md#nowhere)\n"
                    "```\n[in code](ignored.md)\n```\n[web](https://example.org/x.md)\n")
    assert list(broken_links(page)) == ["missing.md (no such file)", "there.md#nowhere (no heading #nowhere in there.md)"]
