"""The lean decode paths of `linear` attention: the in-place ring-buffer step against the out-of-place one,
the one-token feature map against the full one, and the state layout (ring slots, bytes)."""
from __future__ import annotations

import pytest
import torch

from layerboost_core.inference.linear_attention import LearnedLinearParts
from layerboost_core.inference.linear_kernels import chunked_prefill, decode_step, empty_state

D, FEAT, HKV, BATCH, GROUPS = 8, 6, 2, 3, 3
SCALE = D**-0.5


def make_inputs(seq: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hq = HKV * GROUPS
    q = torch.randn(BATCH, hq, seq, D, generator=g)
    k = torch.randn(BATCH, HKV, seq, D, generator=g)
    v = torch.randn(BATCH, HKV, seq, D, generator=g)
    fq = torch.softmax(torch.randn(BATCH, hq, seq, FEAT, generator=g), dim=-1)
    fk = torch.softmax(torch.randn(BATCH, HKV, seq, FEAT, generator=g), dim=-1)
    gate = torch.rand(hq, generator=g) * 0.9 + 0.05
    return q, k, v, fq, fk, gate


def decode(state, inputs, start, window, sinks):
    q, k, v, fq, fk, gate = inputs
    outputs = []
    for t in range(start, q.shape[2]):
        s = slice(t, t + 1)
        y, state = decode_step(q[:, :, s], k[:, :, s], v[:, :, s], fq[:, :, s], fk[:, :, s], gate, window, SCALE,
                               state, sinks)
        outputs.append(y)
    return torch.cat(outputs, dim=2), state


def requiring_grad(state):
    """The same state with every tensor requiring grad: decode must then build new states, never in place."""
    return state.map(lambda t: t.detach().clone().requires_grad_())


@pytest.mark.parametrize("sinks", [0, 2, 6])
@pytest.mark.parametrize("seq,window,prefix", [(30, 4, 9), (30, 5, 2), (20, 1, 3), (25, 8, 0)])
def test_in_place_steps_equal_out_of_place_steps(seq, window, prefix, sinks):
    inputs = make_inputs(seq)
    if prefix:
        _, state = chunked_prefill(*(x[:, :, :prefix] for x in inputs[:5]), inputs[5], window, SCALE, sinks,
                                   return_state=True)
    else:
        state = empty_state(BATCH, HKV, D, FEAT, like=inputs[0])
    other = requiring_grad(state)
    with torch.no_grad():
        fast, fast_state = decode(state, inputs, prefix, window, sinks)
    slow, slow_state = decode(other, inputs, prefix, window, sinks)
    full = chunked_prefill(*inputs, window, SCALE, sinks)
    assert (fast - slow).abs().max().item() <= 1e-5
    assert (fast - full[:, :, prefix:]).abs().max().item() <= 1e-4
    for a, b in zip(fast_state.tensors(), slow_state.tensors()):
        assert a.shape == b.shape
        assert torch.allclose(a, b.detach(), rtol=1e-5, atol=1e-5)


def test_steady_state_steps_reuse_the_buffers():
    inputs = make_inputs(12)
    _, state = chunked_prefill(*(x[:, :, :8] for x in inputs[:5]), inputs[5], 4, SCALE, 2, return_state=True)
    pointers = [t.data_ptr() for t in state.tensors()]
    with torch.no_grad():
        _, after = decode(state, inputs, 8, 4, 2)
    assert after is state and after.position == 12
    assert [t.data_ptr() for t in after.tensors()] == pointers


def test_inference_state_decoded_outside_inference_mode():
    """Inference tensors refuse in-place updates outside inference mode: the step then builds a new state."""
    inputs = make_inputs(12)
    with torch.inference_mode():
        _, state = chunked_prefill(*(x[:, :, :8] for x in inputs[:5]), inputs[5], 4, SCALE, 2, return_state=True)
    with torch.no_grad():
        tail, _ = decode(state, inputs, 8, 4, 2)
    full = chunked_prefill(*inputs, 4, SCALE, 2)
    assert (tail - full[:, :, 8:]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("seq", [3, 4, 7, 13])
def test_window_is_a_ring_with_token_j_in_slot_j_mod_w(seq):
    inputs = make_inputs(seq)
    window, sinks = 4, 2
    _, state = chunked_prefill(*inputs, window, SCALE, sinks, return_state=True)
    k, v = inputs[1], inputs[2]
    first = max(seq - window, 0)
    for j in range(first, seq):
        assert torch.equal(state.k_win[:, :, j % window], k[:, :, j])
        assert torch.equal(state.v_win[:, :, j % window], v[:, :, j])
    assert torch.equal(state.k_sink, k[:, :, :min(sinks, seq)])
    assert state.kv.shape == (BATCH, HKV, FEAT, D) and state.k_sum.shape == (BATCH, HKV, FEAT)


@pytest.mark.parametrize("window,sinks", [(4, 2), (3, 5), (1, 0)])
def test_bytes_follow_the_cost_model_formula_at_every_position(window, sinks):
    inputs = make_inputs(14)
    state = empty_state(BATCH, HKV, D, FEAT, like=inputs[0])
    q, k, v, fq, fk, gate = inputs
    with torch.no_grad():
        for t in range(14):
            s = slice(t, t + 1)
            _, state = decode_step(q[:, :, s], k[:, :, s], v[:, :, s], fq[:, :, s], fk[:, :, s], gate, window,
                                   SCALE, state, sinks)
            context = t + 1
            w, n_sinks = min(window, context), min(sinks, context)
            expected = BATCH * HKV * (2 * D * (w + n_sinks) + FEAT * w + FEAT * (D + 1)) * 4
            assert state.nbytes() == expected


def test_reordered_state_keeps_decoding_correctly():
    inputs = make_inputs(16)
    order = torch.tensor([2, 0, 1])
    _, state = chunked_prefill(*(x[:, :, :9] for x in inputs[:5]), inputs[5], 4, SCALE, 2, return_state=True)
    state = state.map(lambda t: t.index_select(0, order))
    reordered = [x.index_select(0, order) for x in inputs[:5]] + [inputs[5]]
    with torch.no_grad():
        tail, _ = decode(state, reordered, 9, 4, 2)
    full = chunked_prefill(*reordered, 4, SCALE, 2)
    assert (tail - full[:, :, 9:]).abs().max().item() <= 1e-4


def make_parts(seed: int = 0) -> LearnedLinearParts:
    torch.manual_seed(seed)
    parts = LearnedLinearParts(q_heads=HKV * GROUPS, kv_heads=HKV, head_dim=D, feature_dim=4)
    with torch.no_grad():
        parts.feature_q.bias.normal_()
        parts.feature_k.bias.normal_()
    return parts


def assert_one_token_features_match(parts, q, k):
    fq, fk = parts.one_token_features(q, k)
    expected_q, expected_k = parts.feature_q(q), parts.feature_k(k)
    assert fq.shape == expected_q.shape and fk.shape == expected_k.shape
    assert torch.allclose(fq, expected_q, rtol=1e-5, atol=1e-6)
    assert torch.allclose(fk, expected_k, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch", [1, 4])
def test_one_token_features_equal_the_feature_maps(batch):
    parts = make_parts()
    q, k = torch.randn(batch, HKV * GROUPS, 1, D), torch.randn(batch, HKV, 1, D)
    with torch.inference_mode():
        assert_one_token_features_match(parts, q, k)
    with torch.no_grad():
        assert_one_token_features_match(parts, q, k)
    assert_one_token_features_match(parts, q, k)  # differentiable: built fresh, gradients reach the weights
    fq, fk = parts.one_token_features(q, k)
    (fq.sum() + (fk * torch.randn(fk.shape)).sum()).backward()
    assert parts.feature_k.weight.grad is not None and parts.feature_k.weight.grad.abs().sum() > 0


def test_cached_stacked_maps_follow_weight_updates():
    parts = make_parts()
    q, k = torch.randn(2, HKV * GROUPS, 1, D), torch.randn(2, HKV, 1, D)
    with torch.no_grad():
        assert_one_token_features_match(parts, q, k)
        parts.feature_k.weight.mul_(-2)  # in place: the version counter moves
        assert_one_token_features_match(parts, q, k)
        parts.load_state_dict(make_parts(seed=1).state_dict())
        assert_one_token_features_match(parts, q, k)
        parts.to(torch.float64)
        assert_one_token_features_match(parts, q.double(), k.double())
    assert "_stacked" not in str(list(parts.state_dict()))
