"""The documentation: the short README, the MkDocs site under docs/, and what is generated.

* ``python -m docsgen --check`` passes: the configuration and command references, the
  example configuration and the alerts' runbook links are what the code makes of them
  (after a change to the settings model or the CLI, run ``python -m docsgen``).
* Every settings key has exactly one doc text (a ``#:`` comment in the model, else a note
  of ``docsgen.fields.NOTES``), and ``hutch.example.toml`` loads.
* Every alert's ``runbook_url`` is an absolute URL under ``site_url`` of mkdocs.yml that
  names an existing page and one of its headings.
* Facts the docs copy from the code match it: the permissions ``hutch client add`` and
  ``hutch worker-user add`` grant, every exchange and queue ``hutch topology apply``
  declares (the topology page), every queue the operator guide must explain.
* Tables keep no ``|`` inside a code span (GitHub and MkDocs end the cell there), the nav
  of mkdocs.yml lists exactly the pages of docs/, and the README stays short, keeps the
  test command CI runs, and links only to pages that exist.

``mkdocs build --strict`` itself (every link and anchor) runs in CI (.ci/run), with the
``docs`` extra.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from docsgen.__main__ import outputs
from docsgen.configuration import SECTIONS
from docsgen.fields import NOTES, comments, field_docs
from docsgen.runbooks import DOCS, anchors, site_url
from pipeline.broker.names import Names
from pipeline.broker.topology import plan
from pipeline.settings import load_settings
from topology.clients import client_permissions, worker_permissions

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
#: The README's length budget (issue 19: a README that pitches, ~250 lines).
README_MAX_LINES = 260
TEST_COMMAND = "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/pytest"

_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def resolve_runbook(url: str) -> tuple[Path, str]:
    """(page, anchor) a runbook_url names; fails when either does not exist."""
    base = site_url()
    assert url.startswith(base), f"{url} is not under mkdocs.yml's site_url {base}"
    parts = urlsplit(url)
    path = url[len(base):].split("#", 1)[0].strip("/")
    candidates = [DOCS / f"{path}.md", DOCS / path / "index.md"] if path else [
        DOCS / "index.md"]
    pages = [page for page in candidates if page.is_file()]
    assert pages, f"{url}: no page docs/{path}.md or docs/{path}/index.md"
    assert parts.fragment in anchors(pages[0]), (
        f"{url}: {pages[0].relative_to(ROOT)} has no heading with anchor #{parts.fragment}")
    return pages[0], parts.fragment


def _markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def _table_rows(text: str) -> list[str]:
    rows, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.lstrip().startswith("|"):
            rows.append(line)
    return rows


# -- generated pages ---------------------------------------------------------------------


def test_generated_docs_are_current() -> None:
    stale = [name for name, (current, wanted) in outputs().items() if current != wanted]
    assert not stale, f"stale: {stale}; run `.venv/bin/python -m docsgen` and commit"


@pytest.mark.parametrize("section", [section for section, _, _ in SECTIONS])
def test_every_settings_key_has_one_doc_text(section: str) -> None:
    model = next(model for name, model, _ in SECTIONS if name == section)
    commented = comments(model)
    for doc in field_docs(model):
        note = f"{model.__name__}.{doc.key}" in NOTES
        assert doc.text, f"{model.__name__}.{doc.key} has no doc comment: add a `#:` line"
        assert not (note and doc.key in commented), (
            f"{model.__name__}.{doc.key} has a `#:` comment now: remove its note from NOTES")


def test_notes_name_existing_keys() -> None:
    models = {model.__name__: model for _, model, _ in SECTIONS}
    for name in NOTES:
        model, key = name.split(".")
        assert key in models[model].model_fields, f"NOTES names no key: {name}"


def test_example_configuration_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [key for key in __import__("os").environ if key.startswith("HUTCH_")]:
        monkeypatch.delenv(key)
    settings = load_settings(ROOT / "hutch.example.toml")
    assert [pool.name for pool in settings.pools] == ["chat"]
    text = (ROOT / "hutch.example.toml").read_text()
    for _, model, _ in SECTIONS:
        for key in model.model_fields:
            assert re.search(rf"^(# )?{key} = ", text, re.M) or key in (
                "pools", "backends", "gateway", "keys", "scheduling", "tenants", "bands"
            ), f"hutch.example.toml lacks {key}"


# -- runbook links ---------------------------------------------------------------------


def test_every_runbook_url_names_a_page_and_heading() -> None:
    rules = [rule for group in yaml.safe_load(RULES.read_text())["groups"]
             for rule in group["rules"] if "alert" in rule]
    assert rules
    for rule in rules:
        url = rule["annotations"]["runbook_url"]
        _page, anchor = resolve_runbook(url)
        assert anchor == rule["alert"].lower(), f"{rule['alert']}: {url}"


# -- facts copied from the code ------------------------------------------------------------


def test_security_page_shows_the_permissions_the_commands_grant() -> None:
    text = (DOCS / "security.md").read_text()
    names = Names("llm")
    for label, permissions in (("client A", client_permissions(names, "A")),
                               ("worker", worker_permissions(names))):
        block = "\n".join(
            f"{label if kind == 'configure' else ''}".ljust(11) + f"{kind.ljust(10)} {regex}"
            for kind, regex in permissions.as_json().items())
        assert block in text, f"docs/security.md should show, for {label}:\n{block}"


def _queue_patterns(names: Names) -> list[str]:
    """Every queue name Hutch uses, with placeholders as the docs write them."""
    return [names.triage_queue, names.parked_queue, names.workers_queue,
            names.work_queue("<pool>"), names.lane_prefix("<pool>") + "<band>.<n>",
            names.retry_queue(0).replace("0ms", "<delay>ms"),
            names.pause_queue("<pool>"), names.lease_queue("<backend>"),
            names.reply_queue("<client>"), names.cancel_queue("<worker id>")]


def test_topology_page_lists_every_object_apply_declares() -> None:
    text = (DOCS / "reference" / "topology.md").read_text()
    settings = load_settings(pools=[{"name": "p", "models": ["m"], "backends": [
        {"name": "b", "url": "http://127.0.0.1:9/v1", "max_concurrency": 1}]}])
    planned = plan(settings)
    for name in [e.name for e in planned.exchanges] + [q.name for q in planned.queues]:
        shown = re.sub(r"\.retry\.\d+ms$", ".retry.<delay>ms", name).replace(
            ".work.p", ".work.<pool>")
        shown = re.sub(r"\.lane\.p\.\w+\.\d+$", ".lane.<pool>.<band>.<n>", shown)
        assert f"`{shown}`" in text, f"docs/reference/topology.md does not list {shown}"


def test_operator_guide_says_what_each_queue_is_for() -> None:
    text = (DOCS / "operations" / "index.md").read_text()
    rows = {row.split("|")[1].strip() for row in _table_rows(text)}
    missing = [name for name in _queue_patterns(Names("llm")) if f"`{name}`" not in rows]
    assert not missing, f"'What each queue is for' lacks {missing}"


# -- Markdown hygiene -------------------------------------------------------------------------


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_pipe_inside_a_code_span_of_a_table(path: Path) -> None:
    for row in _table_rows(path.read_text()):
        spans = [span for _, span in _CODE_SPAN.findall(row) if "|" in span]
        assert not spans, f"{path.name}: a `|` inside {spans} ends the table cell: {row[:80]}"


def test_nav_lists_exactly_the_pages() -> None:
    nav = re.findall(r"^\s*- (?:[^:\n]+: )?([\w./-]+\.md)\s*$",
                     (ROOT / "mkdocs.yml").read_text(), re.M)
    pages = sorted(page.relative_to(DOCS).as_posix() for page in DOCS.rglob("*.md"))
    assert len(nav) == len(set(nav)), "a page is twice in the nav"
    assert sorted(nav) == pages, (
        f"in the nav only: {set(nav) - set(pages)}; not in the nav: {set(pages) - set(nav)}")


def test_readme_is_short_and_keeps_the_test_command() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    assert TEST_COMMAND in text


def test_readme_links_to_pages_that_exist() -> None:
    for target in _LINK.findall(README.read_text()):
        if re.match(r"[a-z]+://|#|mailto:", target):
            continue
        path = target.split("#", 1)[0]
        assert (ROOT / path).exists(), f"README links to {target}, which does not exist"
