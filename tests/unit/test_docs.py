"""The README stays a short front page whose links all lead somewhere; the changelog stays one file.

The docs site itself is checked by ``make docs`` (``mkdocs build --strict``: pages, links, anchors). The
README is not part of the site, so its links into ``docs/`` are checked here, anchors included.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
README_LIMIT = 15 * 1024  # bytes: what a newcomer reads on a screen or two
CHANGELOG_PAGE = ROOT / "docs" / "changelog.md"

FENCE = re.compile(r"^(```|~~~).*?^\1\s*$", re.M | re.S)
CODE_SPAN = re.compile(r"`[^`\n]*`")
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?(?P<target>[^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(?P<target>\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.M)
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # https:, mailto:, ...
HEADING = re.compile(r"^#{1,6}\s+(?P<text>.+?)\s*#*\s*$", re.M)
EXPLICIT_ID = re.compile(r"\{[^}]*#(?P<id>[\w-]+)[^}]*\}\s*$")


def links(markdown: str) -> list[str]:
    """Every link target of a Markdown text, outside code blocks and code spans."""
    text = CODE_SPAN.sub("", FENCE.sub("", markdown))
    return [m["target"] for m in INLINE_LINK.finditer(text)] + [
        m["target"] for m in REFERENCE_LINK.finditer(text)
    ]


def slug(heading: str) -> str:
    """The anchor Python-Markdown's toc extension (so MkDocs) gives a heading, or its ``{ #id }``."""
    explicit = EXPLICIT_ID.search(heading)
    if explicit:
        return explicit["id"]
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text stays, its target goes
    text = text.replace("`", "").replace("*", "")
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(markdown: str) -> set[str]:
    """The anchors of a page's headings (code blocks left out: a ``# comment`` there is no heading)."""
    return {slug(m["text"]) for m in HEADING.finditer(FENCE.sub("", markdown))}


def broken_links(document: Path) -> list[str]:
    """The relative links of ``document`` whose file, or whose heading in a Markdown file, is missing."""
    broken = []
    for target in links(document.read_text(encoding="utf-8")):
        if EXTERNAL.match(target):
            continue
        path_part, _, anchor = target.partition("#")
        path = (document.parent / path_part).resolve() if path_part else document
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path.read_text(encoding="utf-8")):
            broken.append(f"{target}: {path.name} has no heading with the anchor #{anchor}")
    return broken


def test_the_readme_fits_on_a_screen_or_two():
    size = README.stat().st_size
    assert size < README_LIMIT, (
        f"README.md is {size} bytes, over {README_LIMIT}: move the detail into a page of docs/ and link it"
    )


def test_every_relative_link_of_the_readme_leads_somewhere():
    assert links(README.read_text(encoding="utf-8")), "the README should link into docs/"
    assert broken_links(README) == []


def test_the_changelog_page_includes_the_one_changelog():
    assert CHANGELOG_PAGE.read_text(encoding="utf-8").strip() == '--8<-- "CHANGELOG.md"'


# The checker itself: it must see what is broken --------------------------------------------------


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        ("Why `prefetch_count` is 100", "why-prefetch_count-is-100"),
        ("Group calls and flush() across processes", "group-calls-and-flush-across-processes"),
        ("Capacity: per channel, then per process", "capacity-per-channel-then-per-process"),
        ("What is lost, and when", "what-is-lost-and-when"),
        ("This project ÷ peer (ratio of medians)", "this-project-peer-ratio-of-medians"),
        ("See [the docs](docs/x.md) now", "see-the-docs-now"),
        ("Named { #chosen-id }", "chosen-id"),
    ],
)
def test_slug_is_the_anchor_mkdocs_gives(heading, anchor):
    assert slug(heading) == anchor


def test_broken_links_finds_missing_files_and_anchors_and_skips_code(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# Page\n\n## A heading\n\n```sh\n# not a heading\n```\n")
    document = tmp_path / "README.md"
    document.write_text(
        "# Top\n\n"
        "[ok](docs/page.md) [ok](docs/page.md#a-heading) [ok](#top) [ok](https://example.com/x)\n"
        "[gone](docs/gone.md) [bad](docs/page.md#not-a-heading) [bad](#nowhere)\n"
        "`[in code](docs/code.md)`\n\n"
        "```md\n[in a fence](docs/fence.md)\n```\n\n"
        "[ref]: docs/ref.md\n",
        encoding="utf-8",
    )
    assert broken_links(document) == [
        "docs/gone.md: no such file",
        "docs/page.md#not-a-heading: page.md has no heading with the anchor #not-a-heading",
        "#nowhere: README.md has no heading with the anchor #nowhere",
        "docs/ref.md: no such file",
    ]
