"""Deterministic document splits and token blocks (a fake tokenizer: no files, no network)."""
from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch

from layerboost_core import data
from layerboost_core.data import (BUILTIN_SOURCES, SPLITS, load_documents, load_sources, make_splits,
                                  mixed_token_blocks, split_of, token_blocks)
from layerboost_core.errors import UserError

EOS = 0


class FakeTokenizer:
    """One token per whitespace-separated word: its length plus 1 (so never EOS)."""

    eos_token_id = EOS

    def __call__(self, text, add_special_tokens=True):
        return SimpleNamespace(input_ids=[len(word) + 1 for word in text.split()])


FRACTIONS = {"calibration": 0.2, "train": 0.5, "heldout": 0.3}


def documents(n: int) -> list[str]:
    return [f"document number {i} has words " + " ".join(f"w{i}x{j}" for j in range(i % 7 + 3)) for i in range(n)]


# --- split_of -----------------------------------------------------------------------------------------------


def test_split_of_is_deterministic():
    docs = documents(50)
    first = [split_of(d, FRACTIONS) for d in docs]
    assert first == [split_of(d, dict(FRACTIONS)) for d in docs]
    assert set(first) <= set(SPLITS)
    # Pinned: the assignment must not change across versions and machines (cached artifacts depend on it).
    pinned = {"doc 0": "train", "doc 2": "calibration", "doc 5": "heldout", "beta": "heldout"}
    assert {doc: split_of(doc, FRACTIONS) for doc in pinned} == pinned


def test_split_of_respects_fractions_roughly():
    docs = documents(3000)
    counts = {name: 0 for name in SPLITS}
    for doc in docs:
        counts[split_of(doc, FRACTIONS)] += 1
    for name in SPLITS:
        assert abs(counts[name] / len(docs) - FRACTIONS[name]) < 0.04, (name, counts)


def test_split_of_with_a_single_nonzero_fraction():
    fractions = {"calibration": 0.0, "train": 1.0, "heldout": 0.0}
    assert {split_of(d, fractions) for d in documents(200)} == {"train"}


# --- token_blocks -------------------------------------------------------------------------------------------


def stream_of(docs):
    tokenizer = FakeTokenizer()
    out = []
    for doc in docs:
        out += tokenizer(doc).input_ids + [EOS]
    return out


def test_token_blocks_shape_content_and_dropped_tail():
    docs = ["a bb ccc", "dddd e", "ff ggg hhhh iiiii", "j"]  # 4 + 3 + 5 + 2 = 14 tokens with EOS
    blocks = token_blocks(FakeTokenizer(), docs, seq_len=4, max_blocks=None)
    assert blocks.shape == (3, 4) and blocks.dtype == torch.long
    assert blocks.flatten().tolist() == stream_of(docs)[:12]  # the last 2 tokens are dropped
    assert (blocks == EOS).sum().item() == 3  # EOS between documents


def test_token_blocks_caps_the_number_of_blocks():
    docs = documents(30)
    capped = token_blocks(FakeTokenizer(), docs, seq_len=8, max_blocks=3)
    full = token_blocks(FakeTokenizer(), docs, seq_len=8, max_blocks=None)
    assert capped.shape == (3, 8)
    assert torch.equal(capped, full[:3])
    more = token_blocks(FakeTokenizer(), docs, seq_len=8, max_blocks=10_000)
    assert torch.equal(more, full)


def test_token_blocks_of_too_little_text_is_empty():
    assert token_blocks(FakeTokenizer(), ["a b"], seq_len=8, max_blocks=None).shape == (0, 8)
    assert token_blocks(FakeTokenizer(), [], seq_len=8, max_blocks=2).shape == (0, 8)


# --- make_splits --------------------------------------------------------------------------------------------


@pytest.fixture
def text_source(tmp_path):
    docs = documents(120)
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(docs) + "\n")
    return f"text:{path}", docs


def test_make_splits_from_text_file_is_disjoint_and_complete(text_source):
    """Each document lands in split_of(document): its split depends on nothing but its own text."""
    source, docs = text_source
    splits = make_splits(FakeTokenizer(), source, seq_len=16, fractions=FRACTIONS)
    sets = {name: set(splits.documents[name]) for name in SPLITS}
    assert set().union(*sets.values()) == set(docs)
    assert sum(len(s) for s in sets.values()) == len(docs)  # no document in two splits
    for name in SPLITS:
        assert all(split_of(d, FRACTIONS) == name for d in sets[name])
        tensor = getattr(splits, name)
        assert tensor.dim() == 2 and tensor.shape[1] == 16 and tensor.shape[0] > 0
        assert torch.equal(tensor, token_blocks(FakeTokenizer(), splits.documents[name], 16, None))


