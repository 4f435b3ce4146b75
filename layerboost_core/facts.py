"""Retrieval probes planted in the held-out blocks themselves: many facts per block, queried together at its end.

A block of held-out text keeps its length; `n` facts are planted in its first part at stratified depths
(fact k at a depth drawn in [k/n, (k+1)/n) of the text, moved to the nearest sentence start), and the queries
of all of them close the block, in a shuffled order:

    text ... " The secret code of the apple is apple-48213." ... text ... " The secret code of the river is
    river-20581." ... text "\\nThe secret code of the river is river-" "20581" "\\nThe secret code of the apple
    is apple-" "48213" ...

One forward of the block scores every fact (teacher-forced: the answer's NLL, and whether the argmax is the
answer token at every answer position, i.e. greedy decoding would write it), so retrieval costs no extra
forward beside the KL on the same block. The answer repeats its key ("apple-48213"), so finding it is an
exact lookup far back in the context: the original SmolLM2-135M finds all 16 facts of a 2,048-token block,
all-`linear` none, and a single layer swapped alone shows which layers carry it (RESULTS.md, retrieval cost). Facts
whose value had to be recalled from the key alone ("... of the apple is 48213") were found 1 time in 3 by
the original with 16 per block: keys interfere in a small model, and the probe would not separate plans.

Quality metrics skip every position whose next token is planted (fact or query text): `scored` marks the
positions of the original text, so the KL is over held-out text, never over the probe's own tokens.
Everything is a function of (tokenizer, blocks, n, seed), so the blocks are reproducible.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import torch

from .errors import UserError

# Keys of the facts: common nouns, so every fact reads naturally and no key is a rare token sequence.
NOUNS = ("apple", "bridge", "candle", "desert", "engine", "forest", "garden", "harbor", "island", "jacket",
         "kettle", "ladder", "mirror", "needle", "orchard", "pencil", "quarry", "river", "saddle", "tunnel",
         "violin", "window", "anchor", "basket", "castle", "dragon", "falcon", "glacier", "helmet", "lantern",
         "meadow", "oyster", "parrot", "rocket", "statue", "tractor", "valley", "wagon", "beacon", "compass")
MAX_FACTS = len(NOUNS)  # facts per block: each needs its own key
FACT = " The secret code of the {key} is {key}-"  # + answer tokens + FACT_END
FACT_END = "."
QUERY = "\nThe secret code of the {key} is {key}-"  # + answer tokens (what is scored)

# How far from the drawn depth a fact may move to start after a sentence end rather than inside a word.
SNAP_REACH = 64
_SENTENCE_ENDS = (".", "!", "?", "\n")
# At least this share of a block stays original text (what the KL is computed on).
MIN_TEXT_SHARE = 0.5
# Facts per block when none is set: one per this many tokens, at most DEFAULT_MAX (8 in a 512-token block, the most
# that leave MIN_TEXT_SHARE of it original text with SmolLM2's tokenizer; 16 from 1,024 tokens on, which the
# original SmolLM2 finds in a 2,048-token block).
TOKENS_PER_FACT = 64
DEFAULT_MAX = 16


def facts_for(tokens: int) -> int:
    """The facts planted per block of `tokens` tokens when a setting leaves it null."""
    return max(1, min(DEFAULT_MAX, tokens // TOKENS_PER_FACT))


@dataclass(frozen=True)
class PlantedBlocks:
    """Token blocks (N, S) with F facts planted in each and queried at its end; F = 0 is the plain blocks."""

    input_ids: torch.Tensor  # (N, S)
    scored: torch.Tensor  # (N, S - 1) bool: position i predicts token i + 1, which is original text
    answer_start: torch.Tensor  # (N, F): row index of each query's first answer token (queries in row order)
    answer_len: torch.Tensor  # (N, F)
    fact_start: torch.Tensor  # (N, F): row index of the planted fact each query asks for
    fact_len: torch.Tensor  # (N, F)
    source_start: torch.Tensor  # (N, F): row index of the answer's tokens inside that fact (what a copy reads)
    keys: tuple[tuple[str, ...], ...]  # per block, the key of each query
    answers: tuple[tuple[str, ...], ...]  # per block, the code each query must give

    @classmethod
    def plain(cls, blocks: torch.Tensor) -> "PlantedBlocks":
        """Blocks with no facts: every position is scored."""
        n, s = blocks.shape
        empty = torch.zeros(n, 0, dtype=torch.long)
        return cls(blocks, torch.ones(n, s - 1, dtype=torch.bool), empty, empty, empty, empty, empty,
                   tuple(() for _ in range(n)), tuple(() for _ in range(n)))

    @property
    def num_blocks(self) -> int:
        return self.input_ids.shape[0]

    @property
    def facts_per_block(self) -> int:
        return self.answer_start.shape[1]

    @property
    def num_facts(self) -> int:
        return self.answer_start.numel()

    def select(self, rows: slice) -> "PlantedBlocks":
        """The blocks `rows` (a slice) alone."""
        return PlantedBlocks(self.input_ids[rows], self.scored[rows], self.answer_start[rows],
                             self.answer_len[rows], self.fact_start[rows], self.fact_len[rows],
                             self.source_start[rows], self.keys[rows], self.answers[rows])

    @property
    def hash(self) -> str:
        """Identifies the blocks and where they are scored (cache keys of metrics computed on them)."""
        digest = hashlib.sha256()
        for tensor in (self.input_ids, self.scored, self.answer_start, self.answer_len):
            digest.update(tensor.numpy().tobytes())
        return digest.hexdigest()[:16]


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def _snap_to_sentence(tokenizer, text: list[int], position: int, lowest: int) -> int:
    """The position nearest to `position` (at most SNAP_REACH away, later first on ties, not below `lowest`)
    that follows a sentence end, so a fact does not split a word; `position` itself when there is none."""
    def after_sentence_end(candidate: int) -> bool:
        if candidate == 0:
            return True
        previous = text[candidate - 1]
        return previous == tokenizer.eos_token_id or tokenizer.decode([previous]).rstrip(" ").endswith(_SENTENCE_ENDS)

    for distance in range(SNAP_REACH + 1):
        for candidate in (position + distance, position - distance):
            if lowest <= candidate <= len(text) and after_sentence_end(candidate):
                return candidate
    return max(position, lowest)


def _plant(tokenizer, block: list[int], n: int, rng: random.Random, keys=None, order=None) -> dict:
    """One block with `n` facts planted and queried (see the module docstring); same length as `block`. `keys`
    and `order` (the query order), when given, are the block's instead of drawn from `rng`."""
    keys = list(keys) if keys is not None else rng.sample(NOUNS, n)
    codes: list[str] = []
    while len(codes) < n:  # distinct 5-digit codes: two facts never share an answer
        code = str(rng.randrange(10_000, 100_000))
        if code not in codes:
            codes.append(code)
    answers = [_ids(tokenizer, code) for code in codes]
    prefixes = [_ids(tokenizer, FACT.format(key=k)) for k in keys]
    facts = [prefix + a + _ids(tokenizer, FACT_END) for prefix, a in zip(prefixes, answers)]
    if order is None:
        order = list(range(n))
        rng.shuffle(order)
    queries = [(_ids(tokenizer, QUERY.format(key=keys[i])), answers[i]) for i in order]
    planted = sum(map(len, facts)) + sum(len(q) + len(a) for q, a in queries)
    text_len = len(block) - planted
    if text_len < MIN_TEXT_SHARE * len(block):
        raise UserError(f"proxy.facts: {n} facts take {planted} of a block's {len(block)} tokens, leaving less than "
                        f"{MIN_TEXT_SHARE:.0%} of original text; allowed: fewer facts or longer blocks")
    text = block[:text_len]
    starts, lowest = [], 0
    for k in range(n):  # stratified depths, snapped to sentence starts, kept in order
        start = _snap_to_sentence(tokenizer, text, round((k + rng.random()) / n * text_len), lowest)
        starts.append(start)
        lowest = start
    row: list[int] = []
    original: list[bool] = []  # per row token: original text (True) or planted (False)
    fact_at: dict[int, tuple[int, int]] = {}
    previous = 0
    for k, start in enumerate(starts):
        row += text[previous:start]
        original += [True] * (start - previous)
        fact_at[k] = (len(row), len(facts[k]))
        row += facts[k]
        original += [False] * len(facts[k])
        previous = start
    row += text[previous:]
    original += [True] * (text_len - previous)
    answer_start, answer_len, fact_start, fact_len, source_start = [], [], [], [], []
    for (query, answer), k in zip(queries, order):
        row += query
        answer_start.append(len(row))
        answer_len.append(len(answer))
        fact_start.append(fact_at[k][0])
        fact_len.append(fact_at[k][1])
        source_start.append(fact_at[k][0] + len(prefixes[k]))
        row += answer
        original += [False] * (len(query) + len(answer))
    return {"row": row, "scored": original[1:], "answer_start": answer_start, "answer_len": answer_len,
            "fact_start": fact_start, "fact_len": fact_len, "source_start": source_start,
            "keys": tuple(keys[i] for i in order),
            "answers": tuple(codes[i] for i in order)}


