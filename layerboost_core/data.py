"""Text sources and deterministic token splits (calibration / train / held-out), no overlap between splits.

Documents, not tokens, are assigned to splits by a hash of their text, so a sentence can never sit in two
splits and the assignment does not depend on the order or number of other documents.
"""
from __future__ import annotations

import bz2
import hashlib
import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from .cache_dir import content_hash
from .errors import UserError, did_you_mean

log = logging.getLogger(__name__)

SPLITS = ("calibration", "train", "heldout")


def _gensim_test_data() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("gensim")
    if spec is None or spec.origin is None:
        raise UserError("data.source: builtin text needs package gensim==4.4.0 (pip install -e . installs it)")
    return Path(spec.origin).parent / "test" / "test_data"


def _builtin_sources() -> dict[str, list[str]]:
    """English text that ships offline, per source: `news` (gensim's Lee news corpus), `wiki` (gensim's
    Wikipedia test pages) and `pydoc` (the Python reference manual's topics from pydoc_data)."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    from pydoc_data.topics import topics

    root = _gensim_test_data()
    news: list[str] = []
    for name in ("lee_background.cor", "lee.cor"):
        news += [line.strip() for line in (root / name).read_text(encoding="latin-1").splitlines()]
    wiki: list[str] = []
    pages = root / "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
    with bz2.open(pages) as handle:
        for _title, text, _pageid in extract_pages(handle):
            clean = "\n".join(line.strip() for line in filter_wiki(text).splitlines() if len(line.split()) > 3)
            if not text.lstrip().lower().startswith("#redirect"):
                wiki.append(clean)
    pydoc = [topics[key].strip() for key in sorted(topics)]
    keep = lambda docs: [doc for doc in docs if len(doc.split()) >= 20]  # noqa: E731
    return {"news": keep(news), "wiki": keep(wiki), "pydoc": keep(pydoc)}


def _text_documents(path: Path) -> list[str]:
    return [block.strip() for block in path.read_text().split("\n\n") if block.strip()]


def _jsonl_documents(path: Path, field: str) -> list[str]:
    docs = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            record = json.loads(line)
            if field not in record:
                raise UserError(f"data.text_field: line {number} of {path} has no field {field!r}")
            docs.append(str(record[field]))
    return docs


def _hf_documents(name: str, field: str) -> list[str]:
    import datasets

    dataset_name, _, config = name.partition(":")
    try:
        dataset = datasets.load_dataset(dataset_name, config or None, split="train")
    except Exception as error:  # datasets raises many types for offline / unknown names
        raise UserError(f"data.source: cannot load dataset {name!r} ({type(error).__name__}: "
                        f"{str(error).splitlines()[0] if str(error) else ''})") from None
    return [str(row[field]) for row in dataset if str(row[field]).strip()]


@lru_cache(maxsize=1)
def _builtin_sources_cached() -> dict[str, tuple[str, ...]]:
    return {name: tuple(docs) for name, docs in _builtin_sources().items()}  # shipped files never change


BUILTIN_SOURCES = ("news", "wiki", "pydoc")


def _builtin_selection(rest: str) -> dict[str, tuple[str, ...]]:
    """`builtin` (every source), `builtin:news,wiki` (only those) or `builtin:-news` (all but that one)."""
    names = [name.strip() for name in rest.split(",")] if rest else list(BUILTIN_SOURCES)
    excluded = [name[1:] for name in names if name.startswith("-")]
    if excluded and len(excluded) != len(names):
        raise UserError(f"data.source: 'builtin:{rest}' mixes chosen and excluded sources; "
                        f"use builtin:<name>[,<name>...] or builtin:-<name>[,-<name>...]")
    for name in excluded or names:
        if name not in BUILTIN_SOURCES:
            raise UserError(f"data.source: unknown builtin source {name!r}; {did_you_mean(name, BUILTIN_SOURCES)}")
    chosen = [name for name in BUILTIN_SOURCES if (name not in excluded if excluded else name in names)]
    if not chosen:
        raise UserError(f"data.source: 'builtin:{rest}' excludes every builtin source")
    every = _builtin_sources_cached()
    return {name: every[name] for name in chosen}


def load_sources(source: str, text_field: str = "text") -> dict[str, tuple[str, ...]]:
    """Documents of a source, per named sub-source: `builtin[:<names>]` gives news / wiki / pydoc (in that
    order, see `_builtin_selection`); every other kind is one sub-source named after itself."""
    kind, _, rest = source.partition(":")
    if kind == "builtin":
        sources = _builtin_selection(rest)
    else:
        sources = {source: load_documents(source, text_field)}
    if not any(sources.values()):
        raise UserError(f"data.source: {source!r} has no documents")
    return sources


def load_documents(source: str, text_field: str = "text") -> tuple[str, ...]:
    """Documents of a source: `builtin[:<names>]`, `text:<file>` (blank-line separated), `jsonl:<file>`,
    `hf:<name>`."""
    kind, _, rest = source.partition(":")
    if kind == "builtin":
        docs = tuple(doc for docs in load_sources(source).values() for doc in docs)
    elif kind in ("text", "jsonl"):
        path = Path(rest).expanduser()
        if not path.is_file():
            raise UserError(f"data.source: file {rest!r} does not exist")
        docs = _text_documents(path) if kind == "text" else _jsonl_documents(path, text_field)
    elif kind == "hf":
        docs = _hf_documents(rest, text_field)
    else:
        raise UserError(f"data.source: unknown value {source!r}; allowed: builtin, builtin:<names>, text:<file>, "
                        f"jsonl:<file>, hf:<name>")
    if not docs:
        raise UserError(f"data.source: {source!r} has no documents")
    return tuple(docs)


def split_of(document: str, fractions: dict[str, float]) -> str:
    """The split a document belongs to, from a hash of its text (stable across runs and machines)."""
    point = int(hashlib.sha256(document.encode()).hexdigest()[:8], 16) / 16**8
    edge = 0.0
    for name in SPLITS:
        edge += fractions[name]
        if point < edge:
            return name
    return SPLITS[-1]


def _blocks(stream: list[int], seq_len: int, max_blocks: int | None) -> torch.Tensor:
    """The (N, seq_len) blocks a token stream gives (at most `max_blocks`); the tail is dropped."""
    usable = len(stream) // seq_len if max_blocks is None else min(len(stream) // seq_len, max_blocks)
    return torch.tensor(stream[: usable * seq_len], dtype=torch.long).view(usable, seq_len)


def token_stream(tokenizer, docs, n_tokens: int | None) -> list[int]:
    """Documents concatenated (EOS between them) until at least `n_tokens` tokens (None: all of them)."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for doc in docs:
        if n_tokens is not None and len(stream) >= n_tokens:
            break
        stream += tokenizer(doc, add_special_tokens=False).input_ids + [eos]
    return stream


