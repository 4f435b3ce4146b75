"""Healing: distil a plan from the original model, so the hybrid wins back quality, and save it as a folder.

Teacher: the unpatched model (the all-softmax plan applied in place; LoRA adapters, if any, switched off).
Student: the same model with the plan applied. Loss: KL(teacher || student) of next-token distributions on
train blocks. Trained: the learned parts (feature maps, gates) of the plan's `linear` layers and, optionally,
LoRA adapters (peft) on chosen projections, merged into the base weights before saving.

Resumable and exact: every `checkpoint_every` tokens the trainable tensors, optimiser state, step, RNG state
and the curve so far are written atomically; the batch order and the learning rate are pure functions of
(seed, step), so a resumed run takes exactly the steps an uninterrupted one would.
"""
from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .cache_dir import atomic_path, content_hash
from .errors import UserError
from .metrics import ProxyEvaluator
from .patch import PlanSwitcher
from .plan import LayerPlan

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "layerboost.heal-checkpoint/v1"


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapters (peft) on the modules named in `modules` (matched by name suffix, e.g. q_proj)."""

    enabled: bool = True  # merged into the saved weights (False: only the `linear` parts are trained)
    r: int = 8
    alpha: int = 16
    modules: tuple[str, ...] = ("q_proj", "v_proj", "o_proj")
    # Peak learning rate of the adapters (heal.lr is that of the feature maps and gates); 1e-3 closed a third of
    # the KL gap in the default budget (RESULTS.md, healing).
    lr: float = 1e-3


@dataclass(frozen=True)
class HealSettings:
    """How a plan is healed. Every field goes into the run key (a checkpoint of other settings is not resumed)."""

    tokens: int = 65536  # training tokens in all (steps = ceil(tokens / (batch_size * seq_len)))
    lr: float = 3e-3  # peak learning rate of the `linear` feature maps and gates (warm-up, then cosine)
    batch_size: int = 1  # blocks per step
    seq_len: int | None = None  # train blocks are cut to this length (<= data.seq_len); None: the blocks' own
    eval_every: int = 8192  # tokens between held-out evaluations (the KL-vs-tokens curve)
    checkpoint_every: int = 8192  # tokens between checkpoints
    seed: int = 0
    grad_clip: float = 1.0
    lora: LoraSettings = field(default_factory=LoraSettings)

    def __post_init__(self):
        for name in ("tokens", "batch_size", "eval_every", "checkpoint_every"):
            value = getattr(self, name)
            if int(value) != value or value < 1:
                raise UserError(f"heal.{name}: {value!r} must be a positive integer")
        if self.seq_len is not None and self.seq_len < 2:
            raise UserError(f"heal.seq_len: {self.seq_len} is too short; allowed: >= 2")
        if not self.lr > 0:
            raise UserError(f"heal.lr: {self.lr!r} must be > 0")
        if self.lora.enabled and (self.lora.r < 1 or not self.lora.modules or not self.lora.lr > 0):
            raise UserError(f"heal.lora: r={self.lora.r}, modules={list(self.lora.modules)}, lr={self.lora.lr}; "
                            "allowed: r >= 1, at least one module name (e.g. q_proj), lr > 0")

    def for_blocks(self, length: int) -> "HealSettings":
        """These settings with `seq_len` None made the train blocks' own `length` (the workload's prefill by
        default: plans are healed at the context they serve); a longer `seq_len` is refused."""
        if self.seq_len is None:
            return replace(self, seq_len=length)
        if self.seq_len > length:
            raise UserError(f"heal.seq_len: {self.seq_len} is longer than the data blocks; allowed: <= data.seq_len "
                            f"({length})")
        return self

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def steps(self) -> int:
        return math.ceil(self.tokens / self.tokens_per_step)


@dataclass
class HealResult:
    """What a heal produced: metrics before and after, the KL-vs-tokens curve, timing."""

    plan: LayerPlan
    before: dict
    after: dict
    curve: list[dict]  # {"step", "tokens", metric...}, first at 0 tokens, last at the end
    losses: list[float]  # training KL per step
    steps: int
    tokens: int
    train_seconds: float  # optimiser steps only (held-out evaluations excluded), all sessions together
    resumed_from_step: int = 0
    lora_merged: bool = False

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.train_seconds if self.train_seconds > 0 else float("nan")


def lr_at(step: int, total: int, peak: float) -> float:
    """Learning rate of optimiser step `step` (0-based): linear warm-up, then cosine down to 10% of peak."""
    warmup = min(20, max(total // 10, 1))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


@lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, available: int) -> torch.Tensor:
    return torch.randperm(available, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def batch_indices(step: int, batch_size: int, available: int, seed: int) -> torch.Tensor:
    """Rows of the train blocks used at `step`: a fresh permutation per epoch, a function of (seed, step) only."""
    rows = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, available)
        rows.append(int(_epoch_order(seed, epoch, available)[offset]))
    return torch.tensor(rows)


def reblock(blocks: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(N, L) token blocks cut into (N * (L // seq_len), seq_len) blocks (each block's tail is dropped)."""
    n, length = blocks.shape
    per_block = length // seq_len
    if per_block < 1:
        raise UserError(f"heal.seq_len: {seq_len} is longer than the data blocks ({length} tokens)")
    return blocks[:, : per_block * seq_len].reshape(n * per_block, seq_len)


