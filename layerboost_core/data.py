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
from .errors import UserError

log = logging.getLogger(__name__)

SPLITS = ("calibration", "train", "heldout")


def _gensim_test_data() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("gensim")
    if spec is None or spec.origin is None:
        raise UserError("data.source: builtin text needs package gensim==4.4.0 (pip install -e . installs it)")
    return Path(spec.origin).parent / "test" / "test_data"


def _builtin_documents() -> list[str]:
    """English text that ships offline: news articles and Wikipedia pages from gensim's test corpora,
    and the Python reference manual's topics from pydoc_data."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    from pydoc_data.topics import topics

    root = _gensim_test_data()
    docs: list[str] = []
    for name in ("lee_background.cor", "lee.cor"):
        docs += [line.strip() for line in (root / name).read_text(encoding="latin-1").splitlines()]
    wiki = root / "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
    with bz2.open(wiki) as handle:
        for _title, text, _pageid in extract_pages(handle):
            clean = "\n".join(line.strip() for line in filter_wiki(text).splitlines() if len(line.split()) > 3)
            if not text.lstrip().lower().startswith("#redirect"):
                docs.append(clean)
    docs += [topics[key].strip() for key in sorted(topics)]
    return [doc for doc in docs if len(doc.split()) >= 20]


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
def _builtin_documents_cached() -> tuple[str, ...]:
    return tuple(_builtin_documents())  # shipped files never change during a process


def load_documents(source: str, text_field: str = "text") -> tuple[str, ...]:
    """Documents of a source: `builtin`, `text:<file>` (blank-line separated), `jsonl:<file>`, `hf:<name>`."""
    kind, _, rest = source.partition(":")
    if source == "builtin":
        docs = _builtin_documents_cached()
    elif kind in ("text", "jsonl"):
        path = Path(rest).expanduser()
        if not path.is_file():
            raise UserError(f"data.source: file {rest!r} does not exist")
        docs = _text_documents(path) if kind == "text" else _jsonl_documents(path, text_field)
    elif kind == "hf":
        docs = _hf_documents(rest, text_field)
    else:
        raise UserError(f"data.source: unknown value {source!r}; allowed: builtin, text:<file>, jsonl:<file>, hf:<name>")
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


def token_blocks(tokenizer, docs, seq_len: int, max_blocks: int | None) -> torch.Tensor:
    """Concatenate documents (EOS between them) and cut into (N, seq_len) blocks; the tail is dropped."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    needed = None if max_blocks is None else max_blocks * seq_len
    for doc in docs:
        stream += tokenizer(doc, add_special_tokens=False).input_ids + [eos]
        if needed is not None and len(stream) >= needed:
            break
    usable = len(stream) // seq_len
    if max_blocks is not None:
        usable = min(usable, max_blocks)
    return torch.tensor(stream[: usable * seq_len], dtype=torch.long).view(usable, seq_len)


@dataclass
class DataSplits:
    """Token blocks per split and the hash that identifies them (goes into every cache key)."""

    calibration: torch.Tensor
    train: torch.Tensor
    heldout: torch.Tensor
    documents: dict[str, list[str]]
    hashes: dict[str, str]  # per split: what a cached artifact made from one split is keyed by

    @property
    def hash(self) -> str:
        return content_hash(self.hashes)


def make_splits(tokenizer, source: str = "builtin", seq_len: int = 512, fractions: dict | None = None,
                blocks: dict | None = None, text_field: str = "text") -> DataSplits:
    """Deterministic splits. `blocks` caps the number of blocks per split (None: all)."""
    fractions = dict(fractions or {"calibration": 0.1, "train": 0.6, "heldout": 0.3})
    if set(fractions) != set(SPLITS) or any(v < 0 for v in fractions.values()) or abs(sum(fractions.values()) - 1) > 1e-6:
        raise UserError(f"data.fractions: {fractions} must give {', '.join(SPLITS)} non-negative fractions summing to 1")
    if seq_len < 2:
        raise UserError(f"data.seq_len: {seq_len} is too short; allowed: >= 2")
    blocks = dict(blocks or {})
    documents: dict[str, list[str]] = {name: [] for name in SPLITS}
    for doc in load_documents(source, text_field):
        documents[split_of(doc, fractions)].append(doc)
    tensors = {name: token_blocks(tokenizer, documents[name], seq_len, blocks.get(name)) for name in SPLITS}
    for name, tensor in tensors.items():
        wanted = blocks.get(name)
        if tensor.shape[0] == 0 or (wanted is not None and tensor.shape[0] < wanted):
            log.warning("data: split %s has %d blocks of %d tokens (asked for %s)", name, tensor.shape[0], seq_len, wanted)
    hashes = {n: content_hash(source, seq_len, fractions, hashlib.sha256(t.numpy().tobytes()).hexdigest())
              for n, t in tensors.items()}
    return DataSplits(tensors["calibration"], tensors["train"], tensors["heldout"], documents, hashes)
