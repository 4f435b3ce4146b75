"""What every verb starts from: the loaded model, its data splits, the plan switcher and (when a plan needs
it) the bank. Settings come in as typed values; reading a config file is the application's job."""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, replace

from .attention import OPTIONS, bank_option
from .data import DataSplits, make_splits
from .errors import UserError
from .facts import MAX_FACTS
from .metrics import DEFAULT_TOP_K
from .models import LoadedModel, load_model
from .patch import PlanSwitcher
from .transfer import Bank, TransferSettings, load_or_build_bank
from .workload import Workload

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSettings:
    """Which model, from where, on which device and dtype (`auto`: cuda + bfloat16 when present)."""

    name: str = "smollm2-135m"
    source: str = "builtin:smollm2-135m"  # builtin:<name>, a hub id (org/name) or a local folder
    fallback_source: str | None = "HuggingFaceTB/SmolLM2-135M-Instruct"  # tried when the built-in package is missing
    device: str = "auto"  # auto | cpu | cuda | cuda:N   (auto: cuda when present)
    # auto | float32 | bfloat16 | float16. auto: bfloat16 on cuda and on CPUs with bf16 instructions
    # (avx512_bf16 / amx_bf16: ~2x faster there, same ranking of plans), float32 elsewhere.
    dtype: str = "auto"


@dataclass(frozen=True)
class DataSettings:
    """Text source and split sizes (see data.make_splits). Lengths left None are the workload's prefill, decided
    in `WorkbenchSettings` (quality is measured, and the bank trained, at the context latency is priced for)."""

    # builtin | builtin:<news|wiki|pydoc>[,...] | builtin:-<one of them> | text:<file> | jsonl:<file> | hf:<dataset>[:<config>]
    source: str = "builtin"
    text_field: str = "text"  # field of jsonl / hf records
    # Tokens per calibration/train block (the bank's attention transfer, healing); None: workload.prefill.
    seq_len: int | None = None
    fractions: dict = field(default_factory=lambda: {"calibration": 0.1, "train": 0.6, "heldout": 0.3})
    # Cap per split (None: all). Held-out blocks are the proxy's, at the workload's prompt length: two 512-token
    # blocks hold 16 planted facts, the fewest that tell a plan losing retrieval from one keeping it often enough
    # to steer the search (one block's 8 let most through to fail at the confirmation rung); more on a GPU.
    blocks: dict = field(default_factory=lambda: {"calibration": 8, "train": None, "heldout": 2})
    heldout_seq_len: int | None = None  # tokens per held-out block; None: workload.prefill
    mix_sources: bool = True  # held-out blocks drawn across every source of the whole split, not its first documents


@dataclass(frozen=True)
class ProxySettings:
    """How plans are scored against the original model (see metrics.ProxyEvaluator)."""

    # The original's top-k probabilities per position plus the rest (None: exact, B x S x V floats: 16.8 GB at
    # 16 x 2,048 tokens of Llama-3); KL is then a lower bound of the exact one, 2% short on SmolLM2 at k=1024.
    reference_top_k: int | None = DEFAULT_TOP_K
    # Facts planted in each held-out block and queried together at its end (facts.py): retrieval scored from
    # the same forward as the KL, which skips their tokens. 16 per 2,048-token block costs no extra forward and
    # separates plans (the original finds ~47 of 48, all-`linear` none); 0: no retrieval metrics; null: one per
    # 64 tokens of the held-out blocks, at most 16 (facts.facts_for), decided in WorkbenchSettings.
    facts: int | None = None
    fact_seed: int = 0
    batch_size: int = 4

    def __post_init__(self):
        if self.reference_top_k is not None and self.reference_top_k < 1:
            raise UserError(f"proxy.reference_top_k: {self.reference_top_k}; allowed: an integer >= 1, or null (exact)")
        if self.facts is not None and not 0 <= self.facts <= MAX_FACTS:
            raise UserError(f"proxy.facts: {self.facts}; allowed: 0 to {MAX_FACTS} facts per block")
        if self.batch_size < 1:
            raise UserError(f"proxy.batch_size: {self.batch_size}; allowed: an integer >= 1")


