"""Typed settings of the search engine. The application builds them from its config; each validates its own
values, so a bad one is refused with one line naming the field before anything is written."""
from __future__ import annotations

from dataclasses import dataclass, field

from layerboost_core.errors import UserError
from layerboost_core.facts import MAX_FACTS
from layerboost_core.lm_eval_tasks import OFFLINE_TASKS
from layerboost_core.workbench import WorkbenchSettings
from layerboost_core.workload import Workload

RUNNER_KINDS = ("ray", "serial")
RETRIEVAL_MODES = ("off", "floor", "objective")


def _at_least(name: str, value, least) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < least:
        raise UserError(f"{name}: {value!r} must be a number >= {least}")


@dataclass(frozen=True)
class RunnerSettings:
    """The evaluator pool: `ray` actors (local, or a cluster with `address`) or `serial` in-process."""

    kind: str = "ray"
    address: str | None = None  # None: a local Ray of our own; "auto": join the running cluster
    num_workers: int = 2
    num_cpus: int = 1  # per actor (also its torch threads)
    num_gpus: float = 0.0  # per actor, fractions allowed
    max_retries: int = 2

    def __post_init__(self):
        if self.kind not in RUNNER_KINDS:
            raise UserError(f"runner.kind: unknown value {self.kind!r}; allowed: {', '.join(RUNNER_KINDS)}")
        _at_least("runner.num_workers", self.num_workers, 1)
        _at_least("runner.num_cpus", self.num_cpus, 0)
        _at_least("runner.num_gpus", self.num_gpus, 0)
        _at_least("runner.max_retries", self.max_retries, 0)


