"""The fast linear sliding-window kernels (with attention sinks) against their quadratic reference and
against softmax attention."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from layerboost_core.inference.linear_kernels import LinearState, chunked_prefill, decode_step, empty_state
from layerboost_core.attention.naive import linear_sliding_window_reference

D, FEAT, HKV, BATCH = 8, 6, 2, 2
TOL = 1e-4


def make_inputs(seq: int, groups: int, seed: int = 0, gate: torch.Tensor | None = None):
    """Random q/k/v (B, H, S, D), positive features fq/fk (B, H, S, F) and a gate in (0, 1) per query head."""
    g = torch.Generator().manual_seed(seed)
    hq = HKV * groups
    q = torch.randn(BATCH, hq, seq, D, generator=g)
    k = torch.randn(BATCH, HKV, seq, D, generator=g)
    v = torch.randn(BATCH, HKV, seq, D, generator=g)
    fq = torch.softmax(torch.randn(BATCH, hq, seq, FEAT, generator=g), dim=-1)
    fk = torch.softmax(torch.randn(BATCH, HKV, seq, FEAT, generator=g), dim=-1)
    if gate is None:
        gate = torch.rand(hq, generator=g) * 0.9 + 0.05
    return q, k, v, fq, fk, gate


SCALE = D**-0.5

CASES = [  # (S, W)
    (16, 4),  # multiple of the window
    (13, 4),  # not a multiple
    (3, 8),  # shorter than the window
    (8, 8),  # exactly one window
    (1, 4),  # a single token
    (9, 1),  # window of one: only the token itself is exact
    (23, 7),  # several chunks, ragged tail
    (12, 2),
]


@pytest.mark.parametrize("sinks", [0, 2, 5])
@pytest.mark.parametrize("groups", [1, 2, 3])
@pytest.mark.parametrize("seq,window", CASES)
def test_chunked_prefill_matches_reference(seq, window, groups, sinks):
    q, k, v, fq, fk, gate = make_inputs(seq, groups)
    fast = chunked_prefill(q, k, v, fq, fk, gate, window, SCALE, sinks)
    slow = linear_sliding_window_reference(q, k, v, fq, fk, gate, window, SCALE, sinks)
    assert fast.shape == (BATCH, HKV * groups, seq, D)
    assert (fast - slow).abs().max().item() <= TOL


@pytest.mark.parametrize("sinks", [0, 2, 5])
@pytest.mark.parametrize("seq,window", CASES)
def test_training_and_inference_bodies_agree(seq, window, sinks):
    """`chunked_prefill` runs `_inference_prefill` unless something is differentiated: both bodies give the
    reference's output and the same state."""
    inputs = make_inputs(seq, 3)
    with torch.no_grad():
        y_inf, state_inf = chunked_prefill(*inputs, window, SCALE, sinks, return_state=True)
    leaves = [x.clone().requires_grad_() for x in inputs]
    y_train, state_train = chunked_prefill(*leaves, window, SCALE, sinks, return_state=True)
    assert y_train.grad_fn is not None  # the differentiable body ran
    slow = linear_sliding_window_reference(*inputs, window, SCALE, sinks)
    assert (y_inf - slow).abs().max().item() <= TOL
    assert (y_train.detach() - slow).abs().max().item() <= TOL
    for a, b in zip(state_inf.tensors(), state_train.tensors()):
        assert a.shape == b.shape and torch.allclose(a, b.detach(), atol=TOL)
    assert state_inf.position == state_train.position == seq


@pytest.mark.parametrize("groups", [1, 2, 3])
@pytest.mark.parametrize("seq,window", [(10, 10), (10, 13), (7, 32), (1, 1)])
@pytest.mark.parametrize("gate_value", [0.02, 0.5, 0.98])
@pytest.mark.parametrize("sinks", [0, 3])
def test_window_covering_sequence_is_causal_softmax(seq, window, groups, gate_value, sinks):
    q, k, v, _, _, _ = make_inputs(seq, groups)
    hq = HKV * groups
    g = torch.Generator().manual_seed(7)
    # Any positive feature maps: with no token older than the window the linear part never contributes.
    fq = torch.rand(BATCH, hq, seq, FEAT, generator=g) * 5
    fk = torch.rand(BATCH, HKV, seq, FEAT, generator=g) * 5
    gate = torch.full((hq,), gate_value)
    fast = chunked_prefill(q, k, v, fq, fk, gate, window, SCALE, sinks)
    expected = F.scaled_dot_product_attention(q, k.repeat_interleave(groups, dim=1),
                                              v.repeat_interleave(groups, dim=1), is_causal=True, scale=SCALE)
    assert (fast - expected).abs().max().item() <= TOL


