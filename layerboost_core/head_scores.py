"""Which heads carry retrieval: a copy score per (layer, KV head), measured once per model and cached.

When the original model writes a planted fact's answer at the end of a held-out block (facts.py), the heads that
retrieve attend from each answer position back to the same token inside the planted fact, thousands of tokens
earlier: that is the copy a `linear` layer cannot do exactly. The score of a query head is the attention weight
it puts on that source token, averaged over every answer token of every fact (retrieval-head studies count the
same copies); a KV head's score is the highest of its query heads' (keeping a KV head softmax keeps its whole
query group exact). One forward per block of the original model, then per layer one (answer positions x keys)
score matrix: seconds. The `mixed` options keep the top KV heads of each layer by this score.
"""
from __future__ import annotations

import json
import logging

import torch

from .cache_dir import cache_root, content_hash, write_json
from .facts import PlantedBlocks
from .families import layer_kinds
from .timing import model_device

log = logging.getLogger(__name__)

HEAD_SCORES_VERSION = 1  # part of the cache key: bump when the score's definition changes


@torch.inference_mode()
def head_scores(switcher, blocks: PlantedBlocks) -> torch.Tensor:
    """(layers, KV heads) copy scores of the original model (the switcher is restored to all-softmax) on
    `blocks`, which must hold planted facts."""
    from .transfer import teacher_pass

    if blocks.num_facts == 0:
        raise ValueError("head scores need planted facts (proxy.facts >= 1)")
    model, family = switcher.model, switcher.family
    device = model_device(model)
    windows = [int(kind.split(":")[1]) if kind.startswith("local:") else None for kind in layer_kinds(model)]
    totals, count = None, 0
    for b in range(blocks.num_blocks):
        ids = blocks.input_ids[b:b + 1, :-1].to(device)
        capture = teacher_pass(switcher, ids)
        # answer token j of fact f is predicted at position answer_start + j - 1 and copied from source_start + j
        queries, sources = [], []
        for start, length, source in zip(blocks.answer_start[b].tolist(), blocks.answer_len[b].tolist(),
                                         blocks.source_start[b].tolist()):
            queries += [start - 1 + j for j in range(length)]
            sources += [source + j for j in range(length)]
        at = torch.tensor(queries, device=device)
        source = torch.tensor(sources, device=device)
        per_layer = []
        for layer, attn in enumerate(switcher.original):
            q, k, _ = family.project_qkv(attn, capture.inputs[layer], capture.position_embeddings[layer])
            group = q.shape[1] // k.shape[1]
            scores = (q[:, :, at].float() @ k.float().repeat_interleave(group, dim=1).transpose(-1, -2)) * attn.scaling
            keys = torch.arange(k.shape[2], device=device).view(1, -1)
            allowed = keys <= at.view(-1, 1)  # causal
            if windows[layer] is not None:
                allowed &= keys > at.view(-1, 1) - windows[layer]
            weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)  # (1, Hq, P, S)
            copied = weights[0, :, torch.arange(len(queries), device=device), source]  # (Hq, P)
            per_layer.append(copied.view(k.shape[1], group, -1).amax(dim=1).sum(dim=-1))  # (Hkv,): best of the group
        layer_sums = torch.stack(per_layer).cpu()
        totals = layer_sums if totals is None else totals + layer_sums
        count += len(queries)
    return totals / count


def kept_heads(scores: torch.Tensor, k: int) -> list[list[int]]:
    """Per layer, the `k` KV heads with the highest scores (ties: the lower index), in ascending head order."""
    return [sorted(sorted(range(len(row)), key=lambda h: (-row[h], h))[:k]) for row in scores.tolist()]


def head_score_rows(scores: torch.Tensor) -> list[dict]:
    """Rows of head_scores.csv: layer, KV head, score, and its rank in the layer (0: the most retrieval)."""
    rows = []
    for layer, row in enumerate(scores.tolist()):
        order = sorted(range(len(row)), key=lambda h: (-row[h], h))
        rows += [{"layer": layer, "kv_head": h, "score": row[h], "rank": order.index(h)} for h in range(len(row))]
    return rows


def cached_head_scores(switcher, model_info: dict, blocks: PlantedBlocks) -> torch.Tensor:
    """`head_scores`, read from the cache when this model was scored on these blocks before."""
    key = content_hash("head-scores", HEAD_SCORES_VERSION, model_info["fingerprint"], blocks.hash)
    path = cache_root() / "head_scores" / f"{model_info['name'].replace('/', '--')}-{key}.json"
    if path.exists():
        try:
            return torch.tensor(json.loads(path.read_text())["scores"])
        except (OSError, ValueError, KeyError):
            log.warning("head scores %s are unreadable; measuring again", path)
    log.info("head scores: the original's attention on %d planted facts, per layer and KV head", blocks.num_facts)
    scores = head_scores(switcher, blocks)
    write_json(path, {"model": model_info, "blocks": blocks.hash, "scores": scores.tolist()})
    return scores
