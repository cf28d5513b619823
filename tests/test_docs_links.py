"""The documentation's links and the citations in code, tests and docs resolve; the README stays short.

- Every markdown link ``[text](target)`` in ``README.md`` and ``docs/*.md`` whose target is not a URL: the file
  or folder must exist, and a ``#fragment`` into a markdown file must name one of its headings (GitHub's anchor
  rule: the rendered text in lower case, punctuation other than ``-`` and ``_`` dropped, spaces to hyphens).
  Fenced code blocks are skipped.
- Every mention of a document (a name ending in ``.md``) in the project's text files (``.py``, ``.md``,
  notebooks, the Makefile, CI scripts ...): the repository must hold it, relative to the mentioning file, to
  the repository root or to ``docs/`` (so ``docs/theory.md`` in a docstring and ``theory.md`` in a page both
  resolve). Not citations, so exempt: the names of files the commands write (:data:`OUTPUT_NAMES`), and a name
  that is a whole string literal (``out / "summary.md"``, a test's ``tmp_path / "page.md"``).
- Every citation of a section, ``X.md#anchor`` (markdown links and plain text alike, also in Python comments
  and docstrings), must name a heading of that document.

This file is not scanned itself: its self-tests hold deliberately broken examples.
"""
import fnmatch
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
CODE_SPAN = re.compile(r"(`+)(?!`).+?(?<!`)\1")  # inline code: `kernel[grid](...)` is not a link
README_MAX_LINES = 300


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: its rendered text in lower case, punctuation other than ``-`` and ``_``
    dropped, spaces to hyphens. Rendering drops link targets, backticks, ``*`` and the ``_`` of emphasis (an
    underscore inside a word or a code span is text and stays)."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    parts = text.split("`")  # odd parts are code spans
    text = "".join(part if i % 2 else re.sub(r"\*|(?<!\w)_+|_+(?!\w)", "", part) for i, part in enumerate(parts))
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set:
    body = FENCE.sub("", page.read_text(encoding="utf-8"))
    return {anchor(line.lstrip("#")) for line in body.splitlines() if re.match(r"#{1,6} ", line)}


def links(page: Path):
    body = CODE_SPAN.sub("", FENCE.sub("", page.read_text(encoding="utf-8")))
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
                    "```\n[in code](ignored.md)\n```\n[web](https://example.org/x.md)\n"
                    "`kernel[grid](...)` is code; [`code label`](missing2.md) is a link\n")
    assert list(broken_links(page)) == ["missing.md (no such file)", "there.md#nowhere (no heading #nowhere in there.md)",
                                        "missing2.md (no such file)"]


# --- mentions of documents and citations of their sections, in every text file of the project ----------------

TEXT_SUFFIXES = {".py", ".md", ".sh", ".toml", ".cfg", ".ini", ".txt", ".yml", ".yaml", ".ipynb", ""}
OUTPUT_NAMES = {
    "summary.md": "written by `metaplastic demo` into its --out folder",
    "table1.md": "written by `metaplastic table1 --out` (and `demo`)",
}
MENTION = re.compile(r"(?<![\w/.:\-])((?:\.\.?/)*(?:[\w.\-]+/)*[\w.\-]*\w\.md)(?:#([\w\-]+))?(?![\w/])")


def ignored_patterns(root: Path) -> list:
    """The name patterns of the root ``.gitignore`` (virtual environments, caches, build and run outputs)."""
    path = root / ".gitignore"
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    return [line.strip().strip("/") for line in lines if line.strip() and not line.startswith(("#", "!"))]


def text_files(root: Path = ROOT):
    """The project's text files: everything below ``root`` except hidden folders (``.ci`` aside), what
    ``.gitignore`` names, symbolic links (the package's links to ``models/`` ...) and this file."""
    patterns = ignored_patterns(root)

    def skipped(path: Path) -> bool:
        parts = path.relative_to(root).parts
        return (path.is_symlink() or (parts[0].startswith(".") and parts[0] != ".ci")
                or any(fnmatch.fnmatch(part, pattern) for part in parts for pattern in patterns))

    stack = [root]
    while stack:
        for path in sorted(stack.pop().iterdir()):
            if skipped(path):
                continue
            if path.is_dir():
                stack.append(path)
            elif (path.suffix in TEXT_SUFFIXES and path.resolve() != Path(__file__).resolve()
                  and path.stat().st_size < 2_000_000):
                yield path


def resolve_document(name: str, source: Path, root: Path = ROOT):
    """The file a mention ``name`` in ``source`` names: relative to ``source``'s folder, the root or ``docs/``."""
    for base in (source.parent, root, root / "docs"):
        path = (base / name).resolve()
        if path.is_file():
            return path
    return None


def bad_mentions(source: Path, root: Path = ROOT):
    """Mentions of documents the repository does not hold, and ``#anchor`` citations no heading answers."""
    text = source.read_text(encoding="utf-8", errors="replace")
    if source.suffix == ".ipynb":  # the cells' text, not its JSON escapes (line numbers count cell lines)
        text = "\n".join("".join(cell.get("source", [])) for cell in json.loads(text).get("cells", []))
    for number, line in enumerate(text.splitlines(), 1):
        for match in MENTION.finditer(line):
            name, fragment = match.group(1), match.group(2)
            where = f"{source.relative_to(root).as_posix()}:{number}"
            path = resolve_document(name, source, root)
            before, after = line[match.start() - 1:match.start()], line[match.end():match.end() + 1]
            literal = before in ("'", '"') and after == before  # a file name in code, not a citation
            if path is None:
                if Path(name).name not in OUTPUT_NAMES and not literal:
                    yield f"{where}: {name} (no such document in the repository)"
            elif fragment and fragment not in anchors(path):
                yield f"{where}: {name}#{fragment} (no heading #{fragment} in {path.relative_to(root).as_posix()})"


def test_documents_cited_exist_and_their_sections_too():
    files = list(text_files())
    assert len(files) > 50, f"only {len(files)} files scanned: SCANNED lists the wrong folders"
    bad = [problem for source in files for problem in bad_mentions(source)]
    assert not bad, f"{len(bad)} citations that do not resolve:\n" + "\n".join(bad)


def test_the_checker_finds_a_missing_document_and_a_missing_section(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "theory.md").write_text("# Theory\n\n## Limit 8: grouped importance\n\n"
                                                 "```\n## Not a heading\n```\n")
    (tmp_path / "docs" / "page.md").write_text("See [limit 8](theory.md#limit-8-grouped-importance) "
                                               "and CONTRACT.md §3.\n")
    source = tmp_path / "module.py"
    source.write_text('"""Grouped (docs/theory.md#limit-8-grouped-importance); '
                      'head-shared (docs/theory.md#limit-7).\n\n'
                      'The same in OUTSIDE.md limit 8, docs/theory.md#not-a-heading, summary.md, docs/*.md and\n'
                      'https://example.org/x.md; docs/theory.md itself resolves."""\n'
                      'OUT = tmp / "written.md"  # a file name in code\n')
    assert list(bad_mentions(source, tmp_path)) == [
        "module.py:1: docs/theory.md#limit-7 (no heading #limit-7 in docs/theory.md)",
        "module.py:3: OUTSIDE.md (no such document in the repository)",
        "module.py:3: docs/theory.md#not-a-heading (no heading #not-a-heading in docs/theory.md)"]
    assert list(bad_mentions(tmp_path / "docs" / "page.md", tmp_path)) == [
        "docs/page.md:1: CONTRACT.md (no such document in the repository)"]


def test_anchors_follow_github():
    assert anchor("The chunked path (`chunk_triton.py`)") == "the-chunked-path-chunk_tritonpy"
    assert anchor("Limit 8: grouped importance") == "limit-8-grouped-importance"
    assert anchor("`--verify`, `--dtype`, `--force`") == "--verify---dtype---force"
    assert anchor("*Emphasis* and _this_ and snake_case") == "emphasis-and-this-and-snake_case"
    assert anchor("See [the docs](x.md) here") == "see-the-docs-here"