def test_make_splits_is_deterministic_and_respects_block_caps(text_source):
    source, _ = text_source
    a = make_splits(FakeTokenizer(), source, seq_len=16, fractions=FRACTIONS, blocks={"train": 2})
    b = make_splits(FakeTokenizer(), source, seq_len=16, fractions=FRACTIONS, blocks={"train": 2})
    assert a.hash == b.hash and re.fullmatch(r"[0-9a-f]{16}", a.hash)
    assert a.train.shape == (2, 16)
    for name in SPLITS:
        assert torch.equal(getattr(a, name), getattr(b, name))
    c = make_splits(FakeTokenizer(), source, seq_len=8, fractions=FRACTIONS, blocks={"train": 2})
    assert c.hash != a.hash


@pytest.mark.parametrize("fractions", [
    {"calibration": 0.2, "train": 0.5, "heldout": 0.2},  # sums to 0.9
    {"calibration": -0.1, "train": 0.8, "heldout": 0.3},  # negative
    {"calibration": 0.5, "train": 0.5},  # a split missing
    {"calibration": 0.2, "train": 0.5, "heldout": 0.3, "test": 0.0},  # an unknown split
])
def test_make_splits_refuses_bad_fractions(text_source, fractions):
    source, _ = text_source
    with pytest.raises(UserError, match=r"^data\.fractions: .* must give calibration, train, heldout "
                                        r"non-negative fractions summing to 1$"):
        make_splits(FakeTokenizer(), source, seq_len=16, fractions=fractions)


def test_make_splits_refuses_short_sequences(text_source):
    source, _ = text_source
    with pytest.raises(UserError, match=r"^data\.seq_len: 1 is too short; allowed: >= 2$"):
        make_splits(FakeTokenizer(), source, seq_len=1)


def test_make_splits_refuses_missing_file(tmp_path):
    missing = tmp_path / "missing.txt"
    with pytest.raises(UserError, match=rf"^data\.source: file {re.escape(repr(str(missing)))} does not exist$"):
        make_splits(FakeTokenizer(), f"text:{missing}", seq_len=16)


def test_make_splits_refuses_unknown_source_kind():
    with pytest.raises(UserError, match=r"^data\.source: unknown value 'csv:x'; allowed: builtin, "):
        make_splits(FakeTokenizer(), "csv:x", seq_len=16)


def test_make_splits_refuses_empty_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("\n\n\n")
    with pytest.raises(UserError, match=r"^data\.source: .* has no documents$"):
        make_splits(FakeTokenizer(), f"text:{path}", seq_len=16)


def test_jsonl_source_reads_the_text_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(f'{{"body": "{doc}"}}' for doc in documents(40)) + "\n")
    splits = make_splits(FakeTokenizer(), f"jsonl:{path}", seq_len=8, fractions=FRACTIONS, text_field="body")
    assert sorted(sum(splits.documents.values(), [])) == sorted(documents(40))
    with pytest.raises(UserError, match=r"^data\.text_field: line 1 of .* has no field 'text'$"):
        make_splits(FakeTokenizer(), f"jsonl:{path}", seq_len=8, fractions=FRACTIONS)


def test_edited_text_file_is_read_again(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(documents(30)))
    first = make_splits(FakeTokenizer(), f"text:{path}", seq_len=8, fractions=FRACTIONS)
    path.write_text("\n\n".join(documents(60)))
    second = make_splits(FakeTokenizer(), f"text:{path}", seq_len=8, fractions=FRACTIONS)
    assert sum(len(d) for d in second.documents.values()) == 60
    assert second.hash != first.hash


# --- long held-out blocks, mixed sources, builtin sub-sources -------------------------------------------------


def test_default_heldout_settings_keep_earlier_hashes(text_source):
    """Caches (banks, sensitivity tables) are keyed on these: the new settings' defaults must not move them."""
    source, _ = text_source
    plain = make_splits(FakeTokenizer(), source, seq_len=16, fractions=FRACTIONS)
    same = make_splits(FakeTokenizer(), source, seq_len=16, fractions=FRACTIONS, heldout_seq_len=16, mix_sources=False)
    assert same.hashes == plain.hashes
    longer = make_splits(FakeTokenizer(), source, seq_len=16, fractions=FRACTIONS, heldout_seq_len=32)
    assert longer.heldout.shape[1] == 32 and longer.train.shape[1] == 16
    assert {n: longer.hashes[n] == plain.hashes[n] for n in SPLITS} == {"calibration": True, "train": True, "heldout": False}
    assert torch.equal(longer.heldout, token_blocks(FakeTokenizer(), plain.documents["heldout"], 32, None))


