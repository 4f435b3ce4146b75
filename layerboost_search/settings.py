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


SPEED_KEYS = ("auto", "throughput", "ttft", "tpot", "latency")
CEILING_KEYS = ("ttft", "tpot", "latency", "throughput", "kv_bytes")


@dataclass(frozen=True)
class ObjectiveSettings:
    quality: str = "kl"  # a proxy metric or an lm-eval task
    # The serving metric searched for (objectives.SPEEDS): throughput (output tokens/s at the workload's
    # concurrency), ttft (time to first token), tpot (time per output token), latency (a request's, at steady
    # state); auto: throughput when the workload has output tokens, else latency (a prefill).
    speed: str = "auto"
    # Metric -> the share of all-softmax's value a plan may reach at most (throughput: the multiple it must reach
    # at least; null: no ceiling), predicted during the search, measured for every best file (over a ceiling when
    # the whole 90% interval of its measured median is, or the median by more than ceiling_slack:
    # picks.Evidence.over_ceiling). ttft 1.0: no plan that makes the first token wait longer than the original does.
    ceilings: dict = field(default_factory=lambda: {"ttft": 1.0, "tpot": None, "latency": None, "throughput": None,
                                                    "kv_bytes": None})
    # During the search a ceiling is checked on the cost model's prediction, with this share of slack: predictions
    # of plans this close to the original are within the cost model's error (at a 512-token prompt `linear` and
    # softmax prefill within ~5% of each other), and a hard cut there drops half of them on noise. Best files are
    # judged on their measured median: over a ceiling when its whole interval is, or it by more than this share.
    ceiling_slack: float = 0.1
    memory: bool = False  # KV bytes per sequence as a third objective
    latency_ceiling: float | None = None  # seconds of request latency, predicted at the workload
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
        if self.speed not in SPEED_KEYS:
            raise UserError(f"objective.speed: unknown value {self.speed!r}; allowed: {', '.join(SPEED_KEYS)}")
        if not isinstance(self.ceilings, dict):
            raise UserError(f"objective.ceilings: {self.ceilings!r} is not a mapping of metric: share, e.g. {{ttft: 1.0}}")
        for key, value in self.ceilings.items():
            if key not in CEILING_KEYS:
                raise UserError(f"objective.ceilings.{key}: unknown metric; allowed: {', '.join(CEILING_KEYS)}")
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
                raise UserError(f"objective.ceilings.{key}: {value!r} must be a positive share of all-softmax's value "
                                "(or null: none)")
        if isinstance(self.ceiling_slack, bool) or not isinstance(self.ceiling_slack, (int, float)) \
                or not 0 <= self.ceiling_slack < 1:
            raise UserError(f"objective.ceiling_slack: {self.ceiling_slack!r}; allowed: a share in [0, 1)")
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
    n_examples: int = 8  # per task; raise on a GPU
    passkey_context: int | None = None  # tokens of a passkey example; None: the workload's prompt length
    seed: int = 0

    def __post_init__(self):
        _at_least("eval.top_k", self.top_k, 0)
        _at_least("eval.batch_size", self.batch_size, 1)
        _at_least("eval.n_examples", self.n_examples, 1)
        if self.passkey_context is not None:
            _at_least("eval.passkey_context", self.passkey_context, 16)
        if self.limit is not None:
            _at_least("eval.limit", self.limit, 1)

    def task_settings(self, prefill: int) -> dict:
        """What lm_eval_tasks.write_offline_tasks takes, at a workload of `prefill`-token prompts."""
        return {"n_examples": self.n_examples, "passkey_context": self.passkey_context or prefill, "seed": self.seed}


@dataclass(frozen=True)
class RungSettings:
    """One rung of the fidelity ladder: the proxy's metrics on `blocks` held-out blocks of `factor` x the
    workload's prefill tokens, with `facts` facts planted in each (retrieval over blocks x facts), cut from
    `source` (None: the search's `data.source`) after the text the proxy and earlier rungs scored
    (fidelity.rung_blocks)."""

    name: str = "confirm"
    factor: float = 1.0
    blocks: int = 6
    facts: int | None = None  # per block; None: one per 64 tokens of its blocks, at most 16 (facts.facts_for)
    source: str | None = None  # None: the search's own data.source
    # Facts answered by generation through the hybrid cache, as a server answers them (metrics.ProxyEvaluator:
    # one block at a time, a decode step per answer token); false: teacher-forced from one forward.
    generate: bool = True

    def __post_init__(self):
        if not self.name or self.name == "proxy" or any(c in self.name for c in ":|"):
            raise UserError(f"fidelity.rungs: name {self.name!r} must be non-empty, not 'proxy', without ':' or '|'")
        _at_least(f"fidelity.rungs[{self.name}].factor", self.factor, 0.01)
        _at_least(f"fidelity.rungs[{self.name}].blocks", self.blocks, 1)
        if self.facts is not None and (isinstance(self.facts, bool) or not isinstance(self.facts, int)
                                       or not 0 <= self.facts <= MAX_FACTS):
            raise UserError(f"fidelity.rungs[{self.name}].facts: {self.facts!r}; allowed: 0 to {MAX_FACTS} facts per block")

    def seq_len(self, prefill: int) -> int:
        """Tokens per block at a workload of `prefill` tokens."""
        return max(2, round(self.factor * prefill))

    def facts_per_block(self, prefill: int) -> int:
        """Facts planted in each of its blocks at a workload of `prefill` tokens (`facts`, or derived)."""
        from layerboost_core.facts import facts_for

        return self.facts if self.facts is not None else facts_for(self.seq_len(prefill))