def kl_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) of next-token distributions; logits (B, S, V)."""
    log_p = torch.log_softmax(teacher_logits.float(), dim=-1)
    log_q = torch.log_softmax(student_logits.float(), dim=-1)
    tokens = log_p.shape[0] * log_p.shape[1]
    return F.kl_div(log_q, log_p, reduction="sum", log_target=True) / tokens


class _Adapters:
    """LoRA adapters injected with peft into the model as it runs the plan; `off()` gives back the teacher."""

    def __init__(self, model, settings: LoraSettings, seed: int):
        from peft import LoraConfig, get_peft_model
        from peft.tuners.tuners_utils import BaseTunerLayer

        config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=0.0, bias="none",
                            target_modules=list(settings.modules))
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # peft calls a transformers API deprecated for v6
            torch.manual_seed(seed)  # peft draws lora_A from the global RNG: the same start in every process
            try:
                self.peft_model = get_peft_model(model, config)
            except ValueError as error:
                raise UserError(f"heal.lora.modules: {list(settings.modules)} ({str(error).splitlines()[0]})") from None
        # Collected now: the wrappers inside modules that the plan swaps out of the tree stay reachable.
        self.layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]

    def named_parameters(self, model) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in model.named_parameters() if "lora_" in name}

    def set_enabled(self, enabled: bool) -> None:
        for layer in self.layers:
            layer.enable_adapters(enabled)

    def merge(self):
        """Fold the adapters into the base weights (shared with the plan's modules) and remove the wrappers."""
        return self.peft_model.merge_and_unload()


def run_key(settings: HealSettings, plan: LayerPlan, *context) -> str:
    """What a checkpoint or a finished folder was made from: settings, plan and the caller's context."""
    return content_hash(CHECKPOINT_FORMAT, asdict(settings), str(plan), *context)


def heal_plan(switcher: PlanSwitcher, plan: LayerPlan, train_blocks: torch.Tensor, proxy: ProxyEvaluator,
              settings: HealSettings, checkpoint: Path | None = None, key: str = "", progress: bool = False,
              on_step: Callable[[int], None] | None = None) -> HealResult:
    """Distil `plan` from the unpatched model on `train_blocks`; the model is left running the healed plan.

    `proxy` must have been built on the unpatched model (it holds the teacher's held-out distributions).
    With `checkpoint`, progress is saved there every `settings.checkpoint_every` tokens and a checkpoint
    carrying the same `key` is resumed. `on_step(step)` is called after each optimiser step (tests stop a
    run from it). With LoRA enabled the adapters are merged into the base weights before returning.
    """
    model = switcher.model
    plan.check_layers(switcher.num_layers)
    settings = settings.for_blocks(train_blocks.shape[1])
    linear_layers = [i for i, option in enumerate(plan.layers) if option == "linear"]
    if not linear_layers and not settings.lora.enabled:
        raise UserError(f"plan: {plan} has no `linear` layer and heal.lora.enabled is false: nothing to train; "
                        "allowed: a plan with `linear` layers, or heal.lora.enabled=true")
    blocks = reblock(train_blocks, settings.seq_len)
    if blocks.shape[0] < 1:
        raise UserError("data: the train split has no blocks to heal on")
    device = model.get_input_embeddings().weight.device
    switcher.apply(plan)  # builds the plan's modules before any adapter is injected around them
    adapters = _Adapters(model, settings.lora, settings.seed) if settings.lora.enabled else None
    linear_params = {f"linear.{i}.{name}": p for i in linear_layers
                     for name, p in switcher.module(i, "linear").learned.named_parameters()}
    lora_params = adapters.named_parameters(model) if adapters is not None else {}
    trainables = {**linear_params, **lora_params}
    for p in trainables.values():
        p.requires_grad_(True)
    groups = [{"params": list(params.values()), "peak_lr": peak}
              for params, peak in ((linear_params, settings.lr), (lora_params, settings.lora.lr)) if params]
    optimiser = torch.optim.Adam(groups, lr=settings.lr)
    state = _read_checkpoint(checkpoint, key) if checkpoint is not None else None
    step, curve, losses, train_seconds = 0, [], [], 0.0
    if state is not None:
        with torch.no_grad():
            for name, p in trainables.items():
                p.copy_(state["params"][name])
        optimiser.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        step, curve, losses, train_seconds = state["step"], state["curve"], state["losses"], state["train_seconds"]
        log.info("heal: resuming from step %d of %d (%s)", step, settings.steps, checkpoint)
    resumed_from = step
    if not curve:
        curve.append({"step": 0, "tokens": 0, **proxy.evaluate()})
    total = settings.steps
    per_step = settings.tokens_per_step
    bar = tqdm(range(step, total), initial=step, total=total, desc=f"heal {plan}", unit="step", disable=not progress)
    try:
        for step in bar:
            ids = blocks[batch_indices(step, settings.batch_size, blocks.shape[0], settings.seed)].to(device)
            for group in optimiser.param_groups:
                group["lr"] = lr_at(step, total, group["peak_lr"])
            started = time.perf_counter()
            loss = _distillation_step(switcher, plan, adapters, ids)
            loss.backward()
            if settings.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(list(trainables.values()), settings.grad_clip)
            optimiser.step()
            optimiser.zero_grad(set_to_none=True)
            train_seconds += time.perf_counter() - started
            losses.append(loss.item())
            done = step + 1
            tokens = done * per_step
            if _crossed(tokens, per_step, settings.eval_every) or done == total:
                curve.append({"step": done, "tokens": tokens, **proxy.evaluate()})
                bar.set_postfix(heldout_kl=f"{curve[-1]['kl']:.4f}")
            if checkpoint is not None and _crossed(tokens, per_step, settings.checkpoint_every) and done < total:
                _write_checkpoint(checkpoint, key, done, trainables, optimiser, curve, losses, train_seconds)
            if on_step is not None:
                on_step(done)
    finally:
        bar.close()
        for p in trainables.values():
            p.requires_grad_(False)
    merged = False
    if adapters is not None:
        switcher.apply(plan)  # merge walks the modules in the tree: those of the plan
        adapters.merge()
        merged = True
    return HealResult(plan=plan, before=_metrics(curve[0]), after=_metrics(curve[-1]), curve=curve, losses=losses,
                      steps=total, tokens=total * per_step, train_seconds=train_seconds,
                      resumed_from_step=resumed_from, lora_merged=merged)


def _distillation_step(switcher: PlanSwitcher, plan: LayerPlan, adapters: _Adapters | None,
                       ids: torch.Tensor) -> torch.Tensor:
    """The KL of the student (plan) to the teacher (unpatched, adapters off) on `ids` (B, S), with grad."""
    model = switcher.model
    switcher.restore()
    if adapters is not None:
        adapters.set_enabled(False)
    try:
        with torch.no_grad():
            teacher = model(input_ids=ids, use_cache=False).logits  # (B, S, V)
    finally:
        if adapters is not None:
            adapters.set_enabled(True)
        switcher.apply(plan)
    student = model(input_ids=ids, use_cache=False).logits  # (B, S, V)
    return kl_loss(teacher, student)


def _crossed(tokens: int, per_step: int, every: int) -> bool:
    """True when the step that ended at `tokens` crossed a multiple of `every`."""
    return tokens // every > (tokens - per_step) // every


def _metrics(point: dict) -> dict:
    return {k: v for k, v in point.items() if k not in ("step", "tokens")}


def _write_checkpoint(path: Path, key: str, step: int, trainables: dict, optimiser, curve, losses,
                      train_seconds: float) -> None:
    data = {"format": CHECKPOINT_FORMAT, "key": key, "step": step,
            "params": {name: p.detach().cpu().clone() for name, p in trainables.items()},
            "optimizer": optimiser.state_dict(), "rng": torch.get_rng_state(), "curve": curve, "losses": losses,
            "train_seconds": train_seconds}
    with atomic_path(path) as tmp:
        torch.save(data, tmp)


def _read_checkpoint(path: Path, key: str) -> dict | None:
    """The checkpoint at `path` if it was made by the same run (same key); otherwise None (start afresh)."""
    if not Path(path).exists():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a foreign or damaged file: start afresh rather than crash
        log.warning("heal: checkpoint %s is unreadable (%s); starting afresh", path, type(error).__name__)
        return None
    if data.get("format") != CHECKPOINT_FORMAT or data.get("key") != key:
        log.warning("heal: checkpoint %s was made with other settings; starting afresh", path)
        return None
    return data


def format_before_after(result: HealResult) -> str:
    """The before/after table of held-out metrics, plus the KL gap closed."""
    lines = [f"{'metric':16s} {'before':>10s} {'after':>10s} {'change':>9s}"]
    for name, before in result.before.items():
        after = result.after[name]
        change = f"{(after - before) / abs(before) * 100:+8.1f}%" if before else "        -"
        lines.append(f"{name:16s} {before:10.4f} {after:10.4f} {change}")
    closed = 1 - result.after["kl"] / result.before["kl"] if result.before["kl"] > 0 else float("nan")
    lines.append(f"KL gap to the original closed: {closed * 100:.1f}% ({result.tokens} tokens, "
                 f"{result.tokens_per_second:.0f} tok/s in training steps)")
    return "\n".join(lines)


def format_curve(curve: list[dict]) -> str:
    """The held-out KL (and top-1 agreement) against training tokens, one line per evaluation."""
    lines = [f"{'tokens':>9s} {'step':>6s} {'kl':>9s} {'top1':>7s}"]
    lines += [f"{p['tokens']:9d} {p['step']:6d} {p['kl']:9.4f} {p.get('top1_agreement', float('nan')):7.3f}"
              for p in curve]
    return "\n".join(lines)


def heal_to_folder(bench, plan: LayerPlan, settings: HealSettings, out: Path, source: str = "",
                   on_step=None) -> tuple[Path, HealResult | None]:
    """Heal `plan` on the open workbench `bench`, write the hybrid folder `out`, print the before/after table.

    Trains the bank first when the workbench has none and the plan needs it. Returns the folder and the
    result (None when the folder for the same run existed already). `source` is recorded as the plan's origin.
    """
    from .hybrid_folder import read_manifest, save_hybrid
    from .workbench import attach_bank, bank_id_or_none, needs_bank

    if bench.bank is None and needs_bank(plan.layers):
        attach_bank(bench)
    settings = settings.for_blocks(bench.splits.train.shape[1])
    options = bench.settings.options
    bank_id = bank_id_or_none(bench)
    key = run_key(settings, plan, bench.info["fingerprint"], bank_id, options,
                  bench.splits.hashes["train"], bench.splits.hashes["heldout"])
    existing = read_manifest(out)
    if existing is not None and existing.get("heal_key") == key:
        print(f"already healed with these settings: {out} (delete it to heal again)")
        return out, None
    checkpoint = out.parent / f".{out.name}.heal-checkpoint.pt"
    bench.switcher.restore()
    proxy = bench.proxy_evaluator()  # the teacher's held-out distributions
    started = time.perf_counter()
    result = heal_plan(bench.switcher, plan, bench.splits.train, proxy, settings, checkpoint, key,
                       progress=bench.settings.progress, on_step=on_step)
    wall = time.perf_counter() - started
    metrics = {"before": result.before, "after": result.after, "curve": result.curve,
               "train_kl_per_step": result.losses, "tokens": result.tokens, "steps": result.steps,
               "train_seconds": result.train_seconds, "tokens_per_second": result.tokens_per_second,
               "wall_seconds_this_session": wall, "resumed_from_step": result.resumed_from_step,
               "heal_settings": asdict(settings), "fidelity": "proxy",
               "heldout": {"blocks": int(bench.splits.heldout.shape[0]), "seq_len": int(bench.splits.heldout.shape[1]),
                           "hash": bench.splits.hashes["heldout"]}}
    plan_metrics = {name: {"value": value, "fidelity": "proxy", "before_heal": result.before[name]}
                    for name, value in result.after.items()}
    context = {"model": bench.info, "settings": options, "bank_id": bank_id, "metrics": plan_metrics,
               "made_with": bench.settings.record(),
               "origin": {"healed_by": "layerboost heal", "source": source or str(plan),
                          "heal": asdict(settings), "train_data_hash": bench.splits.hashes["train"]}}
    save_hybrid(out, bench.switcher, plan, bench.loaded.tokenizer, context, metrics, heal_key=key)
    checkpoint.unlink(missing_ok=True)
    print(f"healed plan {plan} (id {plan.id}) of {bench.info['name']}: {result.steps} steps x "
          f"{settings.tokens_per_step} tokens, {wall:.0f} s")
    print(format_curve(result.curve))
    print(format_before_after(result))
    print(f"hybrid model written to {out}  (load it with layerboost_core.load_hybrid({str(out)!r}))")
    return out, result
