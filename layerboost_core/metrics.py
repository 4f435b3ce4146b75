"""Proxy quality metrics of a patched model against the original, on held-out blocks with planted facts.

The original model's next-token distributions are computed once and kept (probabilities, sum p log p, argmax
and NLL per token). Evaluating a plan is then one forward pass plus a few elementwise passes over the logits.
KL(p || q) = sum p log p - sum p log q, with the first sum cached and both sums taken elementwise by the
same function (sum p z - logsumexp(z) * sum p), so identical logits give exactly 0; against a materialised
log-softmax it differs by at most ~1e-5 nats/token. (A batched matmul for sum p z, instead of the
elementwise product, is only good to ~5e-3 over a 49k vocabulary on CPU: that version read 0.0012
nats/token for the unpatched model itself.)
By default only the original's top-k tokens per position are kept, plus the mass r of all others, and
KL = sum_topk p_i (log p_i - log q_i) + r (log r - log q_rest), q_rest being q's mass outside the top k:
the tail is one bucket, so the value is a lower bound of the exact KL (log-sum inequality: merging outcomes
never increases a KL), short by r times the KL between the two tails renormalised.
Retrieval metrics score the facts planted in the same blocks (facts.py) from the same forward: token metrics
are averaged over the positions whose next token is original text only, retrieval metrics over the facts.
Each metric declares its direction, so objectives and reports derive from the declaration.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .errors import UserError
from .facts import PlantedBlocks
from .registry import Registry

# Part of every cache key and study name built on metric values: bump it when a metric's numbers change.
# 2: exact KL sum (v1 had a ~1e-3 nats/token floor, see the module docstring). 3: top-k reference by default
# (KL a lower bound of v2's, see ProxyEvaluator), retrieval metrics. 4: facts planted in the held-out blocks
# (token metrics skip their positions; retrieval from the same forward).
METRICS_VERSION = 4


@dataclass
class TokenStats:
    """Per-token quantities (all shaped like the targets) that every metric is computed from."""

    kl: torch.Tensor  # KL(original || plan), nats
    nll: torch.Tensor  # -log q(target)
    nll_original: torch.Tensor  # -log p(target)
    agree: torch.Tensor  # 1.0 where argmax q == argmax p


@dataclass
class FactStats:
    """Per planted fact (F,): how the plan answers the query about it (see facts.py)."""

    nll: torch.Tensor  # mean -log q(answer token) over the answer's tokens, teacher-forced
    hit: torch.Tensor  # 1.0 where the argmax is the answer token at every answer position


@dataclass(frozen=True)
class ProxyMetric:
    """A quantity averaged over held-out tokens (`over` 'tokens': `values` maps TokenStats to per-token
    values) or over planted facts (`over` 'facts': `values` maps FactStats to per-fact values).
    `direction` is 'minimize' or 'maximize'."""

    name: str
    direction: str
    values: Callable[[TokenStats | FactStats], torch.Tensor]
    description: str = ""
    over: str = "tokens"


PROXY_METRICS: Registry[ProxyMetric] = Registry("proxy metric")


def _register(metric: ProxyMetric) -> ProxyMetric:
    return PROXY_METRICS.register(metric.name)(metric)


_register(ProxyMetric("kl", "minimize", lambda s: s.kl, "KL(original || plan) of next-token distributions, nats/token"))
_register(ProxyMetric("nll", "minimize", lambda s: s.nll, "negative log-likelihood of held-out text, nats/token"))
_register(ProxyMetric("nll_delta", "minimize", lambda s: s.nll - s.nll_original, "NLL increase over the original"))
_register(ProxyMetric("top1_agreement", "maximize", lambda s: s.agree, "fraction of tokens whose argmax matches the original"))
_register(ProxyMetric("retrieval_nll", "minimize", lambda s: s.nll, "NLL of a planted fact's answer, nats/token "
                      "(mean over facts)", over="facts"))
_register(ProxyMetric("retrieval_acc", "maximize", lambda s: s.hit, "fraction of planted facts whose answer the "
                      "plan reproduces exactly (teacher-forced argmax)", over="facts"))

RETRIEVAL_METRICS = tuple(n for n in PROXY_METRICS.names() if PROXY_METRICS.get(n).over == "facts")


# Floor of the student's tail mass in the top-k KL: finite logits never give 0, but fp32 exp can underflow.
_TINY = torch.finfo(torch.float32).tiny


@dataclass
class _Reference:
    """The original model's distribution on one batch of held-out blocks: exact (`index` None: `probs` covers
    the vocabulary in order) or top-k (`probs` are the k most likely tokens, at `index`; `rest` is the mass of
    all others, kept as one bucket)."""

    probs: torch.Tensor  # (B, S-1, V) exact, or (B, S-1, k) top-k
    index: torch.Tensor | None  # (B, S-1, k) int32 token ids of `probs`; None when exact
    rest: torch.Tensor | None  # (B, S-1): probability outside the top k (see _tail_mass); None when exact
    prob_sum: torch.Tensor  # (B, S-1): sum of `probs` as rounded, kept so the KL algebra is exact
    neg_entropy: torch.Tensor  # (B, S-1): sum p log p over `probs` (+ rest log rest when top-k)
    argmax: torch.Tensor  # (B, S-1)
    nll: torch.Tensor  # (B, S-1)

    def head(self, positions: int) -> "_Reference":
        """The reference of the first `positions` positions only (a prefix of the blocks)."""
        def cut(t):
            return None if t is None else t[:, :positions]
        return _Reference(cut(self.probs), cut(self.index), cut(self.rest), cut(self.prob_sum), cut(self.neg_entropy),
                          cut(self.argmax), cut(self.nll))

    def cross(self, part: slice, z: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
        """sum p log q of the logits chunk `z` (B, positions, V) at `part`. Top-k: the tokens outside the
        top k are one bucket whose q is q's mass outside them."""
        if self.index is None:
            return _cross(self.probs[:, part], self.prob_sum[:, part], z, lse)
        top_z = z.gather(-1, self.index[:, part].long())  # (B, positions, k)
        head = _cross(self.probs[:, part], self.prob_sum[:, part], top_z, lse)
        return head + torch.xlogy(self.rest[:, part], _tail_mass(top_z, lse))