def plant_facts(tokenizer, blocks: torch.Tensor, n: int, seed: int | str = 0, shared_keys: bool = False) -> PlantedBlocks:
    """`blocks` (N, S) of held-out text with `n` facts planted in each and queried at its end (n = 0: the plain
    blocks). Deterministic in (tokenizer, blocks, n, seed); block i draws from its own seeded generator, so two
    sets of blocks planted with different seeds (the proxy's, each fidelity rung's) hold different facts. With
    `shared_keys`, every block asks about the same keys in the same order (codes, depths and text still its
    own): their queries then sit at the same positions wherever the codes tokenize alike, so the blocks can be
    answered by generation as one batch (metrics.ProxyEvaluator)."""
    if n < 0 or n > MAX_FACTS:
        raise UserError(f"proxy.facts: {n}; allowed: 0 to {MAX_FACTS} facts per block")
    if n == 0 or blocks.shape[0] == 0:
        return PlantedBlocks.plain(blocks)
    keys = order = None
    if shared_keys:
        shared = random.Random(f"{seed}:keys")
        keys = shared.sample(NOUNS, n)
        order = list(range(n))
        shared.shuffle(order)
    rows = [_plant(tokenizer, block.tolist(), n, random.Random(f"{seed}:facts:{i}"), keys, order)
            for i, block in enumerate(blocks)]

    def stack(key, dtype=torch.long):
        return torch.tensor([r[key] for r in rows], dtype=dtype)

    return PlantedBlocks(input_ids=stack("row"), scored=stack("scored", torch.bool),
                         answer_start=stack("answer_start"), answer_len=stack("answer_len"),
                         fact_start=stack("fact_start"), fact_len=stack("fact_len"),
                         source_start=stack("source_start"),
                         keys=tuple(r["keys"] for r in rows), answers=tuple(r["answers"] for r in rows))