def default_option_settings() -> dict:
    """Option name -> its default settings (window, feature_dim, ...), as each option declares them."""
    return {name: dict(OPTIONS.get(name).defaults) for name in OPTIONS if OPTIONS.get(name).defaults}


@dataclass(frozen=True)
class WorkbenchSettings:
    """Everything needed to open a workbench; plain values, so it pickles to Ray workers.

    The workload is here because quality is measured where latency is priced: data lengths left None become
    `workload.prefill` in `__post_init__`, the one place that derived value is decided."""

    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    workload: Workload = field(default_factory=Workload)
    options: dict = field(default_factory=default_option_settings)  # option name -> its settings
    proxy: ProxySettings = field(default_factory=ProxySettings)
    transfer: TransferSettings = field(default_factory=TransferSettings)
    rebuild_bank: bool = False  # True: retrain the bank even when a cached one exists
    progress: bool = True  # progress bars on long work

    def __post_init__(self):
        data, prefill = self.data, self.workload.prefill
        if data.seq_len is None or data.heldout_seq_len is None:
            object.__setattr__(self, "data", replace(data, seq_len=data.seq_len or prefill,
                                                     heldout_seq_len=data.heldout_seq_len or prefill))
        if self.proxy.facts is None:
            from .facts import facts_for

            object.__setattr__(self, "proxy", replace(self.proxy, facts=facts_for(self.data.heldout_seq_len)))

    def record(self) -> dict:
        """What a plan's numbers were made with, as config sections (plan JSON `made_with`): the model (not its
        device or dtype: where it runs), data, workload, option settings (`attention`), proxy and transfer
        settings. `export|heal|bench|eval plan=<file>` adopt it, so the file alone rebuilds the same bank."""
        m = self.model
        return json.loads(json.dumps({
            "model": {"name": m.name, "source": m.source, "fallback_source": m.fallback_source},
            "data": asdict(self.data), "workload": asdict(self.workload), "attention": self.options,
            "proxy": asdict(self.proxy), "transfer": asdict(self.transfer)}))


@dataclass
class Workbench:
    settings: WorkbenchSettings
    loaded: LoadedModel
    splits: DataSplits | None
    switcher: PlanSwitcher
    bank: Bank | None
    head_scores: object = None  # (layers, KV heads) copy scores, once `attach_head_choices` measured them

    @property
    def model(self):
        return self.loaded.model

    @property
    def info(self) -> dict:
        return self.loaded.info

    def planted_heldout(self):
        """The proxy's held-out blocks with `proxy.facts` facts planted in each (facts.py)."""
        from .facts import plant_facts

        p = self.settings.proxy
        return plant_facts(self.loaded.tokenizer, self.splits.heldout, p.facts, p.fact_seed)

    def proxy_evaluator(self, reference_model=None):
        """A ProxyEvaluator on the held-out blocks with `proxy.facts` facts planted in each. The reference
        distributions come from `reference_model` (default: this workbench's model as it is now, normally
        all-softmax)."""
        from .metrics import ProxyEvaluator

        p = self.settings.proxy
        proxy = ProxyEvaluator(reference_model if reference_model is not None else self.model,
                               self.planted_heldout(), p.batch_size, p.reference_top_k)
        proxy.model = self.model  # scored: this workbench's model, whatever gave the reference
        return proxy

    def scoring_key(self) -> tuple:
        """What proxy scores of this workbench depend on (cache keys): bank, held-out blocks, proxy settings and
        the option settings (a `mixed` option's kept heads are not in the bank's id)."""
        return (bank_id_or_none(self), self.splits.hashes["heldout"], asdict(self.settings.proxy), self.settings.options)


def needs_bank(options) -> bool:
    """True when any of `options` (names, e.g. a plan's layers or a space's options) runs parts trained by transfer
    (its own, or those of the option it builds on: `mixed<k>` runs the `linear` parts)."""
    return any(bank_option(name) for name in set(options))


def load_splits(tokenizer, data: DataSettings) -> DataSplits:
    return make_splits(tokenizer, data.source, int(data.seq_len), dict(data.fractions), dict(data.blocks),
                       data.text_field, data.heldout_seq_len, data.mix_sources)


