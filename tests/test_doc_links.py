"""Every relative link in README.md and docs/*.md resolves: the file exists, and an anchor names a
heading of the page it points into (GitHub's anchors: render.slug, -1, -2, ... for repeated headings).
Code blocks and inline code are not links."""

import re
from pathlib import Path

import pytest

from hybridchat.results.render import slug

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def without_code(text: str, inline: bool = True) -> str:
    """text without fenced code blocks (and inline code: headings keep theirs, GitHub's anchors drop it)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text) if inline else text


def anchors(page: Path) -> set[str]:
    found, seen = set(), {}
    for heading in re.findall(r"^#{1,6} (.+)$", without_code(page.read_text(encoding="utf-8"), inline=False), re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        found.add(base if n == 0 else f"{base}-{n}")
        seen[base] = n + 1
    return found


def links(page: Path) -> list[str]:
    return [t for t in LINK.findall(without_code(page.read_text(encoding="utf-8"))) if not re.match(r"[a-z]+:", t)]


def broken(page: Path) -> list[str]:
    bad = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            bad.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            bad.append(f"{target}: no heading with that anchor in {file.name}")
    return bad


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    assert not broken(page), f"{page.relative_to(ROOT)}: " + "; ".join(broken(page))


def test_the_checker_finds_a_missing_file_and_a_missing_anchor(tmp_path):
    (tmp_path / "other.md").write_text("# Title\n\n## A `code` heading: yes\n\n## Twice\n\n## Twice\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#a-code-heading-yes) [ok](other.md#twice-1) [ok](#here) [web](https://x.org/y)\n"
                    "`[not a link](nowhere.md)`\n```\n[nor this](nowhere.md)\n```\n# Here\n"
                    "[bad](missing.md) [bad](other.md#nothing) [bad](other.md#twice-2)\n")
    assert broken(page) == ["missing.md: no such file", "other.md#nothing: no heading with that anchor in other.md",
                            "other.md#twice-2: no heading with that anchor in other.md"]
