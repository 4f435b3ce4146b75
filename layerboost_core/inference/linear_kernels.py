"""Linear sliding-window attention (LoLCATs / Hedgehog style, with attention sinks), pure PyTorch.

For query i, the softmax set holds the keys in the window (i - W, i] plus the first `sinks` tokens of the
sequence (the attention sinks small LMs park most attention on; without them a window loses ~90% of the
output's energy on SmolLM2). All other earlier keys get linear weights phi(q).phi(k). A learned per-head
gate g mixes the two (m_i: the row max of the softmax scores):

    y_i = (g * sum_sm e_ij v_j + (1 - g) * sum_lin a_ij v_j) / (g * sum_sm e_ij + (1 - g) * sum_lin a_ij)

`chunked_prefill` uses chunks of W tokens, so the window of chunk c lies in chunks c-1 and c and everything
older than chunk c-1 is a running (F x D) state: cost is linear in S and no S x S matrix is built. It has two
bodies with the same math: `_differentiable_prefill` (attention transfer trains through it) and, when nothing is
differentiated, `_inference_prefill`, which accumulates both parts into one buffer in place and allocates about
half as many large tensors (all-linear SmolLM2 prefill in bf16 on a CPU with AMX, the two bodies side by side:
0-6% faster at 512 tokens, 5-8% at 2,048, 28-37% at 7,680; `bench_prefill.py --training-kernel`).
`decode_step` is the recurrent form, on a fixed-size ring-buffer state (`LinearState`) that it updates in
place once full. The project's `attention/naive.py` holds the quadratic reference both are tested against
(references are not shipped in exported folders).
GQA is kept grouped: the G query heads that share one kv head are stacked as rows, never repeat_kv'd.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LinearState:
    """Recurrent state of one layer: the sinks' and the last <= W tokens' k, v (and phi(k)), and the linear
    sums of every other earlier token. Its size does not grow with the sequence.

    Layout, built for a lean decode step:
      * `keys_t` / `values` hold [sinks | window] in one buffer each, so one matmul scores the whole softmax
        set; the keys are stored transposed (D rows), the layout the score matmul reads fastest.
      * the window part is a ring: token j sits in window slot j % W, so once the window is full a step
        overwrites one slot in place instead of concatenating.
      * `sums` fuses the linear numerator and denominator, [sum phi(k_j) v_j^T | sum phi(k_j)] (F x (D + 1)),
        so one matmul gives both.
    A sink still inside the window (the first W + sinks tokens) is held twice; the step masks its sink copy.
    Bytes per kv head: 2*D*(s + w) + F*w + F*(D + 1), the cost model's formula.
    """

    keys_t: torch.Tensor  # (B, Hkv, D, s + w): s <= sinks sink tokens, then the w <= W window slots
    values: torch.Tensor  # (B, Hkv, s + w, D)
    fk_win: torch.Tensor  # (B, Hkv, w, F) window slots; zero rows for sink tokens, so they never enter the sums
    sums: torch.Tensor  # (B, Hkv, F, D + 1): [sum phi(k_j) v_j^T | sum phi(k_j)] over tokens older than the window
    position: int  # tokens seen so far

    @property
    def num_sinks(self) -> int:
        return self.values.shape[2] - self.fk_win.shape[2]

    @property
    def k_sink(self) -> torch.Tensor:  # (B, Hkv, s, D)
        return self.keys_t[..., : self.num_sinks].transpose(-1, -2)

    @property
    def v_sink(self) -> torch.Tensor:
        return self.values[:, :, : self.num_sinks]

    @property
    def k_win(self) -> torch.Tensor:  # (B, Hkv, w, D), in ring order (token j in slot j % W)
        return self.keys_t[..., self.num_sinks:].transpose(-1, -2)

    @property
    def v_win(self) -> torch.Tensor:
        return self.values[:, :, self.num_sinks:]

    @property
    def kv(self) -> torch.Tensor:  # (B, Hkv, F, D): sum of phi(k_j) v_j^T over tokens older than the window
        return self.sums[..., :-1]

    @property
    def k_sum(self) -> torch.Tensor:  # (B, Hkv, F): sum of phi(k_j) over the same tokens
        return self.sums[..., -1]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.keys_t, self.values, self.fk_win, self.sums

    def map(self, fn) -> "LinearState":
        """`fn` applied to every tensor (batch reordering for beam search and friends); `fn` must return new
        tensors, since decoding updates the buffers in place."""
        return LinearState(*(fn(t) for t in self.tensors()), self.position)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def _group_rows(x: torch.Tensor, hkv: int, n: int, c: int, scale: float | torch.Tensor = 1.0) -> torch.Tensor:
    """(B, Hq, n*c, X) -> (B, Hkv, n, G*c, X), times `scale` (a number, or per query head shaped
    (1, Hkv, 1, G, 1, 1)): the G query heads of one kv head stacked as rows per chunk. At inference the
    multiply writes straight into the grouped layout (one pass)."""
    b, hq, _, d = x.shape
    g = hq // hkv
    grouped = x.view(b, hkv, g, n, c, d).permute(0, 1, 3, 2, 4, 5)
    if torch.is_grad_enabled() and x.requires_grad:  # out= has no autograd: two passes when training
        return (grouped * scale).reshape(b, hkv, n, g * c, d)
    out = x.new_empty(b, hkv, n, g, c, d)
    torch.mul(grouped, scale, out=out)
    return out.view(b, hkv, n, g * c, d)


def _ungroup_rows(y: torch.Tensor, hq: int, c: int, s: int) -> torch.Tensor:
    """Inverse of `_group_rows`, keeping the first `s` positions: (B, Hkv, n, G*c, D) -> (B, Hq, s, D).
    The result is a transposed view of a (B, s, Hq, D) tensor, so `o_proj` needs no further copy."""
    b, hkv, n, _, d = y.shape
    g = hq // hkv
    out = y.view(b, hkv, n, g, c, d).permute(0, 2, 4, 1, 3, 5).reshape(b, n * c, hq, d)
    return out[:, :s].transpose(1, 2)


def _pad_to(x: torch.Tensor, length: int) -> torch.Tensor:
    """x (B, H, S, X) zero-padded along S to `length` (no copy when already that long)."""
    return x if x.shape[2] == length else F.pad(x, (0, 0, 0, length - x.shape[2]))


def _chunk_views(x: torch.Tensor, n: int, c: int):
    """x (B, H, S, X) zero-padded with one chunk before and to n*c tokens: views of the current chunk
    (B, H, n, c, X), of the previous chunk (same shape, zeros before chunk 0), and the padded tensor."""
    b, h, s, width = x.shape
    padded = F.pad(x, (0, 0, c, n * c - s))  # (B, H, (n+1)*c, X)
    current = padded[:, :, c:].view(b, h, n, c, width)
    previous = padded[:, :, : n * c].view(b, h, n, c, width)
    return current, previous, padded


def _windows(padded: torch.Tensor, c: int) -> torch.Tensor:
    """Overlapping [previous chunk | this chunk] windows as a view: (B, H, n, 2c, X)."""
    return padded.unfold(2, 2 * c, c).transpose(-1, -2)


@functools.lru_cache(maxsize=32)
def _masks(n: int, c: int, g: int, sinks: int, device, dtype):
    """Per (chunk, row, key): the additive bias (0 / -inf) of the softmax set, over [prev chunk | this chunk
    | sinks] columns; the 0/1 multiplier of the linear part inside the previous chunk (keys at least W
    behind); and the (n, n) 0/1 matrix summing, for chunk c, the per-chunk states of chunks 0 .. c-2.

    Built outside inference mode: the cache is shared by evaluation and training, and an inference tensor
    cannot be saved for backward."""
    with torch.inference_mode(False), torch.no_grad():
        return _build_masks(n, c, g, sinks, device, dtype)


def _build_masks(n: int, c: int, g: int, sinks: int, device, dtype):
    i = torch.arange(c, device=device).view(c, 1)
    t = torch.arange(2 * c, device=device).view(1, 2 * c)
    chunk = torch.arange(n, device=device)
    has_prev = (chunk > 0).view(n, 1, 1)
    band = ((t > i) & (t <= i + c)).repeat(g, 1).unsqueeze(0) & (has_prev | (t >= c))  # (n, g*c, 2c)
    position = (chunk.view(n, 1) * c + torch.arange(c, device=device).view(1, c)).repeat(1, g)  # (n, g*c)
    sink_ok = torch.arange(sinks, device=device).view(1, 1, sinks) <= position.unsqueeze(-1) - c  # (n, g*c, s)
    allowed = torch.cat([band, sink_ok], dim=-1)
    bias = torch.zeros(allowed.shape, device=device, dtype=dtype).masked_fill_(~allowed, float("-inf"))
    old = (torch.arange(c, device=device).view(1, c) <= i).repeat(g, 1).unsqueeze(0) & has_prev  # (n, g*c, c)
    older = (chunk.view(1, n) <= chunk.view(n, 1) - 2).to(dtype)
    return bias, old.to(dtype), older


def _without_sinks(fk: torch.Tensor, sinks: int) -> torch.Tensor:
    """phi(k) with the sink tokens' rows zeroed: sinks are always in the softmax set, never in the sums."""
    if sinks == 0:
        return fk
    keep = (torch.arange(fk.shape[2], device=fk.device) >= sinks).to(fk.dtype).view(1, 1, -1, 1)
    return fk * keep