@pytest.mark.parametrize("sinks", [0, 2])
@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("seq,window,cut", [(16, 4, 9), (13, 4, 4), (13, 4, 12), (6, 8, 2), (10, 3, 1)])
def test_chunked_prefill_is_causal(seq, window, cut, groups, sinks):
    inputs = make_inputs(seq, groups)
    changed = list(inputs[:5])
    g = torch.Generator().manual_seed(99)
    for i, x in enumerate(changed):  # perturb every input from position `cut` on
        x = x.clone()
        x[:, :, cut:] = x[:, :, cut:].abs() * 3 + torch.rand(x[:, :, cut:].shape, generator=g)
        changed[i] = x
    base = chunked_prefill(*inputs, window, SCALE, sinks)
    other = chunked_prefill(*changed, inputs[5], window, SCALE, sinks)
    assert torch.allclose(base[:, :, :cut], other[:, :, :cut], rtol=0, atol=1e-6)
    assert not torch.allclose(base[:, :, cut:], other[:, :, cut:], atol=1e-3)  # the perturbation is visible


@pytest.mark.parametrize("sinks", [0, 2])
def test_gradients_flow_to_feature_maps_and_gate(sinks):
    q, k, v, fq, fk, gate = make_inputs(seq=20, groups=2)  # S > 2W: older chunks use the summed state
    fq, fk, gate = (x.clone().requires_grad_() for x in (fq, fk, gate))
    y = chunked_prefill(q, k, v, fq, fk, gate, 4, SCALE, sinks)
    (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(3))).sum().backward()
    for name, x in (("fq", fq), ("fk", fk), ("gate", gate)):
        assert x.grad is not None, name
        assert torch.isfinite(x.grad).all(), name
        assert x.grad.abs().sum() > 0, name


def _grads(fn, inputs, requires, window, sinks=0):
    leaves = [x.clone().requires_grad_(i in requires) for i, x in enumerate(inputs)]
    y = fn(*leaves, window, SCALE, sinks)
    (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(5))).sum().backward()
    return [leaves[i].grad for i in requires]


@pytest.mark.parametrize("sinks", [0, 2])
def test_gradients_match_reference_for_v_features_and_gate(sinks):
    inputs = make_inputs(seq=19, groups=2)
    requires = (2, 3, 4, 5)  # v, fq, fk, gate: what attention transfer differentiates
    fast = _grads(chunked_prefill, inputs, requires, 4, sinks)
    slow = _grads(linear_sliding_window_reference, inputs, requires, 4, sinks)
    for a, b in zip(fast, slow):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)


def test_gradients_match_reference_for_q_and_k():
    inputs = make_inputs(seq=19, groups=2)
    requires = (0, 1)  # q, k: needed to fine-tune the projections through a linear layer (healing)
    fast = _grads(chunked_prefill, inputs, requires, 4)
    slow = _grads(linear_sliding_window_reference, inputs, requires, 4)
    for a, b in zip(fast, slow):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)


def _decode_from(state: LinearState, inputs, start: int, window: int, sinks: int = 0):
    q, k, v, fq, fk, gate = inputs
    outputs = []
    for t in range(start, q.shape[2]):
        s = slice(t, t + 1)
        y, state = decode_step(q[:, :, s], k[:, :, s], v[:, :, s], fq[:, :, s], fk[:, :, s], gate, window, SCALE,
                               state, sinks)
        assert y.shape == (q.shape[0], q.shape[1], 1, q.shape[3])
        outputs.append(y)
    return torch.cat(outputs, dim=2), state


