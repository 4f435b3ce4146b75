"""Attention transfer: train every layer's `linear` replacement to reproduce its own softmax attention
output on the teacher's hidden states, and store the result as the bank.

One teacher pass per batch captures every layer's attention input and output (hooks on the original
modules); each layer's replacement then takes `steps_per_batch` optimiser steps on that layer's own pair.
Layers are independent (inputs come from the teacher, not from other students), so this is LoLCATs'
stage-1 "attention transfer", done for all layers at once.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .attention import OPTIONS
from .cache_dir import atomic_path, cache_root, content_hash
from .patch import PlanSwitcher

log = logging.getLogger(__name__)

BANK_FORMAT = "layerboost.bank/v1"


@dataclass(frozen=True)
class TransferSettings:
    """How the bank is trained. Every field goes into the bank's cache key."""

    batches: int = 24  # teacher passes
    batch_size: int = 1  # token blocks per teacher pass, each data.seq_len tokens (default: the workload's prompt length)
    # Optimiser steps per layer on each captured batch; the steps, not the teacher passes, are what training
    # costs (SmolLM2, 2 cores: ~0.25 s a step in bf16 with AMX, ~0.8 s in fp32 without). At the default
    # workload, on 4 plans at 0.33-0.4x the cache, 8 steps found 3-7 more of 128 facts than 4 steps; twice the
    # passes at 4 steps found fewer (benchmarks/results/bank_training_bf16_*.json).
    steps_per_batch: int = 8
    lr: float = 1e-2
    seed: int = 0


@dataclass
class Bank:
    """Trained parts of every trainable option, per layer, plus what they were made from."""

    parts: dict[str, list[dict[str, torch.Tensor]]]
    meta: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.meta["bank_id"]


def bank_id(model_info: dict, data_hash: str, option_settings: dict, transfer: TransferSettings) -> str:
    trainable = {name: option_settings.get(name, {}) for name in OPTIONS if OPTIONS.get(name).trainable}
    return content_hash(BANK_FORMAT, model_info["fingerprint"], model_info["num_layers"], data_hash, trainable,
                        asdict(transfer))


def bank_path(model_name: str, key: str) -> Path:
    return cache_root() / "banks" / f"{model_name.replace('/', '--')}-{key}.pt"


class AttentionCapture:
    """Hooks on the original attention modules: each forward records every layer's (input, output)."""

    def __init__(self, switcher: PlanSwitcher):
        self.inputs: list[torch.Tensor | None] = [None] * switcher.num_layers
        self.outputs: list[torch.Tensor | None] = [None] * switcher.num_layers
        # Per layer: families such as Gemma 3 hand local and global layers different RoPE tables.
        self.position_embeddings: list = [None] * switcher.num_layers
        self._handles = []
        for index, attn in enumerate(switcher.original):
            self._handles.append(attn.register_forward_pre_hook(self._pre(index), with_kwargs=True))
            self._handles.append(attn.register_forward_hook(self._post(index)))

    def _pre(self, index):
        def hook(module, args, kwargs):
            self.inputs[index] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            self.position_embeddings[index] = kwargs.get("position_embeddings")
        return hook

    def _post(self, index):
        def hook(module, args, output):
            self.outputs[index] = output[0]
        return hook

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def teacher_pass(switcher: PlanSwitcher, ids: torch.Tensor) -> AttentionCapture:
    """Run the unpatched model (no LM head) on `ids`, capturing every layer's attention input and output."""
    switcher.restore()
    capture = AttentionCapture(switcher)
    try:
        with torch.no_grad():
            switcher.model.model(input_ids=ids, use_cache=False)
    finally:
        capture.close()
    return capture


def _relative_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (prediction - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-12)


def frozen_qkv(module, hidden: torch.Tensor, position_embeddings):
    """q, k, v of a replacement module on teacher inputs; the projections are frozen, so no grad."""
    with torch.no_grad():
        return module.project_qkv(hidden, position_embeddings)


def replacement_output(module, qkv) -> torch.Tensor:
    """The replacement's attention output (after o_proj) from precomputed q, k, v."""
    q = qkv[0]
    y = module.attend(*qkv)
    return module.o_proj(y.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1))