def _linear_views(v: torch.Tensor, fk: torch.Tensor, n: int, c: int):
    """Chunk views (current, previous) of [v | 1] and of phi(k) (zero at sinks) for `_linear_sums`. The ones
    column makes "linear weights @ v" also return the weights' row sum (the denominator)."""
    b, hkv, s, _ = v.shape
    vx_cur, vx_prev, _ = _chunk_views(torch.cat([v, v.new_ones(b, hkv, s, 1)], dim=-1), n, c)
    fk_cur, fk_prev, _ = _chunk_views(fk, n, c)
    return vx_cur, vx_prev, fk_cur, fk_prev


def _linear_sums(fqg, fk_cur, fk_prev, vx_cur, vx_prev, old, older) -> torch.Tensor:
    """The linear part, grouped (B, Hkv, n, G*c, D+1): numerator | denominator of every query row, over the
    keys of the previous chunk at least W behind, then the summed state of older chunks."""
    b, hkv, n, _, f = fqg.shape
    d1 = vx_cur.shape[-1]
    a = (fqg @ fk_prev.transpose(-1, -2)).mul_(old)  # (B, Hkv, n, G*c, c)
    kv_chunk = (fk_cur.transpose(-1, -2) @ vx_cur).view(b, hkv, n, f * d1)  # (B, Hkv, n, F*(D+1))
    kv_older = (older @ kv_chunk).view(b, hkv, n, f, d1)
    return torch.matmul(fqg, kv_older).add_(a @ vx_prev)