def open_workbench(settings: WorkbenchSettings, with_bank: bool = False) -> Workbench:
    """Load model and data; with `with_bank`, load the cached bank or train it now (see `attach_bank`)."""
    m = settings.model
    loaded = load_model(m.name, m.source, m.device, m.dtype, m.fallback_source)
    bench = Workbench(settings, loaded, load_splits(loaded.tokenizer, settings.data),
                      PlanSwitcher(loaded.model, settings.options), None)
    return attach_bank(bench) if with_bank else bench


def attach_bank(bench: Workbench) -> Workbench:
    """Load the cached bank into the workbench's switcher, or train it now (minutes when cold)."""
    s = bench.settings
    bench.bank = load_or_build_bank(bench.switcher, bench.info, bench.splits, s.options, s.transfer,
                                    progress=s.progress, rebuild=s.rebuild_bank)
    return bench


def attach_head_choices(bench: Workbench, options) -> Workbench:
    """Fill in `kept_heads` for every `mixed<k>` option among `options` (names: a plan's layers or a space's
    options) that has none: per layer, the k KV heads the original model retrieves with (head_scores.py,
    measured on the proxy's planted blocks, cached). Every process derives the same choice from the same
    model and blocks; it travels in the option settings, so plan JSON and exported folders carry it."""
    from .errors import UserError
    from .head_scores import cached_head_scores, kept_heads
    from .inference.mixed_attention import MIXED_OPTIONS  # option -> the KV heads it keeps softmax per layer

    missing = sorted(o for o in set(options) if o in MIXED_OPTIONS and "kept_heads" not in bench.settings.options.get(o, {}))
    if not missing:
        return bench
    if not bench.settings.proxy.facts:
        raise UserError(f"proxy.facts: 0, but {', '.join(missing)} keeps the heads that retrieve the planted facts; "
                        "set proxy.facts >= 1")
    bench.head_scores = cached_head_scores(bench.switcher, bench.info, bench.planted_heldout())
    options = {**bench.settings.options,
               **{o: {**bench.settings.options.get(o, {}), "kept_heads": kept_heads(bench.head_scores, MIXED_OPTIONS[o])}
                  for o in missing}}
    bench.settings = replace(bench.settings, options=options)
    bench.switcher.settings = options
    return bench


def bank_id_or_none(bench: Workbench) -> str:
    """The bank's id, or 'none' for work that uses no trainable option (what caches and studies key on)."""
    return bench.bank.id if bench.bank is not None else "none"


def open_hybrid_workbench(settings: WorkbenchSettings, path, with_splits: bool = True):
    """(Workbench, plan) for a hybrid model folder: its own weights and plan instead of model + bank.

    The workbench's switcher restores the folder's base model (all-softmax); callers apply the plan.
    """
    from .hybrid_folder import load_hybrid

    hybrid = load_hybrid(path, settings.model.device, settings.model.dtype)
    splits = None
    if with_splits:
        if hybrid.tokenizer is None:
            raise UserError(f"plan: hybrid folder {str(path)!r} has no tokenizer; it cannot be evaluated on text")
        splits = load_splits(hybrid.tokenizer, settings.data)
    hybrid.switcher.restore()
    return Workbench(settings, hybrid.loaded, splits, hybrid.switcher, None), hybrid.plan


def original_reference(bench: Workbench):
    """A ProxyEvaluator of a hybrid folder's model against the ORIGINAL (unhealed) model it was made from.

    The healed base weights may differ from the original (merged LoRA), so the reference distributions come
    from the original, loaded from the source recorded in the plan JSON, and then the evaluator is pointed
    at the hybrid's model.
    """
    original = bench.info.get("original") or {}
    if not original.get("source"):
        raise UserError(f"plan: hybrid folder {bench.info['source']!r} does not record the model it was made from")
    m = bench.settings.model
    reference = load_model(original["name"], original["source"], m.device, m.dtype)
    if original.get("fingerprint") and reference.info["fingerprint"] != original["fingerprint"]:
        raise UserError(f"plan: hybrid folder was made from {original['name']} with fingerprint "
                        f"{original['fingerprint']}, but {original['source']} now has fingerprint "
                        f"{reference.info['fingerprint']}")
    proxy = bench.proxy_evaluator(reference_model=reference.model)
    del reference
    return proxy
