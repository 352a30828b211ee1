"""``hutch``, the command line: one module per command group, each with ``register``.

- :mod:`pipeline.cli.main`: the entry point; builds the parser from the groups and the
  ``hutch.commands`` entry points, turns expected failures into one line and an exit code;
- :mod:`pipeline.cli.common`: ``--config``, exit codes, lazily filled subcommands;
- :mod:`pipeline.cli.worker`: ``hutch worker``;
- :mod:`pipeline.cli.submit`: ``hutch submit``;
- :mod:`pipeline.cli.mock`: ``hutch mock-backend``;
- :mod:`pipeline.cli.status`: ``hutch status``;
- :mod:`pipeline.cli.pool`: ``hutch pool pause|resume|list``;
- :mod:`pipeline.cli.demo`: ``hutch demo``;
- :mod:`pipeline.cli.dlq`: ``hutch dlq list|replay|purge``.

``hutch bench`` is registered by :mod:`hutch_bench.commands`, ``hutch topology``,
``client`` and ``worker-user`` by :mod:`topology.commands` (both entry points). Importing
this package imports nothing else.
"""

__all__: list[str] = []