def chunked_prefill(q, k, v, fq, fk, gate, window: int, scale: float, sinks: int = 0,
                    return_state: bool = False):
    """Linear sliding-window attention over a whole sequence.

    q: (B, Hq, S, D), k/v: (B, Hkv, S, D), fq: (B, Hq, S, F), fk: (B, Hkv, S, F), gate: (Hq,) in (0, 1).
    Returns y (B, Hq, S, D), and the `LinearState` after the last token when `return_state`.
    On CUDA, when nothing is differentiated, the softmax part runs in flex_attention (flex.py): fused, no
    score tensors.
    """
    if q.is_cuda and not torch.is_grad_enabled():
        from .flex import flex_prefill  # here, not at the top: flex.py builds on this module

        return flex_prefill(q, k, v, fq, fk, gate, window, scale, sinks, return_state)
    if not (torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, fq, fk, gate))):
        return _inference_prefill(q, k, v, fq, fk, gate, window, scale, sinks, return_state)
    return _differentiable_prefill(q, k, v, fq, fk, gate, window, scale, sinks, return_state)


def _differentiable_prefill(q, k, v, fq, fk, gate, window: int, scale: float, sinks: int, return_state: bool):
    """`chunked_prefill` built from out-of-place ops, so autograd can run through it (the training path)."""
    b, hq, s, d = q.shape
    hkv = k.shape[1]
    g, c = hq // hkv, window
    n = math.ceil(s / c)
    sinks = min(sinks, s)
    bias, old, older = _masks(n, c, g, sinks, q.device, q.dtype)
    fk = _without_sinks(fk, sinks)
    # Zero tokens past the end (causality keeps them out of every real query) and one zero chunk before
    # the start (masked out) make the previous-chunk and window tensors plain views.
    qg = _group_rows(_pad_to(q, n * c), hkv, n, c, scale)  # (B, Hkv, n, G*c, D)
    fqg = _group_rows(_pad_to(fq, n * c), hkv, n, c)  # (B, Hkv, n, G*c, F)
    _, _, k_pad = _chunk_views(k, n, c)
    _, _, v_pad = _chunk_views(v, n, c)
    vx_cur, vx_prev, fk_cur, fk_prev = _linear_views(v, fk, n, c)

    # Softmax part over [previous chunk | this chunk | sinks], masked to the window and to sinks outside it.
    # With p the normalised weights, sum exp(s - max) = 1 / max(p): the fused softmax gives both pieces.
    k_set, v_set = _windows(k_pad, c), _windows(v_pad, c)  # (B, Hkv, n, 2c, D) views
    if sinks:  # append the sink keys to every chunk's set (copies K/V, which are far smaller than the scores)
        k_set = torch.cat([k_set, k[:, :, None, :sinks].expand(-1, -1, n, -1, -1)], dim=-2)
        v_set = torch.cat([v_set, v[:, :, None, :sinks].expand(-1, -1, n, -1, -1)], dim=-2)
    scores = qg @ k_set.transpose(-1, -2)  # (B, Hkv, n, G*c, 2c + sinks)
    p = torch.softmax(scores.add_(bias), dim=-1)
    den_sm = p.amax(dim=-1, keepdim=True).reciprocal()  # (B, Hkv, n, G*c, 1); not in place: amax's backward needs it
    pv = p @ v_set  # (B, Hkv, n, G*c, D)

    lin = _linear_sums(fqg, fk_cur, fk_prev, vx_cur, vx_prev, old, older)
    num_lin, den_lin = lin[..., :d], lin[..., d:]

    gate_rows = gate.view(1, hkv, 1, g, 1, 1).expand(1, hkv, 1, g, c, 1).reshape(1, hkv, 1, g * c, 1)
    w_sm = gate_rows * den_sm  # per-row weights of the two parts, normalised below
    w_lin = 1 - gate_rows
    total = w_sm + w_lin * den_lin
    y = _ungroup_rows(torch.addcmul(pv.mul_(w_sm / total), num_lin, w_lin / total), hq, c, s)
    if not return_state:
        return y
    return y, _state_after(k, v, fk, window, sinks)


