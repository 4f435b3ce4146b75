"""The workload latency is measured for, and the one place its derived values are decided."""
from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError


@dataclass(frozen=True)
class Workload:
    """What latency is measured for: a prefill of `prefill` tokens, then `decode` cached one-token steps, for
    `batch` sequences at once, timed `repeats` times. The laptop default: a 2,048-token prefill, batch 1."""

    prefill: int = 2048
    decode: int = 0
    batch: int = 1
    repeats: int = 3

    def __post_init__(self):
        for name in ("prefill", "batch", "repeats"):
            if getattr(self, name) < 1:
                raise UserError(f"workload.{name}: {getattr(self, name)} must be >= 1")
        if self.decode < 0:
            raise UserError(f"workload.decode: {self.decode} must be >= 0")

    @property
    def context(self) -> int:
        """Tokens a sequence holds at the end of a request (what KV bytes are counted at)."""
        return self.prefill + self.decode
