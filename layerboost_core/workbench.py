"""What every verb starts from: the loaded model, its data splits, the plan switcher and the bank."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from .data import DataSplits, make_splits
from .models import LoadedModel, load_model
from .patch import PlanSwitcher
from .transfer import Bank, TransferSettings, load_or_build_bank

log = logging.getLogger(__name__)


@dataclass
class Workbench:
    cfg: DictConfig
    loaded: LoadedModel
    splits: DataSplits
    switcher: PlanSwitcher
    bank: Bank | None

    @property
    def model(self):
        return self.loaded.model

    @property
    def info(self) -> dict:
        return self.loaded.info


def option_settings(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg.attention, resolve=True)


def transfer_settings(cfg: DictConfig) -> TransferSettings:
    t = cfg.transfer
    return TransferSettings(batches=int(t.batches), batch_size=int(t.batch_size),
                            steps_per_batch=int(t.steps_per_batch), lr=float(t.lr), seed=int(t.seed))


def open_workbench(cfg: DictConfig, with_bank: bool = True) -> Workbench:
    """Load model and data from the config; with `with_bank`, load the cached bank or train it now."""
    loaded = load_model(cfg.model.name, cfg.model.source, cfg.device, cfg.dtype, cfg.model.get("fallback_source"))
    d = cfg.data
    splits = make_splits(loaded.tokenizer, d.source, int(d.seq_len), OmegaConf.to_container(d.fractions),
                         OmegaConf.to_container(d.blocks), d.text_field)
    bench = Workbench(cfg, loaded, splits, PlanSwitcher(loaded.model, option_settings(cfg)), None)
    return attach_bank(bench) if with_bank else bench


def attach_bank(bench: Workbench) -> Workbench:
    """Load the cached bank into the workbench's switcher, or train it now."""
    cfg = bench.cfg
    bench.bank = load_or_build_bank(bench.switcher, bench.info, bench.splits, option_settings(cfg),
                                    transfer_settings(cfg), progress=bool(cfg.progress),
                                    rebuild=bool(cfg.transfer.rebuild))
    return bench