def _softmax_sets(padded: torch.Tensor, x: torch.Tensor, n: int, c: int, sinks: int) -> torch.Tensor:
    """Every chunk's softmax set [chunk j-1 | chunk j | sinks] as one contiguous (B, H, n, 2c + sinks, X) tensor:
    one copy (a cat of the overlapping-window view and the sinks), from `padded` (one chunk before the
    sequence) and `x` (the sequence itself, whose first `sinks` rows are the sinks)."""
    windows = _windows(padded, c)
    if not sinks:
        return windows.contiguous()
    return torch.cat([windows, x[:, :, None, :sinks].expand(-1, -1, n, -1, -1)], dim=-2)


def _inference_prefill(q, k, v, fq, fk, gate, window: int, scale: float, sinks: int, return_state: bool):
    """`chunked_prefill` when nothing is differentiated: the same sums, in fewer and mostly in-place passes.

    Per chunk, one (G*c x (D + 1)) buffer accumulates [numerator | denominator] of both parts: the softmax part
    from p @ [v | 1] scaled per row by g / max(p) (= g * sum_sm e_ij, see the module docstring), then the
    previous chunk's linear part and the older chunks' state, added in place by baddbmm. The linear weights carry
    (1 - g) from the grouped phi(q). One division writes y straight into the layout o_proj reads."""
    b, hq, s, d = q.shape
    hkv, f = k.shape[1], fq.shape[-1]
    g, c = hq // hkv, window
    n = math.ceil(s / c)
    sinks = min(sinks, s)
    bias, _, older = _masks(n, c, g, sinks, q.device, q.dtype)
    rows, width, padded = b * hkv * n, 2 * c + sinks, (n + 1) * c
    # One zero chunk before the start (chunk 0's "previous chunk", masked) and zeros past the end.
    vx = v.new_zeros(b, hkv, padded, d + 1)  # [v | 1]: "weights @ vx" also gives the weights' row sum
    vx[:, :, c : c + s, :d] = v
    vx[:, :, c : c + s, d] = 1
    k_pad = k.new_zeros(b, hkv, padded, d)
    k_pad[:, :, c : c + s] = k
    fk_pad = fk.new_zeros(b, hkv, padded, f)  # zero at sinks: they are never in the linear sums
    fk_pad[:, :, c + sinks : c + s] = fk[:, :, sinks:]
    k_set = _softmax_sets(k_pad, k, n, c, sinks).view(rows, width, d)
    vx_set = _softmax_sets(vx, vx[:, :, c:], n, c, sinks).view(rows, width, d + 1)
    gate_rows = gate.view(1, hkv, 1, g, 1, 1)
    qg = _group_rows(_pad_to(q, n * c), hkv, n, c, scale).view(rows, g * c, d)
    fqg = _group_rows(_pad_to(fq, n * c), hkv, n, c, 1 - gate_rows).view(rows, g * c, f)

    scores = torch.bmm(qg, k_set.transpose(1, 2)).view(b * hkv, n, g * c, width).add_(bias)
    p = torch.softmax(scores, dim=-1).view(rows, g * c, width)
    w_sm = p.amax(dim=-1, keepdim=True).reciprocal_().view(b, hkv, n, g, c, 1).mul_(gate_rows)
    acc = torch.bmm(p, vx_set)  # (rows, G*c, D + 1): [p @ v | 1]
    acc.view(b, hkv, n, g, c, d + 1).mul_(w_sm)
    # The previous chunk's keys at least W behind: key index <= query index within the chunk (lower triangle).
    lin_prev = torch.bmm(fqg, fk_pad[:, :, : n * c].reshape(rows, c, f).transpose(1, 2))
    lin_prev.view(rows * g, c, c).tril_()
    acc.baddbmm_(lin_prev, vx[:, :, : n * c].reshape(rows, c, d + 1))
    fk_cur, vx_cur = fk_pad[:, :, c:].reshape(rows, c, f), vx[:, :, c:].reshape(rows, c, d + 1)
    kv_chunk = torch.bmm(fk_cur.transpose(1, 2), vx_cur).view(b * hkv, n, f * (d + 1))
    acc.baddbmm_(fqg, torch.matmul(older, kv_chunk).view(rows, f, d + 1))  # chunks 0 .. j-2 for chunk j

    out = q.new_empty(b, n * c, hq, d)
    grouped = acc.view(b, hkv, n, g, c, d + 1)
    torch.div(grouped[..., :d], grouped[..., d:], out=out.view(b, n, c, hkv, g, d).permute(0, 3, 1, 4, 2, 5))
    y = out[:, :s].transpose(1, 2)
    if not return_state:
        return y
    split = max(s - window, 0)
    return y, _state_from(k, v, fk_pad[:, :, c : c + s], vx[:, :, c : c + split], window, sinks)


