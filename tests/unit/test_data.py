"""Deterministic document splits and token blocks (a fake tokenizer: no files, no network)."""
from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch

from layerboost_core.data import SPLITS, make_splits, split_of, token_blocks
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