@dataclass(frozen=True)
class ObjectiveSettings:
    quality: str = "kl"  # a proxy metric or an lm-eval task
    memory: bool = False  # KV bytes per sequence as a third objective
    latency_ceiling: float | None = None  # seconds, predicted at the workload
    memory_ceiling: float | None = None  # KV bytes per sequence
    # floor: a plan keeping less than `retrieval_floor` x the original's retrieval_acc (the facts planted in
    # the proxy's blocks, proxy.facts) is infeasible | objective: retrieval_acc maximised as a third objective
    # | off: only recorded. Best files keep this floor in every mode (and fidelity.agreement_floor's).
    retrieval: str = "floor"
    retrieval_floor: float = 0.9  # the share of the original's retrieval_acc a plan (and every best file) keeps
    # Below this retrieval_acc the original itself cannot retrieve at the workload's context: a floor of a share
    # of it would mean nothing, so none is applied, and the run says so.
    retrieval_min_original: float = 0.5

    def __post_init__(self):
        for name in ("latency_ceiling", "memory_ceiling"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise UserError(f"objective.{name}: {value!r} must be a positive number or null")
        if self.retrieval not in RETRIEVAL_MODES:
            raise UserError(f"objective.retrieval: unknown value {self.retrieval!r}; allowed: {', '.join(RETRIEVAL_MODES)}")
        if not 0 < self.retrieval_floor <= 1:
            raise UserError(f"objective.retrieval_floor: {self.retrieval_floor!r}; allowed: a share in (0, 1]")
        if not 0 <= self.retrieval_min_original <= 1:
            raise UserError(f"objective.retrieval_min_original: {self.retrieval_min_original!r}; allowed: a share in [0, 1]")


@dataclass(frozen=True)
class SurrogateSettings:
    """Surrogate proposals during the search (see surrogate_feed.py)."""

    enabled: bool = True
    start_after: int = 0
    every: int = 8
    count: int = 6
    max_loss: float | None = 1.0  # nats/token of the proxy; None: any

    def __post_init__(self):
        for name, least in (("start_after", 0), ("every", 1), ("count", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise UserError(f"surrogate.{name}: {value!r} must be an integer >= {least}")
        m = self.max_loss
        if m is not None and (isinstance(m, bool) or not isinstance(m, (int, float)) or not m > 0):
            raise UserError(f"surrogate.max_loss: {m!r} must be a positive number (nats/token of the proxy) or null")


@dataclass(frozen=True)
class EvalSettings:
    """lm-eval fidelity: which tasks, how many examples, how many front candidates."""

    tasks: tuple[str, ...] = OFFLINE_TASKS
    # Front candidates scored with lm-eval after the search, the reference and the plans a best-plan file can
    # name first (0: none). 2 on the laptop: one round of the 2 workers (a third runs alone and adds as much).
    top_k: int = 2
    limit: int | None = None  # examples per task (None: all generated)
    batch_size: int = 8
    n_examples: int = 24  # per task; raise on a GPU
    passkey_context: int = 1024
    seed: int = 0

    def __post_init__(self):
        _at_least("eval.top_k", self.top_k, 0)
        _at_least("eval.batch_size", self.batch_size, 1)
        _at_least("eval.n_examples", self.n_examples, 1)
        _at_least("eval.passkey_context", self.passkey_context, 16)
        if self.limit is not None:
            _at_least("eval.limit", self.limit, 1)

    def task_settings(self) -> dict:
        """What lm_eval_tasks.write_offline_tasks takes."""
        return {"n_examples": self.n_examples, "passkey_context": self.passkey_context, "seed": self.seed}


@dataclass(frozen=True)
class RungSettings:
    """One rung of the fidelity ladder: the proxy's metrics on `blocks` held-out blocks of `factor` x the
    workload's prefill tokens, with `facts` facts planted in each (retrieval over blocks x facts), cut from
    `source` (None: the search's `data.source`) after the text the proxy and earlier rungs scored
    (fidelity.rung_blocks)."""

    name: str = "confirm"
    factor: float = 1.0
    blocks: int = 6
    facts: int = 16
    source: str | None = None  # None: the search's own data.source

    def __post_init__(self):
        if not self.name or self.name == "proxy" or any(c in self.name for c in ":|"):
            raise UserError(f"fidelity.rungs: name {self.name!r} must be non-empty, not 'proxy', without ':' or '|'")
        _at_least(f"fidelity.rungs[{self.name}].factor", self.factor, 0.01)
        _at_least(f"fidelity.rungs[{self.name}].blocks", self.blocks, 1)
        if isinstance(self.facts, bool) or not isinstance(self.facts, int) or not 0 <= self.facts <= MAX_FACTS:
            raise UserError(f"fidelity.rungs[{self.name}].facts: {self.facts!r}; allowed: 0 to {MAX_FACTS} facts per block")

    def seq_len(self, prefill: int) -> int:
        """Tokens per block at a workload of `prefill` tokens."""
        return max(2, round(self.factor * prefill))


@dataclass(frozen=True)
class FidelitySettings:
    """How picks are confirmed before they are offered (picks.py): the `top_k` front candidates a best-plan file
    could name are re-measured at every rung, lowest first, on text the search never scored; their latency is
    measured against all-softmax (`latency_rounds` rounds, plans taking turns); a best file is only written for
    a plan that keeps the floors at rung `pick_rung`, at the pessimistic end of its 90% intervals.

    Defaults on SmolLM2 at 2,048 tokens: `confirm` gives 6 blocks (96 facts) at the workload context and `long`
    2 blocks (32 facts) at twice it, 8 blocks in all; each candidate costs 10 block forwards (~25 s of one CPU
    core at bf16), so 8 candidates x both rungs take ~3 min on 2 cores (benchmarks/bench_default_run.py)."""

    top_k: int = 8  # candidates confirmed: all-softmax, then those a best file could name (0: picks at the proxy)
    rungs: tuple[RungSettings, ...] = (RungSettings("confirm", factor=1, blocks=6),  # at the workload context
                                       RungSettings("long", factor=2, blocks=2))  # at 2 x the workload context
    pick_rung: str = "confirm"  # where the floors are judged (the report shows every rung)
    # Quality floor of every best file: top-1 agreement with the original (the share of next tokens it predicts
    # the same) at the low end of its 90% interval over blocks. The retrieval floor is objective.retrieval_floor.
    agreement_floor: float = 0.8
    # Measured latency of the candidates: rounds of plans taking turns with all-softmax (0: predicted only). On a
    # shared 2-core VM one forward varies by +-15% from run to run; 5 rounds give the median of the per-round
    # ratios an interval a few percent wide.
    latency_rounds: int = 5

    def __post_init__(self):
        _at_least("fidelity.top_k", self.top_k, 0)
        _at_least("fidelity.latency_rounds", self.latency_rounds, 0)
        names = [r.name for r in self.rungs]
        if len(set(names)) != len(names):
            raise UserError(f"fidelity.rungs: names {names} must be distinct")
        if self.rungs and self.pick_rung not in names:
            raise UserError(f"fidelity.pick_rung: {self.pick_rung!r} is not a rung; allowed: {', '.join(names)}")
        if not 0 <= self.agreement_floor <= 1:
            raise UserError(f"fidelity.agreement_floor: {self.agreement_floor!r}; allowed: a share in [0, 1]")


@dataclass(frozen=True)
class EvaluatorSettings:
    """What one evaluator (in-process or a Ray actor) needs: the workbench, whether to load the bank, lm-eval,
    and the fidelity rungs with the workload prefill their block lengths scale."""

    workbench: WorkbenchSettings
    with_bank: bool
    eval: EvalSettings = field(default_factory=EvalSettings)
    rungs: tuple[RungSettings, ...] = ()

    @property
    def prefill(self) -> int:
        return self.workbench.workload.prefill


# The default sampler: TPE over the joint distribution of layers (Optuna 5: multivariate=True). Any Optuna sampler
# class path works as `_target_` with its keyword arguments; `seed` is the search's own unless given.
DEFAULT_SAMPLER = {"_target_": "optuna.samplers.TPESampler", "multivariate": True, "n_startup_trials": 10}


def default_space() -> dict:
    """Every layer may take any option (`SearchSpace.from_mapping` reads this mapping) the model can run and
    that pays at the workload (layerboost_search.space.narrow)."""
    return {"options": ["softmax", "linear", "none", "mixed1", "mixed2"],  # allowed (order = the sampler's)
            "pinned": {},  # layer index -> option, e.g. {0: softmax, 29: softmax}
            "min_count": {},  # option -> at least this many layers, e.g. {softmax: 4}
            "max_count": {},  # option -> at most this many layers, e.g. {none: 10}
            # drop options measured no cheaper than softmax at the workload (softmax beats them in every layer)
            "prune_dominated": True}


@dataclass(frozen=True)
class SearchSettings:
    """Everything a search needs. `SearchSettings()` is the CLI's `python search.py` with no arguments (a test
    composes the default config and compares)."""

    workbench: WorkbenchSettings = field(default_factory=WorkbenchSettings)
    space: dict = field(default_factory=default_space)
    objective: ObjectiveSettings = field(default_factory=ObjectiveSettings)
    sampler: dict = field(default_factory=lambda: dict(DEFAULT_SAMPLER))
    seed: int = 0  # the sampler's seed (the CLI's top-level `seed`)
    runner: RunnerSettings = field(default_factory=RunnerSettings)
    surrogate: SurrogateSettings = field(default_factory=SurrogateSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    fidelity: FidelitySettings = field(default_factory=FidelitySettings)
    budget: int = 100  # completed distinct plans in the study
    study: str | None = None  # None: derived from what the study measures
    storage: str | None = None  # None: sqlite at <output_dir>/studies/<study>.db
    output_dir: str = "outputs"
    # Liveness of drivers sharing a study: each records a heartbeat for its running trials every
    # `heartbeat_interval` s; a running trial without one for `grace_period` s is failed and its plan re-queued.
    heartbeat_interval: int = 10
    grace_period: int = 30

    def __post_init__(self):
        if isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget < 1:
            raise UserError(f"budget: {self.budget!r} must be a positive whole number of evaluations")
        for name in ("heartbeat_interval", "grace_period"):  # Optuna's RDBStorage takes whole seconds
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{name}: {value!r} must be a whole number of seconds >= 1")
        if self.grace_period <= self.heartbeat_interval:
            raise UserError(f"grace_period: {self.grace_period} must be longer than heartbeat_interval "
                            f"({self.heartbeat_interval}), or live drivers' trials would be failed")
        prune = self.space.get("prune_dominated", True)
        if not isinstance(prune, bool):
            raise UserError(f"space.prune_dominated: {prune!r} is not true or false")
        if not isinstance(self.sampler.get("_target_"), str):
            raise UserError(f"sampler._target_: {self.sampler.get('_target_')!r}; allowed: an Optuna sampler class "
                            "path, e.g. optuna.samplers.TPESampler")

    @property
    def workload(self) -> Workload:
        """The workload latency is priced for (and quality measured at): the workbench's."""
        return self.workbench.workload

    def evaluator(self, with_bank: bool) -> EvaluatorSettings:
        return EvaluatorSettings(self.workbench, with_bank, self.eval, self.fidelity.rungs)

    def build_sampler(self):
        """The Optuna sampler of `sampler` (`_target_` class path plus keyword arguments; `seed` added unless
        set). One line naming the setting when the class cannot be imported or built."""
        import importlib
        import inspect

        spec = dict(self.sampler)
        target = spec.pop("_target_")
        module, _, name = target.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name)
            if "seed" not in spec and "seed" in inspect.signature(cls).parameters:
                spec["seed"] = self.seed
            return cls(**spec)
        except Exception as error:  # import errors, unknown arguments, bad values
            raise UserError(f"sampler._target_: cannot build {target!r} ({type(error).__name__}: "
                            f"{str(error).strip().splitlines()[0] if str(error).strip() else ''})") from None
