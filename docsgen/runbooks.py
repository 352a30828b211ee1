"""Absolute ``runbook_url``s for the alerting rules, under the docs site's ``site_url``.

An alert's runbook entry is a heading on a page of ``docs/`` whose anchor is the alert's
name in lower case (the heading `` `HutchWorkerDown` `` has the anchor
``hutchworkerdown``). Each ``runbook_url`` keeps its anchor; this module points it at the
page that has that heading, under ``site_url`` of ``mkdocs.yml`` (change that, run
``python -m docsgen``, and every runbook link follows). The same rewrite applies to the
``exp_annotations`` of the promtool unit tests, which must match the rules.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

from docsgen.regions import ROOT

__all__ = ["DOCS", "RULE_FILES", "anchors", "page_url", "rewrite_runbooks", "site_url",
           "slugify"]

DOCS = ROOT / "docs"
#: The rules and their promtool unit tests (both carry runbook_url annotations).
RULE_FILES = (ROOT / "deploy" / "prometheus" / "alerts.yml",
              ROOT / "deploy" / "prometheus" / "alerts.test.yml")
_RUNBOOK = re.compile(r'^([ \t]*runbook_url:[ \t]*)"([^"]*)"[ \t]*$', re.M)
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*$")


def site_url() -> str:
    """``site_url`` of ``mkdocs.yml``, ending in ``/``."""
    text = (ROOT / "mkdocs.yml").read_text()
    match = re.search(r"^site_url:\s*(\S+)\s*$", text, re.M)
    if match is None:
        raise ValueError("mkdocs.yml has no site_url: runbook links need an absolute base")
    return match.group(1).strip("'\"").rstrip("/") + "/"


def slugify(heading: str) -> str:
    """The anchor MkDocs gives a heading (Python-Markdown's ``toc`` default)."""
    explicit = re.search(r"\{\s*#([\w-]+)[^}]*\}\s*$", heading)
    if explicit:
        return explicit.group(1)
    text = re.sub(r"<[^>]+>|`", "", heading)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(page: Path) -> set[str]:
    """The anchors of a page's headings (outside code blocks)."""
    found, fenced = set(), False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (match := _HEADING.match(line)):
            found.add(slugify(match.group(1)))
    return found


def page_url(page: Path) -> str:
    """A page's URL below ``site_url`` (MkDocs' directory URLs)."""
    relative = page.relative_to(DOCS).with_suffix("")
    if relative.name == "index":
        relative = relative.parent
    text = relative.as_posix()
    return "" if text == "." else text + "/"


def _page_of(anchor: str) -> Path:
    pages = [page for page in sorted(DOCS.rglob("*.md")) if anchor in anchors(page)]
    if not pages:
        raise ValueError(f"no page of docs/ has a heading with the anchor #{anchor}: "
                         "write the alert's runbook entry first")
    if len(pages) > 1:
        raise ValueError(f"several pages have the anchor #{anchor}: {pages}")
    return pages[0]


def rewrite_runbooks(text: str) -> str:
    """``text`` (a rules or rule-tests file) with each runbook_url under ``site_url``."""
    base = site_url()

    def rewrite(match: re.Match[str]) -> str:
        anchor = match.group(2).rpartition("#")[2]
        return f'{match.group(1)}"{base}{page_url(_page_of(anchor))}#{anchor}"'

    return _RUNBOOK.sub(rewrite, text)