@pytest.mark.parametrize("sinks", [0, 2, 6])
@pytest.mark.parametrize("groups", [1, 2, 3])
@pytest.mark.parametrize("seq,window,prefix", [(16, 4, 5), (16, 4, 4), (16, 4, 2), (13, 5, 11), (9, 16, 3),
                                               (10, 1, 6)])
def test_prefill_state_then_decode_equals_full_prefill(seq, window, prefix, groups, sinks):
    inputs = make_inputs(seq, groups)
    full = chunked_prefill(*inputs, window, SCALE, sinks)
    head, state = chunked_prefill(*(x[:, :, :prefix] for x in inputs[:5]), inputs[5], window, SCALE, sinks,
                                  return_state=True)
    assert torch.allclose(head, full[:, :, :prefix], rtol=0, atol=TOL)
    assert state.k_win.shape[2] == min(prefix, window)
    assert state.k_sink.shape[2] == min(prefix, sinks)
    assert state.position == prefix
    tail, _ = _decode_from(state, inputs, prefix, window, sinks)
    assert (tail - full[:, :, prefix:]).abs().max().item() <= TOL


@pytest.mark.parametrize("sinks", [0, 3])
@pytest.mark.parametrize("seq,window", [(12, 4), (5, 8)])
def test_decode_from_empty_state_equals_prefill_and_states_agree(seq, window, sinks):
    inputs = make_inputs(seq, groups=2)
    full, prefill_state = chunked_prefill(*inputs, window, SCALE, sinks, return_state=True)
    start = empty_state(BATCH, HKV, D, FEAT, like=inputs[0])
    decoded, decode_state = _decode_from(start, inputs, 0, window, sinks)
    assert (decoded - full).abs().max().item() <= TOL
    assert prefill_state.position == decode_state.position == seq
    for name in ("k_win", "v_win", "fk_win", "k_sink", "v_sink", "kv", "k_sum"):
        a, b = getattr(prefill_state, name), getattr(decode_state, name)
        assert a.shape == b.shape, name
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), name


@pytest.mark.parametrize("sinks", [0, 2])
def test_state_size_is_bounded_by_the_window(sinks):
    short = chunked_prefill(*make_inputs(12, 2), 4, SCALE, sinks, return_state=True)[1]
    long = chunked_prefill(*make_inputs(40, 2), 4, SCALE, sinks, return_state=True)[1]
    assert short.nbytes() == long.nbytes() > 0


def test_sinks_change_the_output_once_they_leave_the_window():
    """Guard that the sink path is really exercised: with sinks outside the window the result differs."""
    inputs = make_inputs(16, groups=2)
    plain = chunked_prefill(*inputs, 4, SCALE, 0)
    with_sinks = chunked_prefill(*inputs, 4, SCALE, 2)
    assert torch.allclose(plain[:, :, :4], with_sinks[:, :, :4], rtol=0, atol=1e-6)  # sinks still in window
    assert (plain[:, :, 4:] - with_sinks[:, :, 4:]).abs().max().item() > 1e-3


def test_masks_built_under_inference_mode_still_serve_training():
    """The kernel's mask cache is shared: an evaluation under inference mode must not poison training."""
    from layerboost_core.inference import linear_kernels

    linear_kernels._masks.cache_clear()
    g = torch.Generator().manual_seed(7)
    b, h, s, d, f = 1, 2, 24, 8, 6
    q, k, v = (torch.randn(b, h, s, d, generator=g) for _ in range(3))
    fq, fk = (torch.rand(b, h, s, f, generator=g) for _ in range(2))
    gate = torch.full((h,), 0.5)
    with torch.inference_mode():
        linear_kernels.chunked_prefill(q, k, v, fq, fk, gate, window=4, scale=d ** -0.5, sinks=2)
    fq.requires_grad_(True)
    out = linear_kernels.chunked_prefill(q, k, v, fq, fk, gate, window=4, scale=d ** -0.5, sinks=2)
    out.sum().backward()
    assert fq.grad is not None and torch.isfinite(fq.grad).all()
