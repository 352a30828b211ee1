"""How old the management API's queue counts may be: a line of ``hutch status``."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["StatsFreshness"]


@dataclass
class StatsFreshness:
    """How old the management API's queue counts may be (from ``/api/overview``)."""

    #: The broker collects no statistics (``management_agent.disable_metrics_collector``).
    disabled: bool = False
    #: Statistics events the broker has not processed yet: counts lag further behind.
    event_backlog: int | None = None

    def note(self) -> str:
        """One line for the report."""
        if self.disabled:
            return ("queue counts: the broker's management statistics are disabled, so "
                    "counts are missing (-)")
        note = ("queue counts are the management API's statistics, sampled every "
                "collect_statistics_interval (5 s unless the broker sets another): they can "
                "be that old")
        if self.event_backlog:
            note += (f"; the statistics database is {self.event_backlog} events behind, so "
                     "they may be older still")
        return note
