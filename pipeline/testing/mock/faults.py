"""Which requests the mock faults: seeded dice for throttling, failures and hangs.

Two generators: throttling is drawn when a request arrives, failures and hangs once it
holds a slot. With one generator a seeded run would depend on how those interleave.
"""

from __future__ import annotations

import random
from enum import Enum

from pipeline.testing.mock.config import MockConfig

__all__ = ["Fault", "FaultDice"]


class Fault(Enum):
    """What happens to a request that holds a slot."""

    NONE = "none"
    FAIL = "fail"
    HANG = "hang"


class FaultDice:
    """Draws the faults of one configuration; a new one restarts the sequence
    (``fail_first`` counts again, the seeds start over)."""

    def __init__(self, config: MockConfig) -> None:
        self.config = config
        seed = config.seed
        self._door_rng = random.Random(None if seed is None else f"{seed}:door")
        self._slot_rng = random.Random(None if seed is None else f"{seed}:slot")
        self._slots_taken = 0

    def throttle_now(self) -> bool:
        """Whether a request arriving now is answered 429 at the door."""
        rate = self.config.throttle_rate
        return rate > 0 and self._door_rng.random() < rate

    def in_slot(self) -> Fault:
        """What happens to a request that just took a slot."""
        config = self.config
        self._slots_taken += 1
        if self._slots_taken <= config.fail_first:
            return Fault.FAIL
        if not (config.fail_rate or config.hang_rate):
            return Fault.NONE
        # Rates are fractions of all requests; throttled ones never get here.
        passed = 1.0 - config.throttle_rate
        draw = self._slot_rng.random() * passed
        if draw < config.fail_rate:
            return Fault.FAIL
        if draw < config.fail_rate + config.hang_rate:
            return Fault.HANG
        return Fault.NONE
