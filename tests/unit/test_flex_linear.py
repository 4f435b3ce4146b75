"""The flex_attention prefill of the `linear` option (the CUDA fast path) against the quadratic reference,
run here eagerly on CPU (flex's dense implementation: slow, exact), on small shapes."""
from __future__ import annotations

import pytest
import torch

from layerboost_core.inference.flex import flex_prefill
from layerboost_core.inference.linear_kernels import chunked_prefill
from layerboost_core.attention.naive import linear_sliding_window_reference
from tests.unit.test_linear_kernels import SCALE, TOL, make_inputs

CASES = [  # (S, W, groups, sinks): ragged tails, a window longer than the sequence, GQA and MHA
    (23, 7, 2, 2),
    (16, 4, 1, 0),
    (5, 8, 2, 3),
    (40, 5, 3, 4),
]


@pytest.mark.parametrize("seq,window,groups,sinks", CASES)
def test_flex_prefill_matches_the_reference(seq, window, groups, sinks):
    q, k, v, fq, fk, gate = make_inputs(seq, groups)
    want = linear_sliding_window_reference(q, k, v, fq, fk, gate, window, SCALE, sinks)
    got = flex_prefill(q, k, v, fq, fk, gate, window, SCALE, sinks)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert (got - want).abs().max() < TOL


def test_flex_prefill_returns_the_chunked_paths_state():
    q, k, v, fq, fk, gate = make_inputs(19, 2)
    _, got = flex_prefill(q, k, v, fq, fk, gate, 4, SCALE, 2, return_state=True)
    _, want = chunked_prefill(q, k, v, fq, fk, gate, 4, SCALE, 2, return_state=True)
    assert got.position == want.position
    for a, b in zip(got.tensors(), want.tensors()):
        assert torch.equal(a, b)
