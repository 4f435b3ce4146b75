"""A memory and time plan for a search, from the model's config alone (no weights, nothing heavy).

Per evaluator actor: the weights, the bank of `linear` replacements, the original model's cached next-token
distributions on the held-out blocks (exact or top-k), the activations of one held-out forward and the
runtime's own overhead; against the device's memory, how many actors fit and what `runner.num_gpus` each
should ask for; and, from FLOPs and bytes moved, about how many plans an hour the device evaluates.
`check_fits` turns an impossible plan into one line naming the setting to change.

The model is built on the meta device, so a 70B config costs a second and no memory; the bank's modules are
built by the `linear` option's own code on one meta layer, so its size follows whatever that option learns.
"""
from __future__ import annotations

import functools
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .attention import OPTIONS
from .errors import UserError
from .families import family_of
from .metrics import POSITIONS_PER_PASS
from .models import dtype_name, hub_reachable, resolve_device, resolve_dtype

GB = 1e9  # decimal gigabytes: the unit device vendors quote, so "80 GB" reads as the card's label

# The project's defaults for the `linear` option (conf/config.yaml, attention.linear).
DEFAULT_LINEAR = {"window": 64, "feature_dim": 32, "sinks": 4}

# Per held-out token, beside the distribution itself: prob_sum, neg_entropy and nll (fp32) and argmax (int64),
# as metrics._Reference keeps them.
REFERENCE_STATS_BYTES = 4 + 4 + 4 + 8
# A top-k reference keeps k (probability fp32, token id int32) pairs and the mass outside them (fp32).
TOP_K_ENTRY_BYTES = 4 + 4
TOP_K_TAIL_BYTES = 4

# Never plan to fill a device: the caching allocator fragments and other processes (Ray's own) need room.
USABLE_FRACTION = 0.9
# Per process, outside the tensors counted here. CUDA: the context (~0.5 GB) plus cuBLAS workspaces and
# allocator slack. CPU: Python, torch, transformers and the Ray worker (~0.4 GB RSS measured for the imports).
RUNTIME_OVERHEAD_BYTES = {"cuda": int(1.0 * GB), "cpu": int(0.6 * GB)}


@dataclass(frozen=True)
class DeviceSpeed:
    """Achieved (not peak) throughput of one device: matmul FLOP/s and memory bytes/s."""

    name: str
    flops_per_second: float
    bytes_per_second: float
    note: str


# Documented peaks (dense bf16 tensor cores, HBM) at assumed efficiencies: 40% of peak FLOPs is typical of
# inference-sized matmuls with framework overhead, 60% of peak bandwidth of large elementwise passes.
A100_80GB = DeviceSpeed("A100-80GB bf16", 312e12 * 0.40, 2.04e12 * 0.60,
                        "312 TFLOP/s bf16 and 2.04 TB/s peak, assumed 40% / 60% achieved")
H100_80GB = DeviceSpeed("H100-80GB SXM bf16", 989e12 * 0.40, 3.35e12 * 0.60,
                        "989 TFLOP/s bf16 and 3.35 TB/s peak, assumed 40% / 60% achieved")


