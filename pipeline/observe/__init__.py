"""Observing: metrics and logs, each through one place, attached by the delivery hooks.

- :mod:`pipeline.observe.hooks`: the seam around a delivery (received, call started and
  ended, retrying, settled) and the logging hook;
- :mod:`pipeline.observe.metrics`: the Prometheus families and the metrics hook;
- :mod:`pipeline.observe.log`: structured JSON log lines.
"""