def _to_ring(x: torch.Tensor, first: int, window: int) -> torch.Tensor:
    """x (B, H, w, X) holding tokens first .. first + w - 1 -> a new contiguous tensor with token j in slot
    j % window (w == window whenever first > 0)."""
    shift = first % window
    return torch.roll(x, shift, dims=2) if shift else x.clone(memory_format=torch.contiguous_format)


def _state_after(k, v, fk, window: int, sinks: int) -> LinearState:
    """State after a prefill (fk already zero at sinks): the sinks and the last W tokens stay exact, the
    other tokens are summed into the linear state."""
    v_old = v[:, :, : max(k.shape[2] - window, 0)]
    return _state_from(k, v, fk, torch.cat([v_old, v_old.new_ones(*v_old.shape[:-1], 1)], dim=-1), window, sinks)


def _state_from(k, v, fk, vx_old, window: int, sinks: int) -> LinearState:
    """`_state_after` given [v | 1] of the tokens older than the window (`vx_old`, (B, Hkv, max(S - W, 0), D + 1))."""
    s = k.shape[2]
    split = vx_old.shape[2]
    keys = torch.cat([k[:, :, :sinks], _to_ring(k[:, :, split:], split, window)], dim=2)
    return LinearState(
        keys_t=keys.transpose(-1, -2).contiguous(),
        values=torch.cat([v[:, :, :sinks], _to_ring(v[:, :, split:], split, window)], dim=2),
        fk_win=_to_ring(fk[:, :, split:], split, window),
        sums=fk[:, :, :split].transpose(-1, -2) @ vx_old,
        position=s,
    )