def test_mixed_blocks_balance_sources_by_tokens_and_sample_the_whole_split():
    sources = {"a": [f"alpha {i} " + "x " * 30 for i in range(40)],  # 33 tokens with EOS
               "b": [f"beta {i} y y" for i in range(200)],  # 5 tokens with EOS
               "c": []}  # an empty source is skipped
    blocks = mixed_token_blocks(FakeTokenizer(), sources, seq_len=50, max_blocks=8)
    assert blocks.shape == (8, 50)
    stream = blocks.flatten().tolist()
    pieces = _split_on_eos(stream)[:-1]  # complete documents; first token: 6 for "alpha", 5 for "beta"
    tokens = {first: sum(len(p) + 1 for p in pieces if p[0] == first) for first in (6, 5)}
    assert tokens[6] > 0 and tokens[5] > 0
    assert abs(tokens[6] - tokens[5]) <= 33  # the source with fewer tokens always goes next
    reversed_docs = {name: docs[::-1] for name, docs in sources.items()}
    assert torch.equal(mixed_token_blocks(FakeTokenizer(), reversed_docs, 50, 8), blocks)  # hash order, not file order
    file_order = token_blocks(FakeTokenizer(), [d for pair in zip(sources["a"], sources["b"]) for d in pair], 50, 8)
    assert not torch.equal(file_order, blocks)
    assert torch.equal(mixed_token_blocks(FakeTokenizer(), sources, 50, 8), blocks)  # deterministic


def test_mixed_heldout_uses_only_heldout_documents(text_source):
    source, docs = text_source
    splits = make_splits(FakeTokenizer(), source, seq_len=16, fractions=FRACTIONS, heldout_seq_len=24,
                         mix_sources=True, blocks={"heldout": 5})
    assert splits.heldout.shape == (5, 24)
    heldout_streams = {tuple(FakeTokenizer()(d).input_ids) for d in splits.documents["heldout"]}
    pieces = [tuple(p) for p in _split_on_eos(splits.heldout.flatten().tolist())[1:-1]]  # whole documents only
    assert pieces and all(p in heldout_streams for p in pieces)
    plain = make_splits(FakeTokenizer(), source, seq_len=16, fractions=FRACTIONS, heldout_seq_len=24, blocks={"heldout": 5})
    assert splits.hashes["heldout"] != plain.hashes["heldout"] and splits.hashes["train"] == plain.hashes["train"]


def _split_on_eos(stream: list[int]) -> list[list[int]]:
    pieces, current = [], []
    for token in stream:
        if token == EOS:
            pieces.append(current)
            current = []
        else:
            current.append(token)
    return pieces + [current]


def test_builtin_sub_sources(monkeypatch):
    fake = {"news": tuple(documents(10)), "wiki": tuple(d + " wiki" for d in documents(5)),
            "pydoc": tuple(d + " pydoc" for d in documents(3))}
    monkeypatch.setattr(data, "_builtin_sources_cached", lambda: fake)
    assert list(load_sources("builtin")) == list(BUILTIN_SOURCES) == ["news", "wiki", "pydoc"]
    assert load_documents("builtin") == fake["news"] + fake["wiki"] + fake["pydoc"]
    assert load_sources("builtin:news") == {"news": fake["news"]}
    assert load_sources("builtin:pydoc,news") == {"news": fake["news"], "pydoc": fake["pydoc"]}
    assert load_sources("builtin:-news") == {"wiki": fake["wiki"], "pydoc": fake["pydoc"]}
    assert load_documents("builtin:-wiki,-pydoc") == fake["news"]
    splits = make_splits(FakeTokenizer(), "builtin:-news", seq_len=4, fractions=FRACTIONS)
    assert not set(sum(splits.documents.values(), [])) & set(fake["news"])


@pytest.mark.parametrize("source, message", [
    ("builtin:newz", r"^data\.source: unknown builtin source 'newz'; allowed: news, pydoc, wiki \(did you mean 'news'\?\)$"),
    ("builtin:news,-wiki", r"^data\.source: 'builtin:news,-wiki' mixes chosen and excluded sources; "),
    ("builtin:-news,-wiki,-pydoc", r"^data\.source: 'builtin:-news,-wiki,-pydoc' excludes every builtin source$"),
])
def test_builtin_sub_sources_refuse_bad_names(monkeypatch, source, message):
    monkeypatch.setattr(data, "_builtin_sources_cached", lambda: {n: ("x " * 30,) for n in BUILTIN_SOURCES})
    with pytest.raises(UserError, match=message):
        load_sources(source)


def test_make_splits_refuses_short_heldout_sequences(text_source):
    source, _ = text_source
    with pytest.raises(UserError, match=r"^data\.heldout_seq_len: 1 is too short; allowed: >= 2 \(or None: data\.seq_len\)$"):
        make_splits(FakeTokenizer(), source, seq_len=16, heldout_seq_len=1)
