"""Which requests the mock faults: seeded dice for throttling, failures, hangs and the
stream faults.

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
    #: Stream faults: they strike a streamed reply only (see ``fault_after_tokens``).
    CUT = "cut"
    MALFORMED = "malformed"
    STALL = "stall"


#: In-slot faults in the order the draw tests them (the first two as before stream faults
#: existed, so a seeded run without stream faults draws the same sequence).
_SLOT_FAULTS = (
    ("fail_rate", Fault.FAIL),
    ("hang_rate", Fault.HANG),
    ("cut_rate", Fault.CUT),
    ("malformed_rate", Fault.MALFORMED),
    ("stall_rate", Fault.STALL),
)


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
        rates = [(float(getattr(config, name)), fault) for name, fault in _SLOT_FAULTS]
        if not any(rate for rate, _ in rates):
            return Fault.NONE
        # Rates are fractions of all requests; throttled ones never get here.
        passed = 1.0 - config.throttle_rate
        draw = self._slot_rng.random() * passed
        bound = 0.0
        for rate, fault in rates:
            bound += rate
            if draw < bound:
                return fault
        return Fault.NONE