@dataclass(frozen=True)
class FidelitySettings:
    """How picks are confirmed before they are offered (picks.py): the `top_k` front candidates a best-plan file
    could name are re-measured at every rung, lowest first, on text the search never scored; their latency is
    served against all-softmax (`serving_rounds` rounds, plans taking turns); a best file is only written for
    a plan that keeps the floors at rung `pick_rung`, at the pessimistic end of its 90% intervals.

    Defaults on SmolLM2 at the default workload's 512-token prompts: `confirm` gives 16 blocks at the prompt length
    (128 facts, answered by generation through the hybrid cache, 8 blocks a batch) and `long` 1 block at twice it
    (16 facts, teacher-forced). 128 facts: a plan keeping 96% of the original's retrieval clears a 90% floor at
    the pessimistic end of its interval (with 64 it must match the original). About 4 min for the 6 candidates
    (top_k 4, faster_k 2) on 2 cores without AMX (benchmarks/bench_default_run.py lists each stage's forwards and
    seconds)."""

    # Candidates confirmed, those a best file could name (0: picks at the proxy). The original itself needs no
    # confirming: every rung measures it on the same text as the reference.
    top_k: int = 4
    # Then this many more: plans faster than the fastest candidate that kept every floor at `pick_rung`, least
    # proxy retrieval loss first (0: none). The first candidates are drawn by quality bars and speed targets,
    # blind to where retrieval breaks; these look past the fastest keeper (a default run offered 1.4-1.5x; with
    # them and the retrieval-ranked seeds, one offered a plan serving 2.2x that kept the floor).
    faster_k: int = 2
    rungs: tuple[RungSettings, ...] = (RungSettings("confirm", factor=1, blocks=16),  # at the prompt length
                                       RungSettings("long", factor=2, blocks=1, generate=False))  # at 2 x it
    pick_rung: str = "confirm"  # where the floors are judged (the report shows every rung)
    # Quality floor of every best file: top-1 agreement with the original (the share of next tokens it predicts
    # the same) at the low end of its 90% interval over blocks. The retrieval floor is objective.retrieval_floor.
    agreement_floor: float = 0.8
    # Measured serving of the candidates that keep the floors: rounds of each serving the workload in turn with
    # all-softmax, each at the concurrency its cache allows (0: predicted only). On a shared 2-core VM one
    # forward varies by +-15% from run to run; a round's ratio compares two plans timed seconds apart. A decode
    # step of the default run's 2x pick at 12 sequences over all-softmax's at 4 measured 1.11-1.22x in four
    # rounds of one run: with 3 rounds the same pick served 2.22x and 2.05x in two runs, with 5 rounds 2.24x and 2.45x
    # (5 rounds do not make two runs agree within 5% here); the default run's serving took 56-106 s against 47 s.
    serving_rounds: int = 5

    def __post_init__(self):
        _at_least("fidelity.top_k", self.top_k, 0)
        _at_least("fidelity.faster_k", self.faster_k, 0)
        _at_least("fidelity.serving_rounds", self.serving_rounds, 0)
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
    """Every layer may take softmax, linear, none or mixed1 (`SearchSpace.from_mapping` reads this mapping), of
    those the model can run and that pay at the workload (layerboost_search.space.narrow)."""
    # allowed (order = the sampler's); mixed2 (two of three heads kept: 0.7x the cache at the default workload, and
    # no cheaper prefill) is there to be asked for, not searched by default
    return {"options": ["softmax", "linear", "none", "mixed1"],
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
    budget: int = 64  # completed distinct plans in the study
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
        if not self.workload.decode:
            for name in ("throughput", "tpot"):
                if self.objective.speed == name or self.objective.ceilings.get(name) is not None:
                    where = "objective.speed" if self.objective.speed == name else f"objective.ceilings.{name}"
                    raise UserError(f"{where}: {name} needs output tokens, and workload.decode is 0; set "
                                    "workload.decode >= 1 or another metric")

    @property
    def workload(self) -> Workload:
        """The workload latency is priced for (and quality measured at): the workbench's."""
        return self.workbench.workload

    @property
    def speed(self) -> str:
        """The serving metric searched for, `objective.speed` resolved: `auto` is throughput when the workload
        has output tokens, else the request latency (its prefill)."""
        if self.objective.speed != "auto":
            return self.objective.speed
        return "throughput" if self.workload.decode else "latency"

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