def token_blocks(tokenizer, docs, seq_len: int, max_blocks: int | None) -> torch.Tensor:
    """Concatenate documents (EOS between them) and cut into (N, seq_len) blocks; the tail is dropped."""
    return _blocks(token_stream(tokenizer, docs, None if max_blocks is None else max_blocks * seq_len), seq_len,
                   max_blocks)


def _hash_order(docs, salt: str) -> list[str]:
    """Documents sorted by a salted hash of their text: a deterministic shuffle, so the first blocks sample
    the whole split rather than its first documents, and adding a document moves no other."""
    return sorted(docs, key=lambda doc: hashlib.sha256(f"{salt}\0{doc}".encode()).digest())


def mixed_token_stream(tokenizer, sources: dict[str, list[str]], n_tokens: int | None) -> list[int]:
    """At least `n_tokens` tokens (None: all) drawing on every source: each source's documents in hash order,
    and the next document always from the source with the fewest tokens so far (ties: the first source), so
    tokens are spread evenly over sources whatever their document lengths. EOS between documents."""
    queues = {name: _hash_order(docs, "mixed-blocks") for name, docs in sources.items() if docs}
    taken = {name: 0 for name in queues}
    tokens = {name: 0 for name in queues}
    stream: list[int] = []
    while queues and (n_tokens is None or len(stream) < n_tokens):
        name = min(queues, key=lambda n: tokens[n])
        ids = tokenizer(queues[name][taken[name]], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        stream += ids
        tokens[name] += len(ids)
        taken[name] += 1
        if taken[name] == len(queues[name]):
            del queues[name]
    return stream


def mixed_token_blocks(tokenizer, sources: dict[str, list[str]], seq_len: int, max_blocks: int | None) -> torch.Tensor:
    """(N, seq_len) blocks of `mixed_token_stream`; the tail is dropped."""
    return _blocks(mixed_token_stream(tokenizer, sources, None if max_blocks is None else max_blocks * seq_len),
                   seq_len, max_blocks)


def heldout_sections(tokenizer, source: str, sections: list[tuple[int, int]], fractions: dict | None = None,
                     text_field: str = "text", mix_sources: bool = True) -> list[torch.Tensor]:
    """Consecutive, disjoint stretches of the held-out split's token stream, cut into blocks: section i is
    `count` blocks of `length` tokens, taken after every section before it. The stream is the one
    `make_splits` cuts its held-out blocks from (mixed over the sources, or in source order), so with the
    search's proxy blocks as section 0, later sections are text the proxy never scored. A section the text
    cannot fill comes back with fewer blocks."""
    fractions = dict(fractions or {"calibration": 0.1, "train": 0.6, "heldout": 0.3})
    by_source = _heldout_documents(source, fractions, text_field)
    needed = sum(count * length for count, length in sections)
    stream = (mixed_token_stream(tokenizer, by_source, needed) if mix_sources
              else token_stream(tokenizer, [d for docs in by_source.values() for d in docs], needed))
    out, offset = [], 0
    for count, length in sections:
        part = _blocks(stream[offset:offset + count * length], length, count)
        out.append(part)
        offset += count * length
    return out


def _heldout_documents(source: str, fractions: dict, text_field: str) -> dict[str, list[str]]:
    """The held-out split's documents per sub-source, in source order."""
    out: dict[str, list[str]] = {}
    for source_name, docs in load_sources(source, text_field).items():
        for doc in docs:
            if split_of(doc, fractions) == "heldout":
                out.setdefault(source_name, []).append(doc)
    return out


@dataclass
class DataSplits:
    """Token blocks per split and the hash that identifies them (goes into every cache key)."""

    calibration: torch.Tensor
    train: torch.Tensor
    heldout: torch.Tensor
    documents: dict[str, list[str]]  # per split, in source order
    hashes: dict[str, str]  # per split: what a cached artifact made from one split is keyed by

    @property
    def hash(self) -> str:
        return content_hash(self.hashes)


def _check_settings(fractions: dict, seq_len: int, heldout_seq_len: int | None) -> None:
    if set(fractions) != set(SPLITS) or any(v < 0 for v in fractions.values()) or abs(sum(fractions.values()) - 1) > 1e-6:
        raise UserError(f"data.fractions: {fractions} must give {', '.join(SPLITS)} non-negative fractions summing to 1")
    if seq_len < 2:
        raise UserError(f"data.seq_len: {seq_len} is too short; allowed: >= 2")
    if heldout_seq_len is not None and heldout_seq_len < 2:
        raise UserError(f"data.heldout_seq_len: {heldout_seq_len} is too short; allowed: >= 2 (or None: data.seq_len)")


def make_splits(tokenizer, source: str = "builtin", seq_len: int = 512, fractions: dict | None = None,
                blocks: dict | None = None, text_field: str = "text", heldout_seq_len: int | None = None,
                mix_sources: bool = False) -> DataSplits:
    """Deterministic splits. `blocks` caps the number of blocks per split (None: all).

    Held-out blocks are `heldout_seq_len` tokens long (None: `seq_len`, like the other splits). With
    `mix_sources`, they are cut from documents of every source of the whole held-out split (hash order,
    sources balanced by tokens, see `mixed_token_blocks`); without it, from the split's documents in source
    order (the first documents of the first source, as before). Either setting changes the held-out hash
    only; the defaults give the hashes of earlier versions, so existing caches stay valid.
    """
    fractions = dict(fractions or {"calibration": 0.1, "train": 0.6, "heldout": 0.3})
    _check_settings(fractions, seq_len, heldout_seq_len)
    blocks = dict(blocks or {})
    lengths = {"calibration": seq_len, "train": seq_len, "heldout": heldout_seq_len or seq_len}
    by_source: dict[str, dict[str, list[str]]] = {name: {} for name in SPLITS}
    for source_name, docs in load_sources(source, text_field).items():
        for doc in docs:
            by_source[split_of(doc, fractions)].setdefault(source_name, []).append(doc)
    documents = {name: [doc for docs in by_source[name].values() for doc in docs] for name in SPLITS}
    tensors = {name: token_blocks(tokenizer, documents[name], lengths[name], blocks.get(name)) for name in SPLITS}
    if mix_sources:
        tensors["heldout"] = mixed_token_blocks(tokenizer, by_source["heldout"], lengths["heldout"], blocks.get("heldout"))
    for name, tensor in tensors.items():
        wanted = blocks.get(name)
        if tensor.shape[0] == 0 or (wanted is not None and tensor.shape[0] < wanted):
            log.warning("data: split %s has %d blocks of %d tokens (asked for %s)", name, tensor.shape[0],
                        lengths[name], wanted)
    hashes = {n: content_hash(source, lengths[n], fractions, hashlib.sha256(t.numpy().tobytes()).hexdigest())
              for n, t in tensors.items()}
    return DataSplits(tensors["calibration"], tensors["train"], tensors["heldout"], documents, hashes)