# Blocks answered together by generation (ProxyEvaluator with `generate`): a decode step of 8 sequences costs
# little more than one of 1 on a CPU (it reads the same weights), and their caches stay small.
GENERATE_BATCH = 8

# Positions per elementwise pass: small enough that a chunk's (B, positions, V) temporaries stay in cache.
# The passes are memory-bound: on SmolLM2's 49k vocabulary, 8 positions at a time with logsumexp instead of
# log_softmax took the per-plan work from 0.30 s (128 positions) to 0.15 s per 2 x 511 tokens.
POSITIONS_PER_PASS = 8


def _chunks(logits: torch.Tensor):
    """(positions slice, fp32 logits of those positions, their logsumexp), a bounded chunk at a time."""
    for start in range(0, logits.shape[1], POSITIONS_PER_PASS):
        part = slice(start, start + POSITIONS_PER_PASS)
        z = logits[:, part].float()
        yield part, z, torch.logsumexp(z, dim=-1)


def _cross(probs: torch.Tensor, prob_sum: torch.Tensor, z: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """sum_v p_v log q_v with log q = z - lse, without materialising log q: sum p z - lse * sum p. The same
    function gives the reference's sum p log p, so identical logits give a KL of exactly 0."""
    return (probs * z).sum(-1) - lse * prob_sum


def _tail_mass(top_z: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Probability of every token but the top k whose logits are `top_z` (B, positions, k): 1 - their sum,
    accurate to ~1e-6 absolute (fp32 rounding of the sum and of `lse`). Summing the tail directly would be
    exact but costs a full pass over the vocabulary, doubling the metric time; the top-k KL's tail term
    r (log r - log q_rest) is only affected where q_rest is near 1e-6, that is where the KL is large."""
    return (1.0 - torch.exp(top_z - lse.unsqueeze(-1)).sum(-1)).clamp_min(_TINY)


def _target_nll(z: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return lse - z.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def reference_of(logits: torch.Tensor, targets: torch.Tensor, top_k: int | None = None) -> _Reference:
    """The cached view of the original model's `logits` (B, S-1, V) on one batch: exact (`top_k` None) or
    its `top_k` most likely tokens per position plus the remaining mass (memory O(B * S * k), not O(B * S * V)).
    A `top_k` that covers the vocabulary gives the exact reference."""
    batch, positions, vocab = logits.shape
    k = None if top_k is None or top_k >= vocab else top_k
    width = vocab if k is None else k
    ref = _Reference(probs=torch.empty(batch, positions, width, device=logits.device),
                     index=None if k is None else torch.empty(batch, positions, k, dtype=torch.int32, device=logits.device),
                     rest=None if k is None else torch.empty(batch, positions, device=logits.device),
                     prob_sum=torch.empty(batch, positions, device=logits.device),
                     neg_entropy=torch.empty(batch, positions, device=logits.device),
                     argmax=torch.empty(batch, positions, dtype=torch.long, device=logits.device),
                     nll=torch.empty(batch, positions, device=logits.device))
    for part, z, lse in _chunks(logits):
        if k is None:
            ref.probs[:, part] = torch.exp(z - lse.unsqueeze(-1))
        else:
            top_z, index = z.topk(k, dim=-1)  # (B, positions, k)
            ref.probs[:, part] = torch.exp(top_z - lse.unsqueeze(-1))
            ref.index[:, part] = index.int()
            ref.rest[:, part] = _tail_mass(top_z, lse)
        ref.prob_sum[:, part] = ref.probs[:, part].sum(-1)
        ref.neg_entropy[:, part] = ref.cross(part, z, lse)  # the student's own function: identical logits give 0
        ref.nll[:, part] = _target_nll(z, lse, targets[:, part])
        ref.argmax[:, part] = z.argmax(dim=-1)
    return ref


def token_stats(logits: torch.Tensor, targets: torch.Tensor, reference: _Reference) -> TokenStats:
    """Per-token stats of student `logits` (B, S-1, V) against the cached original distribution."""
    kl, nll, argmax = [], [], []
    for part, z, lse in _chunks(logits):
        kl.append(reference.neg_entropy[:, part] - reference.cross(part, z, lse))
        nll.append(_target_nll(z, lse, targets[:, part]))
        argmax.append(z.argmax(dim=-1))  # while the chunk is still in cache
    agree = (torch.cat(argmax, 1) == reference.argmax).float()
    return TokenStats(kl=torch.cat(kl, 1), nll=torch.cat(nll, 1), nll_original=reference.nll, agree=agree)


def fact_stats(logits: torch.Tensor, ids: torch.Tensor, answer_start: torch.Tensor,
               answer_len: torch.Tensor) -> FactStats:
    """Per-fact answer NLL and exact match of the blocks `ids` (B, S) from their next-token `logits`
    (B, S-1, V): fact f of row b is answered by tokens answer_start[b, f] ... + answer_len[b, f] - 1, each
    predicted at the position before it. Facts in row-major order (B * F,)."""
    nll, hit = [], []
    for row in range(ids.shape[0]):
        for start, length in zip(answer_start[row].tolist(), answer_len[row].tolist()):
            z = logits[row, start - 1:start - 1 + length].float()  # (A, V)
            target = ids[row, start:start + length].to(z.device)
            nll.append(_target_nll(z, torch.logsumexp(z, dim=-1), target).mean())
            hit.append((z.argmax(dim=-1) == target).all().float())
    if not nll:
        return FactStats(nll=logits.new_zeros(0), hit=logits.new_zeros(0))
    return FactStats(nll=torch.stack(nll), hit=torch.stack(hit))


# Measured on SmolLM2 at 2,048 tokens (benchmarks/bench_long_context.py, plan SSSSSNNNNSSSSSSSSNSSSSSSSNNSSN,
# exact KL 0.412): the top-k KL was short by 8.2% at k=128, 3.5% at 512, 2.0% at 1024, 1.1% at 2048. 1024 keeps
# 16 x 2,048 positions in 268 MB (probabilities + int32 ids) instead of 16.8 GB for a 128k vocabulary.
DEFAULT_TOP_K = 1024


@dataclass
class Measurement:
    """A plan's proxy metrics: `metrics` {name: mean} (token metrics over every scored token, retrieval over
    every fact), `per_block` {token metric: [mean per block]} and `per_fact` {retrieval metric: [per fact]},
    the samples intervals are drawn from (bootstrap over blocks, binomial over facts)."""

    metrics: dict[str, float]
    per_block: dict[str, list[float]]
    per_fact: dict[str, list[float]]

    def as_dict(self) -> dict:
        return {"metrics": self.metrics, "per_block": self.per_block, "per_fact": self.per_fact}


class ProxyEvaluator:
    """Scores the model's current plan against the original on fixed held-out blocks with planted facts.

    Build it while the model is unpatched (all-softmax): the constructor caches the original distributions,
    and the original's own retrieval (`original`, `original_per_fact`). `blocks`: `PlantedBlocks` (facts.py),
    or a plain (N, S) tensor of token ids (no facts, every position scored). `reference_top_k` keeps only
    the original's k most likely tokens per position plus the remaining mass (None: the whole distribution,
    B x S x V floats, 16.8 GB at 16 x 2,048 tokens of a 128k vocabulary). The top-k KL treats the other
    tokens as one bucket: by the log-sum inequality it is a lower bound of the exact KL, equal when k covers
    the vocabulary. With `generate`, every block is served as a deployed model serves it: prefilled into the
    hybrid cache up to its first answer, each fact answered by greedy decode steps (`_answer`, blocks of one
    layout as a batch); the original's own retrieval is measured the same way.
    """

    def __init__(self, model, blocks: PlantedBlocks | torch.Tensor, batch_size: int = 4,
                 reference_top_k: int | None = DEFAULT_TOP_K, generate: bool = False):
        if reference_top_k is not None and reference_top_k < 1:
            raise UserError(f"proxy.reference_top_k: {reference_top_k}; allowed: an integer >= 1, or None (exact)")
        self.model = model
        self.blocks = blocks if isinstance(blocks, PlantedBlocks) else PlantedBlocks.plain(blocks)
        self.batch_size = batch_size
        self.generate = generate and self.blocks.num_facts > 0
        self.reference_top_k = reference_top_k
        self.device = model.get_input_embeddings().weight.device
        self.reference: list[_Reference] = []
        facts = []
        for rows, ids, logits, generated in self._scored_batches():  # the original, served as the plans will be
            self.reference.append(reference_of(logits, ids[:, 1:logits.shape[1] + 1], reference_top_k))
            facts.append(generated if generated is not None else self._facts_of(rows, ids, logits))
        self.original_per_fact = {m.name: torch.cat([m.values(f) for f in facts]).tolist() for m in self._retrieval()}
        self.original = {name: sum(v) / len(v) for name, v in self.original_per_fact.items()}

    @property
    def has_facts(self) -> bool:
        return self.blocks.num_facts > 0

    def _retrieval(self) -> list[ProxyMetric]:
        return [PROXY_METRICS.get(n) for n in RETRIEVAL_METRICS] if self.has_facts else []

    def _logits(self):
        """Per batch, (its rows, ids (B, S), next-token logits (B, S-1, V)) of the model as it is now."""
        for start in range(0, self.blocks.num_blocks, self.batch_size):
            rows = slice(start, start + self.batch_size)
            ids = self.blocks.input_ids[rows].to(self.device)
            with torch.inference_mode():
                yield rows, ids, self.model(input_ids=ids[:, :-1], use_cache=False).logits

    def _facts_of(self, rows: slice, ids, logits) -> FactStats:
        with torch.inference_mode():
            return fact_stats(logits, ids, self.blocks.answer_start[rows], self.blocks.answer_len[rows])

    def _chosen(self, metrics) -> list[ProxyMetric]:
        """The metrics named (None: every metric this evaluator can compute)."""
        if metrics is None:
            return [PROXY_METRICS.get(n) for n in PROXY_METRICS.names()
                    if self.has_facts or PROXY_METRICS.get(n).over == "tokens"]
        chosen = [PROXY_METRICS.get(n) for n in metrics]
        for metric in chosen:
            if metric.over == "facts" and not self.has_facts:
                raise UserError(f"proxy metric: {metric.name!r} needs planted facts; these blocks have none "
                                f"(proxy.facts >= 1)")
        return chosen

    def _groups(self) -> list[list[int]]:
        """Blocks whose queries and answers sit at the same positions (blocks planted with shared keys, where the
        codes tokenize alike), at most GENERATE_BATCH per group: their answers are generated as one batch."""
        groups: dict[tuple, list[list[int]]] = {}
        for row in range(self.blocks.num_blocks):
            layout = (tuple(self.blocks.answer_start[row].tolist()), tuple(self.blocks.answer_len[row].tolist()))
            batches = groups.setdefault(layout, [[]])
            if len(batches[-1]) == GENERATE_BATCH:
                batches.append([])
            batches[-1].append(row)
        return [batch for batches in groups.values() for batch in batches]

    def _served_batches(self):
        """Per block, (rows, ids (1, S), next-token logits of the positions before its first answer, FactStats):
        each block's text up to its first answer prefilled into its own `HybridCache` (every scored position lies
        before the queries), then the facts of a group of blocks (`_groups`) answered together by generation
        through their caches stacked into one batch (`_answer`); a group's facts come with its last block, the
        others' stats are empty."""
        from .cache import HybridCache, stack_caches

        empty = FactStats(nll=torch.zeros(0), hit=torch.zeros(0))
        for group in self._groups():
            first = int(self.blocks.answer_start[group[0], 0])
            caches, last = [], []
            for position, row in enumerate(group):
                rows = slice(row, row + 1)
                ids = self.blocks.input_ids[rows].to(self.device)
                with torch.inference_mode():
                    cache = HybridCache(self.model)
                    prefix = self.model(input_ids=ids[:, :first], cache=cache).logits  # (1, first, V)
                caches.append(cache)
                last.append(prefix[:, -1:])
                facts = self._answer(group, stack_caches(caches), torch.cat(last)) if position == len(group) - 1 else empty
                yield rows, ids, prefix[:, :-1], facts

    def _answer(self, group: list[int], cache, logits: torch.Tensor) -> FactStats:
        """The facts of `group`'s blocks answered by generation through `cache` (theirs, stacked, holding each
        block up to its first answer), `logits` (G, 1, V) predicting each block's first answer token: every
        answer token a greedy decode step of the batch (a fact is found when each step's argmax is its next
        token), each next query fed through the same cache. Each step's input is the true token, which is the
        generated one up to the first miss, so a hit is exactly greedy generation writing the answer, and the
        answer NLL is the teacher-forced one. Facts in row-major order (block, then fact), as `fact_stats`."""
        ids = self.blocks.input_ids[group].to(self.device)  # (G, S)
        starts, lengths = self.blocks.answer_start[group[0]].tolist(), self.blocks.answer_len[group[0]].tolist()
        nll, hit = [], []  # per fact: (G,)
        fed = starts[0]
        with torch.inference_mode():
            for start, length in zip(starts, lengths):
                if start > fed:  # the rest of the previous answer and this fact's query, as one chunk
                    logits = self.model(input_ids=ids[:, fed:start], cache=cache, logits_to_keep=1).logits
                steps = [logits]
                for position in range(start, start + length - 1):  # one decode step per answer token
                    steps.append(self.model(input_ids=ids[:, position:position + 1], cache=cache,
                                            logits_to_keep=1).logits)
                fed = start + length - 1
                z = torch.cat(steps, dim=1).float()  # (G, A, V): the prediction of each answer token
                target = ids[:, start:start + length]
                nll.append(_target_nll(z, torch.logsumexp(z, dim=-1), target).mean(-1))
                hit.append((z.argmax(dim=-1) == target).all(-1).float())
        return FactStats(nll=torch.stack(nll, 1).flatten(), hit=torch.stack(hit, 1).flatten())

    def _scored_batches(self):
        """Per batch of blocks, (rows, ids, next-token logits, FactStats or None): with `generate`, one block at a
        time served through the hybrid cache (`_served_batches`); else one forward of whole blocks, facts
        teacher-forced."""
        if self.generate:
            yield from self._served_batches()
            return
        for rows, ids, logits in self._logits():
            yield rows, ids, logits, None

    def measure(self, metrics=None) -> Measurement:
        """Every metric (or those named) of the current plan, with the per-block and per-fact values. With
        `generate`, planted facts are answered by generation through the hybrid cache (`_answer`), and token
        metrics come from a forward of each block up to its queries (the same scored positions)."""
        chosen = self._chosen(metrics)
        on_tokens = [m for m in chosen if m.over == "tokens"]
        on_facts = [m for m in chosen if m.over == "facts"]
        per_block = {m.name: [] for m in on_tokens}
        per_fact = {m.name: [] for m in on_facts}
        totals, count = {m.name: 0.0 for m in on_tokens}, 0
        for reference, (rows, ids, logits, generated) in zip(self.reference, self._scored_batches()):
            with torch.inference_mode():
                if on_tokens:
                    positions = logits.shape[1]  # all of them, or those before the queries (generate)
                    stats = token_stats(logits, ids[:, 1:positions + 1], reference.head(positions))
                    mask = self.blocks.scored[rows][:, :positions].to(logits.device).float()  # original text only
                    tokens = mask.sum(1)
                    for metric in on_tokens:
                        sums = (metric.values(stats) * mask).sum(1)
                        per_block[metric.name] += (sums / tokens).tolist()
                        totals[metric.name] += sums.sum().item()
                    count += int(tokens.sum().item())
                if on_facts:
                    facts = generated if generated is not None else self._facts_of(rows, ids, logits)
                    for metric in on_facts:
                        per_fact[metric.name] += metric.values(facts).tolist()
        if on_tokens and not count:
            raise UserError("proxy: no held-out token to score (the held-out split gave no block; see data.blocks)")
        values = {name: total / count for name, total in totals.items()}
        values.update({name: sum(v) / len(v) for name, v in per_fact.items()})
        return Measurement({m.name: values[m.name] for m in chosen}, per_block, per_fact)

    def evaluate(self, metrics=None) -> dict[str, float]:
        """Every metric (or those named) of the current plan: token metrics averaged over the held-out tokens
        that are original text, retrieval metrics over the planted facts; one forward per batch of blocks."""
        return self.measure(metrics).metrics
