"""Every relative link and image in README.md and docs/*.md points at a file or folder of the repository.

Markdown links `[text](target)` and images `![alt](target)` are checked; web and mail links (http://, https://,
mailto:) and pure #anchors are skipped, and a #fragment is stripped before the path is looked up (relative to the
Markdown file's folder). Fenced code blocks and inline code are left out: a command's text is not a link.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
SKIP = ("http://", "https://", "mailto:")


def link_targets(text: str) -> list[str]:
    """The targets of every Markdown link and image in `text`, outside code."""
    text = INLINE_CODE.sub("", FENCE.sub("", text))
    return LINK.findall(text)


def missing_targets(md: Path) -> list[str]:
    """The relative targets of `md` that name nothing in the repository."""
    missing = []
    for target in link_targets(md.read_text(encoding="utf-8")):
        if target.startswith(SKIP) or target.startswith("#"):
            continue
        path = target.split("#", 1)[0]
        resolved = (md.parent / path).resolve()
        if not resolved.exists() or ROOT not in (resolved, *resolved.parents):
            missing.append(target)
    return missing


def test_the_link_finder_sees_links_and_images_but_not_code():
    text = ("See [a](docs/A.md#part) and ![b](img.png), [web](https://x.org), [top](#top).\n"
            "`[not](inline.md)`\n```bash\n[not](fenced.md)\n```\n")
    assert link_targets(text) == ["docs/A.md#part", "img.png", "https://x.org", "#top"]


def test_a_missing_target_is_reported(tmp_path, monkeypatch):
    md = tmp_path / "page.md"
    (tmp_path / "there.md").write_text("")
    md.write_text("[ok](there.md) [ok too](there.md#x) [gone](nowhere.md) [web](http://x.org) [a](#b)\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert missing_targets(md) == ["nowhere.md"]


@pytest.mark.parametrize("md", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_at_a_file_or_folder(md):
    assert missing_targets(md) == []