def train_bank(switcher: PlanSwitcher, train_blocks: torch.Tensor, settings: TransferSettings,
               option: str = "linear", progress: bool = True) -> tuple[list[dict], dict]:
    """Train `option`'s parts of every layer. Returns per-layer state dicts and a training log."""
    torch.manual_seed(settings.seed)
    modules = [switcher.module(i, option) for i in range(switcher.num_layers)]
    params = [p for m in modules for p in m.learned.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimiser = torch.optim.Adam(params, lr=settings.lr)
    total_steps = settings.batches * settings.steps_per_batch
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=max(total_steps, 1))
    available = train_blocks.shape[0]
    if available < settings.batch_size:
        raise ValueError(f"transfer needs at least {settings.batch_size} training blocks, data has {available}")
    order = torch.randperm(available, generator=torch.Generator().manual_seed(settings.seed))
    device = switcher.model.get_input_embeddings().weight.device
    losses: list[float] = []
    started = time.perf_counter()
    bar = tqdm(range(settings.batches), desc=f"attention transfer ({option})", disable=not progress, unit="batch")
    try:
        for batch_index in bar:
            picks = order[[(batch_index * settings.batch_size + j) % available for j in range(settings.batch_size)]]
            capture = teacher_pass(switcher, train_blocks[picks].to(device))
            qkv = [frozen_qkv(m, capture.inputs[i], capture.position_embeddings[i]) for i, m in enumerate(modules)]
            for _ in range(settings.steps_per_batch):
                optimiser.zero_grad(set_to_none=True)
                loss_sum = 0.0
                for index, module in enumerate(modules):
                    # Each layer's loss only reaches its own parameters: backward layer by layer keeps memory flat.
                    loss = _relative_mse(replacement_output(module, qkv[index]), capture.outputs[index])
                    loss.backward()
                    loss_sum += loss.item()
                optimiser.step()
                schedule.step()
                losses.append(loss_sum / len(modules))
            bar.set_postfix(rel_mse=f"{losses[-1]:.4f}")
    finally:
        for p in params:
            p.requires_grad_(False)
    log_data = {"mean_relative_mse_per_step": losses, "seconds": time.perf_counter() - started}
    return [{k: v.detach().cpu().clone() for k, v in m.learned.state_dict().items()} for m in modules], log_data


def save_bank(bank: Bank, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save({"format": BANK_FORMAT, "meta": bank.meta, "parts": bank.parts}, tmp)


def read_bank(path: Path, expected_id: str) -> Bank | None:
    """The bank at `path`, or None when missing, unreadable or made from something else (then rebuild)."""
    if not path.exists():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        if data.get("format") != BANK_FORMAT or data["meta"].get("bank_id") != expected_id:
            raise ValueError("format or id mismatch")
        return Bank(parts=data["parts"], meta=data["meta"])
    except Exception as error:  # a truncated or foreign file: rebuild rather than crash
        log.warning("bank %s is unreadable (%s: %s); rebuilding it", path, type(error).__name__, error)
        return None


def load_or_build_bank(switcher: PlanSwitcher, model_info: dict, splits, option_settings: dict,
                       transfer: TransferSettings, progress: bool = True, rebuild: bool = False) -> Bank:
    """The bank for this model, data and settings: from the cache if present and sound, else trained now."""
    key = bank_id(model_info, splits.hashes["train"], option_settings, transfer)
    path = bank_path(model_info["name"], key)
    bank = None if rebuild else read_bank(path, key)
    if bank is None:
        log.info("training the bank %s (%d layers)", key, switcher.num_layers)
        parts, training_log = {}, {}
        for name in OPTIONS:
            if OPTIONS.get(name).trainable:
                parts[name], training_log[name] = train_bank(switcher, splits.train, transfer, name, progress)
        meta = {"bank_id": key, "model": model_info, "data_hash": splits.hashes["train"], "option_settings": option_settings,
                "transfer": asdict(transfer), "training": training_log, "torch": str(torch.__version__)}
        bank = Bank(parts=parts, meta=meta)
        save_bank(bank, path)
    switcher.load_bank(bank)
    bank.meta["path"] = str(path)
    return bank


def transfer_errors(switcher: PlanSwitcher, blocks: torch.Tensor, option: str = "linear",
                    batch_size: int = 4) -> list[float]:
    """Per layer, relative MSE of `option`'s attention output against softmax's on `blocks` (teacher inputs)."""
    device = switcher.model.get_input_embeddings().weight.device
    sums = [0.0] * switcher.num_layers
    batches = 0
    for start in range(0, blocks.shape[0], batch_size):
        capture = teacher_pass(switcher, blocks[start:start + batch_size].to(device))
        with torch.no_grad():
            for index in range(switcher.num_layers):
                module = switcher.module(index, option)
                out = replacement_output(module, frozen_qkv(module, capture.inputs[index],
                                                            capture.position_embeddings[index]))
                sums[index] += _relative_mse(out, capture.outputs[index]).item()
        batches += 1
    return [s / batches for s in sums]
