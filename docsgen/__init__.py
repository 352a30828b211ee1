"""Generates the parts of the documentation that the code defines, so they cannot rot.

``python -m docsgen`` (from the repository root, in the project's virtualenv) rewrites:

* ``docs/reference/configuration.md``: the tables of every settings key (type, default,
  constraints, doc comment), from the settings model (:mod:`pipeline.settings`,
  :mod:`pipeline.gateway.settings`), between the page's generated-region markers;
* ``docs/reference/cli.md``: every command's usage and options, from ``hutch``'s argument
  parser (:func:`pipeline.cli.main.build_parser`), between its markers;
* ``hutch.example.toml``: every key with its default, from the same model;
* ``docs/benchmarks.md``: the results table and the machine of ``BENCHMARKS.md``;
* the ``runbook_url`` annotations of ``deploy/prometheus/alerts.yml``: absolute URLs under
  ``site_url`` of ``mkdocs.yml``, to each alert's heading in ``docs/``.

``python -m docsgen --check`` writes nothing and exits 1 naming each stale file
(``tests/test_docs.py`` runs it). Not part of the installed package: it is a tool of the
repository, like ``scripts/``.
"""

from __future__ import annotations

__all__: list[str] = []
