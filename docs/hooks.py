"""mkdocs hook: pages made of README sections, so the guides have one source (the README).

A page holds ``<!-- readme: Heading one | Heading two -->``; each named ``## `` section of README.md (up to the next
``## ``) replaces it, with links rewritten for the site (images under ``docs/images/``, the distributed note, anchors
that moved to other pages) and the plots kept only in the repository (``examples/results/``) left out.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = re.compile(r"<!-- readme: (.+?) -->")
# README anchors whose section lives on another page of the site
ANCHORS = {
    "#which-method-when-the-papers-findings": "guides/methods.md#which-method-when-the-papers-findings",
    "#references": "references.md",
    "#advise-will-second-order-help-my-run": "guides/advise.md#advise-will-second-order-help-my-run",
}


def sections(text: str) -> dict[str, str]:
    """``## `` heading -> the section's text (heading included); ``intro``: the text before the first one, without
    the title."""
    parts = re.split(r"(?m)^(?=## )", text)
    found = {part.splitlines()[0][3:].strip(): part for part in parts if part.startswith("## ")}
    found["intro"] = re.sub(r"(?m)\A# .*\n", "", parts[0])
    return found


def _for_site(text: str, page_path: str) -> str:
    depth = page_path.count("/")
    up = "../" * depth
    text = re.sub(r"!\[[^\]]*\]\(examples/results/[^)]+\)", "", text)  # plots kept in the repository only
    text = text.replace("](docs/images/", f"]({up}images/").replace("](docs/distributed.md)", f"]({up}distributed.md)")
    for anchor, target in ANCHORS.items():
        text = text.replace(f"]({anchor})", f"]({up}{target})")
    return text


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    found = sections(README.read_text(encoding="utf-8"))

    def replace(match: re.Match[str]) -> str:
        names = [name.strip() for name in match.group(1).split("|")]
        missing = [name for name in names if name not in found]
        if missing:
            raise KeyError(f"{page.file.src_path}: README has no section {missing}")
        return "\n".join(_for_site(found[name], page.file.src_path) for name in names)

    return MARKER.sub(replace, markdown)