@functools.lru_cache(maxsize=1)
def measure_cpu_speed(dtype: torch.dtype = torch.float32, size: int = 1024, repeats: int = 3) -> DeviceSpeed:
    """This machine's achieved matmul FLOP/s at `dtype` and copy bandwidth, best of `repeats` (about a second).

    Measured with torch's current thread count, i.e. what an actor with those threads gets; cached per process.
    """
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    big = torch.empty(32 * 2**20 // 4)  # 32 MiB: well past the caches, so the copy measures memory
    out = torch.empty_like(big)
    matmul_s = copy_s = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        matmul_s = min(matmul_s, time.perf_counter() - started)
        started = time.perf_counter()
        out.copy_(big)
        copy_s = min(copy_s, time.perf_counter() - started)
    flops, moved = 2 * size**3 / matmul_s, 2 * big.numel() * 4 / copy_s  # a copy reads and writes
    return DeviceSpeed(f"this CPU ({torch.get_num_threads()} threads, {dtype_name(dtype)})", flops, moved,
                       f"measured: {flops / 1e9:.0f} GFLOP/s matmul, {moved / 1e9:.1f} GB/s copy")


def detect_device_memory(device: str) -> int:
    """Total memory of `device` in bytes: the GPU's (torch.cuda.mem_get_info) or the machine's RAM."""
    where = torch.device(device)
    if where.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device: cannot read the memory of {device!r} here (no CUDA); pass device_memory_bytes")
        return int(torch.cuda.mem_get_info(where)[1])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def load_config(source):
    """A transformers config from a config object, a dict, a config.json path, a model folder or a hub id."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(source, PretrainedConfig):
        return source
    if isinstance(source, (str, Path)) and Path(source).is_file():
        source = json.loads(Path(source).read_text())
    if isinstance(source, dict):
        values = dict(source)
        model_type = values.pop("model_type", None)
        try:
            return AutoConfig.for_model(model_type, **values)
        except ValueError:
            raise UserError(f"model.source: unknown model_type {model_type!r} in the config") from None
    if not Path(source).exists() and not hub_reachable():  # else transformers retries for ~30 s offline
        raise UserError(f"model.source: {str(source)!r} is no local folder or config.json and the Hugging Face "
                        "hub is not reachable; pass a model folder or its config.json")
    try:  # a folder, or a hub id (downloads config.json only)
        return AutoConfig.from_pretrained(str(source))
    except (OSError, ValueError) as error:
        reason = str(error).replace("\n", " ")  # one line, as every UserError
        raise UserError(f"model.source: cannot read a config from {str(source)!r} ({reason})") from None


def meta_model(config, dtype: torch.dtype):
    """The model of `config` on the meta device at `dtype`: shapes and dtypes, no storage."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return model.to(dtype)  # as models.load_model does: floating buffers (RoPE) follow the dtype too


def _gb(size: float) -> str:
    return f"{size / GB:.1f} GB"


def tensor_bytes(tensors) -> dict[str, int]:
    """Bytes per dtype of `tensors`, each distinct tensor once (tied weights count once)."""
    seen, totals = set(), {}
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            name = dtype_name(t.dtype)
            totals[name] = totals.get(name, 0) + t.numel() * t.element_size()
    return totals


def bank_bytes_per_layer(model, linear_settings: dict) -> int:
    """Bytes of one layer's `linear` learned parts, built by the option itself on the meta model's first layer."""
    family = family_of(model)
    attn = family.decoder_layers(model)[0].self_attn
    with torch.device("meta"):
        option = OPTIONS.get("linear").build(attn, family, linear_settings)
    return sum(tensor_bytes(option.learned.parameters()).values())


def reference_bytes(blocks: int, seq_len: int, vocab: int, top_k: int | None) -> int:
    """Bytes of the cached original distributions on `blocks` held-out blocks of `seq_len` tokens (S-1 targets
    each): fp32 probabilities over the whole vocabulary, or `top_k` of them, plus the per-token stats."""
    per_token = vocab * 4 if top_k is None else top_k * TOP_K_ENTRY_BYTES + TOP_K_TAIL_BYTES
    return blocks * (seq_len - 1) * (per_token + REFERENCE_STATS_BYTES)


@dataclass(frozen=True)
class MemoryRow:
    name: str
    bytes: int
    note: str


@dataclass(frozen=True)
class MemoryPlan:
    """One actor's memory by part, the device it shares, and the resulting actor count and speed."""

    model: str
    device: str
    dtype: str
    parameters: int
    weights_by_dtype: tuple[tuple[str, int], ...]
    rows: tuple[MemoryRow, ...]  # one actor
    driver_bytes: int  # the search driver's own model and bank, resident for the whole search
    device_memory_bytes: int
    num_workers: int
    num_devices: int
    heldout_blocks: int
    seq_len: int
    reference_top_k: int | None
    flops_per_evaluation: float
    bytes_per_evaluation: float
    speed: DeviceSpeed

    def row(self, name: str) -> MemoryRow:
        return next(r for r in self.rows if r.name == name)

    @property
    def actor_bytes(self) -> int:
        return sum(r.bytes for r in self.rows)

    @property
    def usable_bytes(self) -> int:
        return int(self.device_memory_bytes * USABLE_FRACTION)

    @property
    def actors_per_device(self) -> int:
        # Conservative: the driver's copy is counted against every device, so every device holds as many.
        return max(0, (self.usable_bytes - self.driver_bytes) // self.actor_bytes)

    @property
    def num_gpus_per_actor(self) -> float:
        """What `runner.num_gpus` each actor should ask Ray for (0 on CPU or when none fits)."""
        if not self.device.startswith("cuda") or self.actors_per_device == 0:
            return 0.0
        return math.floor(1e4 / self.actors_per_device) / 1e4  # Ray takes fractions to 4 decimals

    @property
    def seconds_per_evaluation(self) -> float:
        """One plan on a whole device: compute-bound matmuls plus memory-bound passes, not overlapped."""
        return (self.flops_per_evaluation / self.speed.flops_per_second
                + self.bytes_per_evaluation / self.speed.bytes_per_second)

    @property
    def evaluations_per_hour(self) -> float:
        """All devices together. Actors sharing one device share its throughput: more actors hide the
        driver's latency between plans, they add no FLOPs."""
        devices_used = min(self.num_devices, math.ceil(self.num_workers / max(self.actors_per_device, 1)))
        return 3600 * devices_used / self.seconds_per_evaluation

    def table(self) -> str:
        """The plan as a fixed-width text table."""
        kind = "exact" if self.reference_top_k is None else f"top-{self.reference_top_k}"
        by_dtype = ", ".join(f"{name} {size / GB:.2f} GB" for name, size in self.weights_by_dtype)
        lines = [f"memory plan: {self.model} on {self.device} ({self.dtype}), {self.parameters / 1e9:.3f}e9 "
                 f"parameters ({by_dtype}); held-out {self.heldout_blocks} x {self.seq_len} tokens, {kind} reference",
                 f"{'per actor':<24}{'GB':>9}  note"]
        lines += [f"{r.name:<24}{r.bytes / GB:>9.3f}  {r.note}" for r in self.rows]
        fits = self.actors_per_device * self.num_devices >= self.num_workers
        lines += [
            f"{'total per actor':<24}{self.actor_bytes / GB:>9.3f}",
            f"{'driver':<24}{self.driver_bytes / GB:>9.3f}  the search driver's model + bank + runtime, whole search",
            f"{'usable per device':<24}{self.usable_bytes / GB:>9.3f}  {USABLE_FRACTION:.0%} of "
            f"{self.device_memory_bytes / GB:.1f} GB",
            f"actors per device: {self.actors_per_device} (runner.num_gpus={self.num_gpus_per_actor:g} per actor); "
            f"runner.num_workers={self.num_workers} on {self.num_devices} device(s): "
            f"{'fits' if fits else 'does NOT fit'}",
            f"time: {self.flops_per_evaluation:.3g} FLOP + {self.bytes_per_evaluation / GB:.1f} GB moved per "
            f"evaluation on {self.speed.name} ({self.speed.note}): {self.seconds_per_evaluation:.3g} s each, "
            f"~{self.evaluations_per_hour:.3g} evaluations/hour",
        ]
        return "\n".join(lines)


def _activation_rows(config, model, itemsize: int, batch: int, tokens: int, linear: dict) -> list[MemoryRow]:
    """One held-out forward of `batch` blocks of `tokens` positions (use_cache=False), bounded from above."""
    attn = family_of(model).decoder_layers(model)[0].self_attn
    head_dim = attn.head_dim
    q_heads, kv_heads = attn.q_proj.out_features // head_dim, attn.k_proj.out_features // head_dim
    hidden, inner, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    # Inside one decoder layer, as if all were alive at once: residual, normed input, attention output and
    # layer output (4 x hidden), q/k/v, and the MLP's gate, up and product (3 x intermediate).
    per_token = 4 * hidden + (q_heads + 2 * kv_heads) * head_dim + 3 * inner
    # Attention scores materialised in full, fp32 softmax beside the compute-dtype scores: what the eager and
    # math sdpa paths do (fused flash kernels need far less). The `linear` option's chunked prefill keeps, per
    # query, scores over [previous chunk | chunk | sinks] (2W + sinks), older-chunk weights (W) and 2F features.
    keys = max(tokens, 3 * linear["window"] + linear["sinks"] + 2 * linear["feature_dim"])
    scores = batch * q_heads * tokens * keys * (itemsize + 4)
    # The logits at the compute dtype, plus metrics' fp32 chunk temporaries (z, exp / products, logsumexp).
    logits = batch * tokens * vocab * itemsize + 3 * batch * POSITIONS_PER_PASS * vocab * 4
    return [
        MemoryRow("activations", batch * tokens * per_token * itemsize,
                  f"{batch} blocks x {tokens} positions per forward, one decoder layer's tensors all alive"),
        MemoryRow("attention workspace", scores, f"{batch} x {q_heads} heads x {tokens} x {keys} scores, "
                  "materialised (upper bound; fused kernels use less)"),
        MemoryRow("logits", logits, f"{batch} x {tokens} x {vocab} at the compute dtype + fp32 chunks"),
    ]


def _flops_and_bytes(config, model, parameters: int, weight_bytes: int, itemsize: int, blocks: int,
                     batch: int, tokens: int, reference: int) -> tuple[float, float]:
    """(FLOPs, bytes moved) of one evaluation of the all-softmax plan, the dearest the search meets."""
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    # A lookup costs no FLOPs; the head does a matmul even when it shares the embedding's weights.
    matmul_params = parameters - embed.numel() + (head.numel() if head is embed else 0)
    attn = family_of(model).decoder_layers(model)[0].self_attn
    q_width = attn.q_proj.out_features
    # QK^T and PV under a causal mask: 2 matmuls x 2 FLOPs x T^2 / 2 pairs x q width, per layer and block.
    attention = blocks * config.num_hidden_layers * 2 * tokens * tokens * q_width
    flops = 2 * matmul_params * blocks * tokens + attention
    # Every forward batch reads the weights; the metrics read the reference and the logits, which are
    # written once at the compute dtype and read back as fp32 chunks.
    forwards = math.ceil(blocks / batch)
    moved = forwards * weight_bytes + reference + blocks * tokens * config.vocab_size * (itemsize + 4)
    return float(flops), float(moved)


def _fixed_rows(model, kind: str, dtype: torch.dtype, linear: dict) -> tuple[MemoryRow, ...]:
    """What an actor holds whatever the held-out data: weights, bank, runtime."""
    weights = sum(tensor_bytes([*model.parameters(), *model.buffers()]).values())
    parameters = sum(p.numel() for p in model.parameters())
    layers = len(family_of(model).decoder_layers(model))
    # On a GPU the bank's modules sit on the device and the Bank's state dicts (a second copy) in host RAM;
    # on a CPU both copies share the one memory.
    copies = 2 if kind == "cpu" else 1
    bank = bank_bytes_per_layer(model, linear) * layers * copies
    return (
        MemoryRow("weights", weights, f"{parameters / 1e9:.3f}e9 parameters at {dtype_name(dtype)}"),
        MemoryRow("bank (linear)", bank, f"{layers} layers x feature maps + gates"
                  + (", module + host copy" if copies == 2 else "")),
        MemoryRow("runtime", RUNTIME_OVERHEAD_BYTES[kind], "CUDA context + allocator slack" if kind == "cuda"
                  else "Python + torch + Ray worker"),
    )


def memory_plan(source, *, name: str | None = None, device: str = "cpu", dtype: str = "auto",
                heldout_blocks: int = 2, seq_len: int = 512, batch_size: int = 4,
                reference_top_k: int | None = None, linear: dict | None = None, num_workers: int = 2,
                num_devices: int = 1, device_memory_bytes: int | None = None,
                speed: DeviceSpeed | None = None) -> MemoryPlan:
    """The memory and time plan of a search over the model of `source` (see `load_config`).

    `device` is what the actors run on (it need not be this machine's: plan a GPU box from a laptop);
    `dtype` as in the config ("auto": see models.resolve_dtype). `heldout_blocks` x `seq_len` are the
    held-out proxy blocks, evaluated `batch_size` at a time (ProxyEvaluator's default 4); `reference_top_k`
    is proxy.reference_top_k (None: exact distributions, the conservative default; pass the run's setting).
    `linear` is the option's settings (default the project's). Memory defaults to this machine's device
    (`detect_device_memory`), speed to `measure_cpu_speed(dtype)` on cpu and `A100_80GB` on cuda.
    """
    if reference_top_k is not None and reference_top_k < 1:
        raise UserError(f"proxy.reference_top_k: {reference_top_k!r} must be a positive integer or null")
    where = resolve_device(device) if device == "auto" else torch.device(device)
    kind = "cuda" if where.type == "cuda" else "cpu"
    torch_dtype = resolve_dtype(dtype, where)
    linear = {**DEFAULT_LINEAR, **(linear or {})}
    config = load_config(source)
    model = meta_model(config, torch_dtype)
    weights, bank, runtime = _fixed_rows(model, kind, torch_dtype, linear)
    reference = reference_bytes(heldout_blocks, seq_len, config.vocab_size, reference_top_k)
    batch, tokens = min(batch_size, heldout_blocks), seq_len - 1  # the model sees ids[:, :-1]
    stored = "exact fp32 probabilities" if reference_top_k is None else f"top-{reference_top_k} (p, id) pairs"
    rows = (weights, bank,
            MemoryRow("reference", reference, f"{heldout_blocks} blocks x {tokens} targets, {stored} + stats"),
            *_activation_rows(config, model, torch_dtype.itemsize, batch, tokens, linear),
            MemoryRow("KV cache", 0, "none: the proxy runs with use_cache=False"),
            runtime)
    parameters = sum(p.numel() for p in model.parameters())
    flops, moved = _flops_and_bytes(config, model, parameters, weights.bytes, torch_dtype.itemsize,
                                    heldout_blocks, batch, tokens, reference)
    if device_memory_bytes is None:
        device_memory_bytes = detect_device_memory(str(where))
    return MemoryPlan(
        model=name or getattr(config, "_name_or_path", "") or config.model_type, device=str(where),
        dtype=dtype_name(torch_dtype), parameters=parameters,
        weights_by_dtype=tuple(sorted(tensor_bytes([*model.parameters(), *model.buffers()]).items())),
        rows=rows, driver_bytes=weights.bytes + bank.bytes + runtime.bytes, device_memory_bytes=device_memory_bytes,
        num_workers=num_workers, num_devices=num_devices, heldout_blocks=heldout_blocks, seq_len=seq_len,
        reference_top_k=reference_top_k, flops_per_evaluation=flops, bytes_per_evaluation=moved,
        speed=speed or (A100_80GB if kind == "cuda" else measure_cpu_speed(torch_dtype)))


def _refuse_whole_model(plan: MemoryPlan, fixed: int) -> None:
    """Weights, bank and runtime of one actor beside the driver's copy do not fit: dtype or device."""
    setting, advice = (("dtype", "use dtype=bfloat16 or a larger device") if plan.dtype == "float32"
                       else ("device", "use a device with more memory"))
    raise UserError(f"{setting}: {plan.model} at {plan.dtype} needs {_gb(fixed)} per actor plus the driver's "
                    f"{_gb(plan.driver_bytes)}, more than the {_gb(plan.usable_bytes)} usable on {plan.device}; "
                    f"{advice}")


def _refuse_one_actor(plan: MemoryPlan, fixed: int) -> None:
    """The weights fit but one actor does not: blame the larger of the reference and the forward."""
    reference = plan.row("reference").bytes
    forward = sum(plan.row(n).bytes for n in ("activations", "attention workspace", "logits"))
    room = f"only {_gb(plan.usable_bytes - plan.driver_bytes - fixed)} is left after the weights"
    blocks = f"{plan.heldout_blocks} blocks x {plan.seq_len} tokens"
    if reference < forward:
        raise UserError(f"data.seq_len: {blocks} need {_gb(forward)} of activations per forward, {room}; "
                        f"use a shorter data.seq_len")
    if plan.reference_top_k is None:
        kind, advice = "exact", "set proxy.reference_top_k or fewer blocks"
    else:
        kind, advice = f"top-{plan.reference_top_k}", "use a smaller proxy.reference_top_k or fewer blocks"
    raise UserError(f"data.blocks.heldout: {blocks} need a {_gb(reference)} reference per actor ({kind}), "
                    f"{room}; {advice}")


def check_fits(plan: MemoryPlan) -> None:
    """Raise UserError, one line naming the setting to change, when the plan's actors cannot fit."""
    fixed = sum(plan.row(n).bytes for n in ("weights", "bank (linear)", "runtime"))
    if plan.driver_bytes + fixed > plan.usable_bytes:
        _refuse_whole_model(plan, fixed)
    if plan.actors_per_device == 0:
        _refuse_one_actor(plan, fixed)
    capacity = plan.actors_per_device * plan.num_devices
    if plan.num_workers > capacity:
        gpus = f" and runner.num_gpus={plan.num_gpus_per_actor:g}" if plan.device.startswith("cuda") else ""
        raise UserError(f"runner.num_workers: {plan.num_workers} actors of {_gb(plan.actor_bytes)} each do not fit "
                        f"{plan.num_devices} x {_gb(plan.usable_bytes)} usable on {plan.device} beside the driver; "
                        f"set runner.num_workers={capacity}{gpus}")
