"""Dispatch: a delivery from a pool's work queue walks to its one Outcome.

- :mod:`pipeline.dispatch.decide`: every decision as a pure function over the delivery
  context (admit, before an attempt, after a failed attempt);
- :mod:`pipeline.dispatch.dispatcher`: runs the steps: parse, admit, call the backend
  (retrying in place), hand the Outcome to the settler.

The delivery context and the outcomes are the shared data modules
:mod:`pipeline.delivery` and :mod:`pipeline.outcome`.
"""