def empty_state(b: int, hkv: int, d: int, f: int, like: torch.Tensor) -> LinearState:
    z = like.new_zeros
    return LinearState(z(b, hkv, d, 0), z(b, hkv, 0, d), z(b, hkv, 0, f), z(b, hkv, f, d + 1), 0)


def _in_place_ok(state: LinearState) -> bool:
    """The state's buffers may be updated in place: nothing to differentiate, and not inference tensors
    outside inference mode (which refuse in-place updates)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in state.tensors()):
        return False
    return torch.is_inference_mode_enabled() or not state.values.is_inference()


def decode_step(q, k, v, fq, fk, gate, window: int, scale: float, state: LinearState, sinks: int = 0):
    """One new token. q: (B, Hq, 1, D), k/v: (B, Hkv, 1, D), fq/fk likewise with F. Returns (y, new state).

    Once the window and the sinks are full (the steady state) and nothing is differentiated, the state's
    buffers are updated in place and the same `LinearState` is returned: the caller must not reuse the
    state it passed in. Before that (the first max(W, sinks) tokens) a new state is built.
    """
    t = state.position
    if t >= sinks and state.fk_win.shape[2] == window and _in_place_ok(state):
        d = v.shape[-1]
        slot = t % window  # the new token's window slot, which holds token t - W until now
        at = state.num_sinks + slot
        sums, fk_win = state.sums, state.fk_win
        # The token leaving the window joins the linear sums (a sink's phi(k) row is zero: it adds nothing).
        fk_out = fk_win[:, :, slot]  # (B, Hkv, F)
        sums[..., :d].addcmul_(fk_out.unsqueeze(-1), state.values[:, :, at].unsqueeze(-2))
        sums[..., d].add_(fk_out)
        state.keys_t[..., at : at + 1].copy_(k.transpose(-1, -2))
        state.values[:, :, at : at + 1].copy_(v)
        fk_win[:, :, slot : slot + 1].copy_(fk)
        state.position = t + 1
    else:
        state = _grown_state(k, v, fk, window, state, sinks)
    outside = max(0, min(state.num_sinks, t - window + 1))  # sinks that have left the window
    return _attend_state(q, fq, gate, scale, state, outside), state


def _grown_state(k, v, fk, window: int, state: LinearState, sinks: int) -> LinearState:
    """The state after one more token, built out of place (window or sinks not yet full, or autograd)."""
    t = state.position
    k_sink, v_sink = state.k_sink, state.v_sink
    k_ring, v_ring, fk_ring, sums = state.k_win, state.v_win, state.fk_win, state.sums
    if t < sinks:  # one of the first tokens: a sink forever, never part of the linear sums
        k_sink, v_sink = torch.cat([k_sink, k], dim=2), torch.cat([v_sink, v], dim=2)
        fk = torch.zeros_like(fk)
    if fk_ring.shape[2] < window:  # the window is still filling: slot t (== tokens held) is new
        k_ring, v_ring = torch.cat([k_ring, k], dim=2), torch.cat([v_ring, v], dim=2)
        fk_ring = torch.cat([fk_ring, fk], dim=2)
    else:  # the oldest token (in slot t % W) leaves the window and joins the linear sums
        slot = t % window
        fk_out, v_out = fk_ring[:, :, slot : slot + 1], v_ring[:, :, slot : slot + 1]
        sums = sums + fk_out.transpose(-1, -2) @ torch.cat([v_out, v_out.new_ones(*v_out.shape[:-1], 1)], dim=-1)

        def put(x, new):
            return torch.cat([x[:, :, :slot], new, x[:, :, slot + 1 :]], dim=2)

        k_ring, v_ring, fk_ring = put(k_ring, k), put(v_ring, v), put(fk_ring, fk)
    keys_t = torch.cat([k_sink, k_ring], dim=2).transpose(-1, -2).contiguous()
    return LinearState(keys_t, torch.cat([v_sink, v_ring], dim=2), fk_ring.contiguous(), sums, t + 1)


def _attend_state(q, fq, gate, scale: float, state: LinearState, outside: int) -> torch.Tensor:
    """Output (B, Hq, 1, D) of the token whose k/v are already in `state`. The softmax set is every slot of
    the state except the sink copies from `outside` on (those sinks are still in the window part).

    With p = softmax(scores) and m the row max, sum_sm e_ij = 1 / max(p) and sum_sm e_ij v_j = (p @ V) / max(p),
    so multiplying the numerator and the denominator by max(p):
        y = (g * p @ V + (1 - g) max(p) * fq @ kv) / (g + (1 - g) max(p) * fq @ k_sum)
    All products are batched over (B, Hkv), the G query heads of a kv head stacked as rows (no repeat_kv).
    """
    b, hq, _, d = q.shape
    hkv, _, n = state.keys_t.shape[1:]
    g, bh = hq // hkv, b * hkv
    scores = torch.bmm(q.reshape(bh, g, d), state.keys_t.reshape(bh, d, n)).mul_(scale)  # (B*Hkv, G, s + w)
    if outside < state.num_sinks:
        scores[..., outside : state.num_sinks] = float("-inf")
    p = torch.softmax(scores, dim=-1)
    p_max = p.amax(dim=-1, keepdim=True).view(b, hkv, g, 1)
    pv = torch.bmm(p, state.values.reshape(bh, n, d)).view(b, hkv, g, d)
    lin = torch.bmm(fq.reshape(bh, g, -1), state.sums.reshape(bh, -1, d + 1))  # numerator | denominator
    lin = lin.view(b, hkv, g, d + 1)
    gate_rows = gate.view(hkv, g, 1)
    lin.mul_(torch.addcmul(p_max, p_max, gate_rows, value=-1))  # (1 - g) max(p)
    den = lin[..., d:] + gate_rows
    y = torch.addcmul(lin[..., :d], pv, gate_rows).div_(den)
    return y.view(b, hq, 1, d)
