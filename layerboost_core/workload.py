"""The workload plans are judged for, and the one place its derived values are decided."""
from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError

GIB = 2**30


@dataclass(frozen=True)
class Workload:
    """What plans are served for: requests of `prefill` prompt tokens and `decode` output tokens, `batch` of them
    in flight at once; under a memory budget, as many as fit in it beside the weights (each plan's cache decides:
    smaller caches serve more at once), at most `batch` (a server's limit on sequences in flight). The budget is
    `memory_gib`, or, without it, the weights plus `memory_sequences` sequences of the original model (all-softmax
    at `prefill + decode` tokens): a server whose memory the original fills with that many requests, whatever
    the dtype and the model. Quality is measured on prompts of `prefill` tokens; timings take `repeats` rounds.

    The schema's defaults are the `memory-bound` workload (conf/workload/): see README, "Workloads"."""

    prefill: int = 512
    decode: int = 256
    batch: int = 32
    memory_gib: float | None = None
    memory_sequences: int | None = 4
    repeats: int = 3

    def __post_init__(self):
        for name, least in (("prefill", 1), ("decode", 0), ("batch", 1), ("repeats", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise UserError(f"workload.{name}: {value!r} must be a whole number >= {least}")
        m = self.memory_gib
        if m is not None and (isinstance(m, bool) or not isinstance(m, (int, float)) or not m > 0):
            raise UserError(f"workload.memory_gib: {m!r} must be a positive number of GiB or null (the budget is then "
                            "workload.memory_sequences, or none: workload.batch sequences at once)")
        n = self.memory_sequences
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise UserError(f"workload.memory_sequences: {n!r} must be a whole number >= 1 (sequences of the original "
                            "model the memory holds beside its weights) or null")

    @property
    def context(self) -> int:
        """Tokens a sequence holds at the end of a request (what cache bytes are counted at)."""
        return self.prefill + self.decode

    @property
    def memory_bound(self) -> bool:
        """True when a memory budget decides how many sequences are served at once."""
        return self.memory_gib is not None or self.memory_sequences is not None

    def budget_bytes(self, weight_bytes: int, original_kv_bytes: int) -> int | None:
        """The memory budget in bytes (None: no budget); `original_kv_bytes`: one all-softmax sequence's cache at
        `context` tokens (what `memory_sequences` counts in)."""
        if self.memory_gib is not None:
            return int(self.memory_gib * GIB)
        if self.memory_sequences is not None:
            return weight_bytes + self.memory_sequences * original_kv_bytes
        return None

    def concurrency(self, kv_bytes_per_sequence: int, weight_bytes: int, original_kv_bytes: int) -> int:
        """Sequences served at once by a plan whose cache holds `kv_bytes_per_sequence` per sequence: `batch`, or
        under a memory budget as many as fit beside the weights, at most `batch` (0: not even one fits)."""
        budget = self.budget_bytes(weight_bytes, original_kv_bytes)
        if budget is None or kv_bytes_per_sequence <= 0:
            return self.batch
        return max(0, min(self.batch, (budget - weight_bytes) // kv_bytes_per_sequence))
