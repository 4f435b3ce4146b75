"""Synthetic retrieval probes for the proxy: a fact planted at a random depth of held-out text, queried at the end.

Each row is exactly `context` tokens:

    filler ... " The secret code of the <noun> is <5 digits>." ... filler
    "\\n\\nWhat is the secret code of the <noun>? The secret code of the <noun> is" " <5 digits>"

Scoring needs one teacher-forced forward per row (no generation): the answer tokens' NLL, and whether the
argmax at every answer position is the answer token (greedy decoding would produce exactly the answer).
This is the capability that `linear` and `none` layers lose first and that short-context KL does not see.
Everything is a function of (tokenizer, documents, context, n_examples, seed), so the rows are reproducible.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Sequence

import torch

from .cache_dir import content_hash
from .errors import UserError

# Keys of the facts: common nouns, so the question reads naturally and no key is a rare token sequence.
NOUNS = ("apple", "bridge", "candle", "desert", "engine", "forest", "garden", "harbor", "island", "jacket",
         "kettle", "ladder", "mirror", "needle", "orchard", "pencil", "quarry", "river", "saddle", "tunnel",
         "violin", "window", "anchor", "basket", "castle", "dragon", "falcon", "glacier", "helmet", "lantern",
         "meadow", "oyster", "parrot", "rocket", "statue", "tractor", "valley", "wagon", "beacon", "compass")

# How far from the drawn depth the fact may move to start after a sentence end rather than inside a word.
SNAP_REACH = 64
_SENTENCE_ENDS = (".", "!", "?", "\n")


@dataclass(frozen=True)
class NeedleSet:
    """Needle rows, all `context` tokens long, each ending with its answer tokens."""

    input_ids: torch.Tensor  # (N, context)
    answer_len: torch.Tensor  # (N,): the answer is the last answer_len[i] tokens of row i
    needle_start: torch.Tensor  # (N,): index of the planted fact's first token
    needle_len: torch.Tensor  # (N,): tokens of the planted fact
    keys: tuple[str, ...]  # the noun of each fact
    answers: tuple[str, ...]  # the 5-digit code of each fact

    @property
    def context(self) -> int:
        return self.input_ids.shape[1]

    @property
    def hash(self) -> str:
        """Identifies the rows (for cache keys of metrics computed on them)."""
        return content_hash("needles", hashlib.sha256(self.input_ids.numpy().tobytes()).hexdigest(),
                            self.answer_len.tolist())


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def filler_stream(tokenizer, documents: Sequence[str], n_tokens: int, seed: int) -> list[int]:
    """At least `n_tokens` tokens of `documents` (EOS between them) in a seeded hash order, so every seed
    draws on the whole held-out text rather than its first documents; fewer when the text runs out."""
    order = sorted(documents, key=lambda doc: hashlib.sha256(f"{seed}:needles\0{doc}".encode()).digest())
    stream: list[int] = []
    for doc in order:
        if len(stream) >= n_tokens:
            break
        stream += _ids(tokenizer, doc) + [tokenizer.eos_token_id]
    return stream


def _snap_to_sentence(tokenizer, filler: list[int], position: int) -> int:
    """The position nearest to `position` (at most SNAP_REACH away, later first on ties) that follows a
    sentence end, so the fact does not split a word; `position` itself when there is none."""
    def after_sentence_end(candidate: int) -> bool:
        if candidate == 0:
            return True
        previous = filler[candidate - 1]
        return previous == tokenizer.eos_token_id or tokenizer.decode([previous]).rstrip(" ").endswith(_SENTENCE_ENDS)

    for distance in range(SNAP_REACH + 1):
        for candidate in (position + distance, position - distance):
            if 0 <= candidate <= len(filler) and after_sentence_end(candidate):
                return candidate
    return position


def _example(tokenizer, rng: random.Random, stream: list[int], offset: int, context: int, depth: float) -> dict:
    """One row: the fact planted at `depth` (0 = start, 1 = end) of filler taken from `stream` at `offset`."""
    noun, code = rng.choice(NOUNS), str(rng.randrange(10_000, 100_000))
    answer = _ids(tokenizer, f" {code}")  # the same tokens in the fact and after the question
    fact = _ids(tokenizer, f" The secret code of the {noun} is") + answer + _ids(tokenizer, ".")
    query = _ids(tokenizer, f"\n\nWhat is the secret code of the {noun}? The secret code of the {noun} is")
    filler_len = context - len(fact) - len(query) - len(answer)
    if filler_len < 1:
        raise UserError(f"needles.context: {context} tokens leaves no room for filler; "
                        f"allowed: >= {context - filler_len + 1}")
    if len(stream) < filler_len:
        raise UserError(f"needles: the held-out text has {len(stream)} tokens, fewer than one context's filler "
                        f"({filler_len}); use a shorter context or more documents")
    filler = (stream[offset:] + stream[:offset])[:filler_len]  # wraps around: rows may share text, not positions
    start = _snap_to_sentence(tokenizer, filler, round(depth * filler_len))
    row = filler[:start] + fact + filler[start:] + query + answer
    return {"row": row, "answer_len": len(answer), "start": start, "fact_len": len(fact), "noun": noun, "code": code}


def make_needles(tokenizer, documents: Sequence[str], context: int = 2048, n_examples: int = 8,
                 seed: int = 0) -> NeedleSet:
    """`n_examples` rows of `context` tokens from held-out `documents`, one planted fact each.

    Depths are stratified (row i's drawn depth lies in [i/n, (i+1)/n)), so a few rows already cover the
    whole context; the fact then moves to the nearest sentence start (at most SNAP_REACH tokens away).
    """
    if n_examples < 1:
        raise UserError(f"needles.n_examples: {n_examples}; allowed: >= 1")
    rng = random.Random(f"{seed}:needles")
    stream = filler_stream(tokenizer, documents, n_examples * context, seed)
    stride = max(len(stream) // n_examples, 1)  # each row starts its filler at a different place
    rows = [_example(tokenizer, rng, stream, i * stride, context, (i + rng.random()) / n_examples)
            for i in range(n_examples)]
    return NeedleSet(input_ids=torch.tensor([r["row"] for r in rows], dtype=torch.long),
                     answer_len=torch.tensor([r["answer_len"] for r in rows]),
                     needle_start=torch.tensor([r["start"] for r in rows]),
                     needle_len=torch.tensor([r["fact_len"] for r in rows]),
                     keys=tuple(r["noun"] for r in rows), answers=tuple(r["code"] for r in rows))
