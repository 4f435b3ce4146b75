"""bf16 weights, fp32 metrics: the proxy of a bfloat16 model reads like the float32 model's.

The tiny model is loaded both ways from the same seed (bf16 weights are the fp32 ones rounded); the same mixed
plan (softmax / linear / none) is applied to each and scored against its own unpatched original.
"""
from __future__ import annotations

import math

import pytest
import torch

from layerboost_core import metrics
from layerboost_core.metrics import ProxyEvaluator
from layerboost_core.models import load_model
from layerboost_core.patch import PlanSwitcher
from layerboost_core.plan import LayerPlan

PLAN = "SLNL"
LINEAR = {"linear": {"window": 4, "feature_dim": 8, "sinks": 2}}
# Stated tolerance of bf16 against fp32: KL within 5% (relative), NLLs within 2e-3 nats/token, top-1 agreement
# within 5 points (the random model's near-uniform logits make argmax ties that bf16 rounding can flip).
KL_REL, NLL_ABS, AGREE_ABS = 0.05, 2e-3, 0.05


def proxy_of(dtype: str, monkeypatch=None) -> tuple[dict, dict, set]:
    """(metrics unpatched, metrics under PLAN, dtypes of the logits chunks the metric passes computed on)."""
    model = load_model("tiny", "tiny:llama", device="cpu", dtype=dtype).model
    assert {p.dtype for p in model.parameters()} == {getattr(torch, dtype)}
    seen = set()
    if monkeypatch is not None:
        chunks = metrics._chunks

        def recording(logits):
            for part, z, lse in chunks(logits):
                seen.update({(logits.dtype, z.dtype, lse.dtype)})
                yield part, z, lse

        monkeypatch.setattr(metrics, "_chunks", recording)
    blocks = torch.randint(3, 1000, (2, 65), generator=torch.Generator().manual_seed(0))
    evaluator = ProxyEvaluator(model, blocks, batch_size=2)
    original = evaluator.evaluate()
    torch.manual_seed(0)  # the same untrained `linear` parts in both models
    PlanSwitcher(model, LINEAR).apply(LayerPlan.from_string(PLAN))
    return original, evaluator.evaluate(), seen


@pytest.mark.timeout(180)
def test_bf16_model_scores_like_fp32_with_fp32_metric_passes(monkeypatch):
    _, want, _ = proxy_of("float32")
    original, got, seen = proxy_of("bfloat16", monkeypatch)
    # bf16 logits in, fp32 sums out: a bf16 sum over a 49k vocabulary would not read 0 or match fp32 to 5%
    assert seen == {(torch.bfloat16, torch.float32, torch.float32)}
    assert original["kl"] == 0.0 and original["nll_delta"] == 0.0 and original["top1_agreement"] == 1.0
    assert all(math.isfinite(v) for v in got.values()), got
    assert got["kl"] > 0.0
    assert got["kl"] == pytest.approx(want["kl"], rel=KL_REL)
    assert got["nll"] == pytest.approx(want["nll"], abs=NLL_ABS)
    assert got["nll_delta"] == pytest.approx(want["nll_delta"], abs=NLL_ABS)
    assert got["top1_agreement"] == pytest.approx(want["top1_agreement"], abs=AGREE_ABS)


def test_auto_dtype_is_bf16_only_where_the_device_computes_it(monkeypatch):
    from layerboost_core import models

    assert models.cpu_has_native_bf16("flags\t\t: fpu sse avx512f avx512_bf16 amx_tile") is True
    assert models.cpu_has_native_bf16("flags\t\t: fpu sse amx_bf16 amx_tile") is True
    # a flag's prefix or a lookalike is not the flag; no cpuinfo (macOS, Windows): emulated, fp32
    assert models.cpu_has_native_bf16("flags\t\t: fpu sse avx512f avx512_bf16x avx512_fp16") is False
    assert models.cpu_has_native_bf16("") is False
    for native, cpu_dtype in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(models, "cpu_has_native_bf16", lambda native=native: native)
        assert models.resolve_dtype("auto", torch.device("cpu")) == cpu_dtype
        assert models.resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
        assert models.resolve_dtype("float32", torch.device("cpu")) == torch.float32
