"""`python search.py` end to end on the tiny random model: report files, resume after SIGKILL, a Ray worker
killed mid-evaluation, optuna-dashboard on the produced storage, and one-line errors for bad input.

The tiny model needs no network (it borrows the SmolLM2 tokenizer from the converted cache folder), so these
tests are not marked `integration`; each uses its own output_dir, the shared cache (~/.cache/layerboost or
$LAYERBOOST_CACHE) keeps the bank, cost model and sensitivity table between tests.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parents[2]
# 128-token blocks hold one planted fact (the proxy's) or two (the 256-token `long` rung); 2 confirmation blocks.
# The space is not narrowed by timings (the tiny model's per-layer costs are too close to rank): softmax, linear,
# none and mixed1 (its 2 KV heads rule out mixed2).
TINY = ["model=tiny:llama", "eval=none", "transfer.batches=2", "data.seq_len=128", "workload.prefill=128",
        "workload.repeats=1", "progress=false", "proxy.facts=1", "fidelity.rungs.0.blocks=2",
        "fidelity.rungs.0.facts=1", "fidelity.rungs.1.facts=2", "space.prune_dominated=false"]
REPORT_FILES = ["answer.json", "best", "head_scores.csv", "pareto.csv", "pareto.html", "sensitivity.csv", "sensitivity.html",
                "summary.md", "trials.csv"]

optuna.logging.set_verbosity(optuna.logging.WARNING)


def env() -> dict:
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1"}


def search_command(output_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(ROOT / "search.py"), *TINY, f"output_dir={output_dir}", *overrides]


# Deadlines leave room for a CPU half as fast as the slowest one measured (waits are on states, not on time).
SEARCH_DEADLINE = 600


def run_search(output_dir: Path, *overrides: str, timeout: float = SEARCH_DEADLINE) -> subprocess.CompletedProcess:
    result = subprocess.run(search_command(output_dir, *overrides), capture_output=True, text=True, env=env(),
                            cwd=output_dir.parent, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def the_study(output_dir: Path) -> tuple[str, str]:
    """(study name, storage URL) of the single study under output_dir."""
    dbs = sorted((output_dir / "studies").glob("*.db"))
    assert len(dbs) == 1, dbs
    return dbs[0].stem, f"sqlite:///{dbs[0]}"


def complete_trials(name: str, storage: str) -> list:
    study = optuna.load_study(study_name=name, storage=storage)
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def trial_counts(db: Path) -> dict[str, int]:
    """Trial counts by state, read straight from the sqlite file (cheap enough to poll). `EVALUATING`: running
    trials whose plan is known (submitted for evaluation, not just asked)."""
    if not db.exists():
        return {}
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as connection:
            counts = dict(connection.execute("SELECT state, COUNT(*) FROM trials GROUP BY state").fetchall())
            counts["EVALUATING"] = connection.execute(
                "SELECT COUNT(*) FROM trials JOIN trial_user_attributes USING (trial_id) "
                "WHERE state = 'RUNNING' AND key = 'feasible'").fetchone()[0]
            return counts
    except sqlite3.OperationalError:  # tables not created yet, or locked for a moment
        return {}


# --- (a) a full search writes every report file ---------------------------------------------------------------

BUDGET = 8


@pytest.fixture(scope="module")
def ray_search(tmp_path_factory):
    """One Ray-runner search on the tiny model (shared by the report and dashboard tests)."""
    output_dir = tmp_path_factory.mktemp("ray-search") / "outputs"
    output_dir.mkdir()
    # the tiny random model's hybrids agree with it on few tokens: no quality floor, so best files are written
    result = run_search(output_dir, f"budget={BUDGET}", "runner=ray", "runner.num_workers=2",
                        "fidelity.agreement_floor=0")
    return output_dir, result


@pytest.mark.timeout(900)
def test_search_writes_every_report_file_and_exactly_budget_distinct_plans(ray_search):
    output_dir, result = ray_search
    name, storage = the_study(output_dir)
    run_dir = output_dir / "runs" / name
    assert sorted(p.name for p in run_dir.iterdir()) == REPORT_FILES
    best = sorted((run_dir / "best").glob("*.json"))
    assert best, "no best plan written"
    for path in best:
        data = json.loads(path.read_text())
        assert data["schema"] == "layerboost.plan/v1" and len(data["layers"]) == data["num_layers"] == 4
        assert data["origin"]["study"] == name
    answer = json.loads((run_dir / "answer.json").read_text())
    assert sorted(answer["best"]) == sorted(p.stem for p in best)
    done = complete_trials(name, storage)
    assert len(done) == BUDGET
    plans = [t.user_attrs["plan"] for t in done]
    assert len(set(plans)) == BUDGET, plans
    assert done[0].user_attrs["label"] == "all-softmax"
    sensitivity = (run_dir / "sensitivity.csv").read_text().splitlines()
    assert len(sensitivity) == 1 + 4 * 3  # header + every (layer, option) swap: linear, mixed1, none
    assert f"Search {name}:" in result.stdout and result.stdout.index("## What to ship") < result.stdout.index(
        "## Pareto front (proxy)")
    assert f"optuna-dashboard {storage}" in result.stdout


# --- (e) a best file is all export and heal need ----------------------------------------------------------------

LOAD_IN_PLAIN_TRANSFORMERS = r"""
import sys
class NoLayerBoost:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0].startswith("layerboost"):
            raise ImportError(f"{name} must not be imported here")
sys.meta_path.insert(0, NoLayerBoost())
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
out = model.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=3, do_sample=False)
print("".join(model.config.layerboost_plan and ["ok"]), out.shape[1])
"""


@pytest.mark.timeout(900)
def test_a_best_file_alone_exports_and_heals_and_contradicting_overrides_are_refused(ray_search, tmp_path):
    """The search ran with a non-default model (tiny:llama), data lengths, workload and transfer settings; the
    verbs get nothing but the file (and where to write), and the folders load in plain transformers."""
    output_dir, _ = ray_search
    name, _ = the_study(output_dir)
    # a file whose plan keeps an attention layer: healing's LoRA adapts q/v/o projections, which `none` drops
    # (best/fastest.json on this tiny model may name a plan without any)
    best = next(path for path in sorted((output_dir / "runs" / name / "best").glob("*.json"))
                if set(json.loads(path.read_text())["plan"]) - {"N"})
    made = json.loads(best.read_text())["made_with"]
    assert made["model"]["source"] == "tiny:llama" and made["workload"]["prefill"] == 128
    layerboost = [sys.executable, "-m", "layerboost"]
    for verb, extra, folder in (("export", [f"out={tmp_path / 'exported'}"], tmp_path / "exported"),
                                ("heal", [f"heal.out={tmp_path / 'healed'}", "heal.tokens=256"], tmp_path / "healed")):
        done = subprocess.run([*layerboost, verb, f"plan={best}", "progress=false", *extra], capture_output=True,
                              text=True, env=env(), cwd=tmp_path, timeout=SEARCH_DEADLINE)
        assert done.returncode == 0, done.stderr[-3000:]
        written = json.loads((folder / "plan.json").read_text())
        assert written["plan"] == json.loads(best.read_text())["plan"] and written["made_with"]["data"] == made["data"]
        loaded = subprocess.run([sys.executable, "-I", "-c", LOAD_IN_PLAIN_TRANSFORMERS, str(folder)],
                                capture_output=True, text=True, env=env(), timeout=SEARCH_DEADLINE)
        assert loaded.returncode == 0 and loaded.stdout.split() == ["ok", "7"], loaded.stderr[-3000:]
    refused = subprocess.run([*layerboost, "export", f"plan={best}", "workload.prefill=256"], capture_output=True,
                             text=True, env=env(), cwd=tmp_path, timeout=SEARCH_DEADLINE)
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1, refused.stderr[-2000:]
    assert lines[0].startswith("error: workload.prefill:") and "128" in lines[0] and "256" in lines[0]


# --- (d) optuna-dashboard serves the study ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(300)
def test_optuna_dashboard_serves_the_study(ray_search):
    output_dir, _ = ray_search
    name, storage = the_study(output_dir)
    dashboard = Path(sys.executable).parent / "optuna-dashboard"
    port = free_port()
    process = subprocess.Popen([str(dashboard), storage, "--port", str(port), "--host", "127.0.0.1", "--quiet"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env())
    try:
        deadline, body = time.monotonic() + 60, None
        while time.monotonic() < deadline and body is None:
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as response:
                    body = json.loads(response.read())
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.3)
        assert body is not None, "optuna-dashboard did not answer within 60 s"
        summaries = {s["study_name"]: s for s in body["study_summaries"]}
        assert name in summaries
        study_id = summaries[name]["study_id"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{study_id}?after=0", timeout=10) as response:
            detail = json.loads(response.read())
        states = [t["state"] for t in detail["trials"]]
        assert states.count("Complete") == BUDGET, states
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


# --- (b) resume after the driver is SIGKILLed ---------------------------------------------------------------------

RESUME_BUDGET = 20  # above the 18 seeds, so the re-queued plan (queued behind them) is evaluated too
# A killed driver's trials are re-queued once their heartbeat is older than the grace period: keep it short.
LIVENESS = ("heartbeat_interval=1", "grace_period=2")


def start_and_kill(output_dir: Path, at_least: int) -> set[int]:
    """Start the search, SIGKILL it once `at_least` trials completed while one runs; the RUNNING trial numbers."""
    process = subprocess.Popen(search_command(output_dir, f"budget={RESUME_BUDGET}", "runner=serial", *LIVENESS),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env(),
                               cwd=output_dir.parent)
    db = None
    try:
        deadline = time.monotonic() + SEARCH_DEADLINE
        while time.monotonic() < deadline:
            dbs = list((output_dir / "studies").glob("*.db"))
            db = dbs[0] if dbs else None
            counts = trial_counts(db) if db else {}
            if counts.get("COMPLETE", 0) >= at_least and counts.get("EVALUATING", 0):
                break
            assert process.poll() is None, f"search ended before it could be killed: {process.stderr.read()[-2000:]}"
            time.sleep(0.05)
        else:
            pytest.fail(f"no trial running after {at_least} completed within {SEARCH_DEADLINE} s: "
                        f"{trial_counts(db) if db else {}}")
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
        process.stderr.close()
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as connection:
        return {number for (number,) in connection.execute("SELECT number FROM trials WHERE state = 'RUNNING'")}


@pytest.mark.timeout(900)
def test_resume_after_sigkill_requeues_running_trials_and_stops_at_budget(tmp_path):
    output_dir = tmp_path / "outputs"
    output_dir.mkdir()
    killed: set[int] = set()
    for _ in range(3):  # the kill can land between two trials (nothing running); then kill the resumed run
        killed = start_and_kill(output_dir, at_least=3)
        if killed:
            break
    assert killed, "every kill landed between two trials"
    name, storage = the_study(output_dir)
    before = {t.number: t for t in optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)}
    done_before = sum(t.state == TrialState.COMPLETE for t in before.values())
    assert 3 <= done_before < RESUME_BUDGET

    time.sleep(3)  # past the grace period: the restarted driver finds the killed one's trials stale at start-up
    result = run_search(output_dir, f"budget={RESUME_BUDGET}", "runner=serial", *LIVENESS)
    assert f"re-queued {len(killed)} trial(s)" in result.stderr

    trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(done) == RESUME_BUDGET
    plans = [t.user_attrs["plan"] for t in done]
    assert len(set(plans)) == RESUME_BUDGET, plans
    for number, t in before.items():  # what was evaluated before the kill is kept as it was
        if t.state == TrialState.COMPLETE:
            assert trials[number].state == TrialState.COMPLETE and trials[number].values == t.values
    for number in killed:
        assert trials[number].state == TrialState.FAIL
        again = [t for t in trials if t.user_attrs.get("requeued_from") == number]
        assert len(again) == 1 and again[0].number > number
        assert again[0].state == TrialState.COMPLETE, again[0].state
        assert again[0].user_attrs["plan"] == trials[number].user_attrs["plan"]
        assert again[0].user_attrs["label"] == trials[number].user_attrs["label"]


# --- (c) a Ray worker killed mid-evaluation -----------------------------------------------------------------------


@pytest.mark.timeout(900)
def test_ray_worker_killed_mid_evaluation_is_replaced_and_its_plan_retried(tmp_path, monkeypatch):
    import ray

    from layerboost.config import compose
    from layerboost.settings import search_settings
    from layerboost_search.runner import RayRunner
    from layerboost_search.worker import PlanEvaluator

    started = tmp_path / "started"
    started.mkdir()

    class SlowEvaluator(PlanEvaluator):
        """Marks the start of each evaluation with a file named after its process, then takes a while.
        (A local class: Ray pickles it by value, so the actors need not import this test module.)"""

        def evaluate(self, plan_text):
            (started / f"{os.getpid()}-{plan_text}").touch()
            time.sleep(1)
            return super().evaluate(plan_text)

    def wait_started(pid: int, plan: str) -> None:
        deadline = time.monotonic() + 60
        while not (started / f"{pid}-{plan}").exists():
            assert time.monotonic() < deadline, f"worker {pid} never started evaluating {plan}"
            time.sleep(0.05)

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    cfg = compose([*TINY, f"output_dir={tmp_path}", "runner=ray", "runner.num_workers=1", "runner.max_retries=2"])
    settings = search_settings(cfg)
    runner = RayRunner(settings.evaluator(with_bank=True), settings.runner, evaluator_class=SlowEvaluator)
    try:
        [first] = runner.actor_pids()  # waits until the actor holds model and bank
        runner.submit("plan-a", "evaluate", "SSLN")
        wait_started(first, "SSLN")
        os.kill(first, signal.SIGKILL)
        key, result = runner.next_result()
        assert key == "plan-a"
        assert "error" not in result, result
        assert result["pid"] != first
        assert {"kl", "nll"} <= set(result["metrics"])
        [second] = runner.actor_pids()
        assert second == result["pid"]
        assert runner.idle == [0] and not runner.running and not runner.queue

        # no retries left: the plan fails with its reason, and the pool is whole again (one idle slot)
        runner.max_retries = 0
        runner.submit("plan-b", "evaluate", "SLLN")
        wait_started(second, "SLLN")
        os.kill(second, signal.SIGKILL)
        key, result = runner.next_result()
        assert key == "plan-b" and result == {"error": "worker died 1 times"}
        assert runner.idle == [0] and not runner.running and not runner.queue
    finally:
        runner.close()
        ray.shutdown()


# --- (e) bad input: one line, exit status 2, nothing written -----------------------------------------------------

BAD_INPUT = {
    "budget=0": ["budget: 0"],
    "sampler=nonexistent": ["config:", "sampler/nonexistent"],
    "sampler._target_=optuna.samplers.NoSuchSampler": ["sampler._target_:", "optuna.samplers.NoSuchSampler"],
    "+space.min_count={softmax:3,linear:3}": ["space.min_count:", "needs 6 layers", "the model has 4"],
    "storage=sqlite:////nonexistent/dir/x.db": ["storage:", "sqlite:////nonexistent/dir/x.db"],
    "objective.latency_ceiling=1e-9": ["objective.latency_ceiling:", "cannot be met"],
    "surrogate.max_loss=-1": ["surrogate.max_loss: -1", "positive number"],
    "surrogate.every=0": ["surrogate.every: 0", "integer >= 1"],
}


@pytest.mark.timeout(900)
def test_bad_input_fails_with_one_line_and_writes_nothing(tmp_path):
    runs = {}
    for index, override in enumerate(BAD_INPUT):  # all at once: most of the time is start-up
        output_dir = tmp_path / str(index) / "outputs"
        output_dir.parent.mkdir()
        runs[override] = (output_dir, subprocess.Popen(
            search_command(output_dir, "budget=4", "runner=serial", override), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, env=env(), cwd=output_dir.parent))
    failures = []
    for override, (output_dir, process) in runs.items():
        try:
            stdout, stderr = process.communicate(timeout=SEARCH_DEADLINE)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate(timeout=30)
        lines = stderr.strip().splitlines()
        errors = [line for line in lines if line.startswith("error:")]
        problems = []
        if process.returncode != 2:
            problems.append(f"exit status {process.returncode}")
        if len(errors) != 1 or lines[-1:] != errors:
            problems.append("not exactly one 'error:' line, last")
        if "Traceback" in stderr:
            problems.append("traceback")
        problems += [f"missing {fragment!r}" for fragment in BAD_INPUT[override] if errors and fragment not in errors[0]]
        if (output_dir / "runs").exists() or list(output_dir.rglob("*.db")):
            problems.append(f"wrote {sorted(str(p.relative_to(output_dir)) for p in output_dir.rglob('*'))}")
        if problems:
            failures.append(f"{override}: {'; '.join(problems)}\n  stderr: {stderr.strip()[-1500:]}")
    assert not failures, "\n".join(failures)


@pytest.mark.timeout(900)
def test_front_candidates_get_lm_eval_columns(tmp_path):
    # Second fidelity end to end on real sqlite storage: scores land after the trials have finished.
    output_dir = tmp_path / "outputs"
    output_dir.mkdir()
    run_search(output_dir, "budget=4", "runner=serial", "eval=offline", "eval.top_k=2", "eval.n_examples=4",
               "eval.passkey_context=128")
    name, storage = the_study(output_dir)
    with open(output_dir / "runs" / name / "trials.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    scored = [r for r in rows if r.get("lm_eval:lb_passkey", "") != ""]
    assert 1 <= len(scored) <= 2
    for row in scored:
        for task in ("lb_cloze", "lb_passkey", "lb_mqar"):
            assert 0.0 <= float(row[f"lm_eval:{task}"]) <= 1.0


@pytest.mark.timeout(900)
def test_surrogate_proposals_are_enqueued_and_evaluated(tmp_path):
    output_dir = tmp_path / "outputs"
    output_dir.mkdir()
    budget = 28  # the 4-layer tiny model gets 18 seeds; the surrogate proposes after they drain
    run_search(output_dir, f"budget={budget}", "runner=serial", "surrogate.enabled=true",
               "surrogate.start_after=4", "surrogate.every=3", "surrogate.count=2")
    name, storage = the_study(output_dir)
    done = complete_trials(name, storage)
    assert len(done) == budget and len({t.user_attrs["plan"] for t in done}) == budget
    labels = [t.user_attrs["label"] for t in done]
    assert labels.count("surrogate") >= 2, labels
    seeds = [i for i, label in enumerate(labels) if label not in ("sampled", "surrogate")]
    assert min(i for i, label in enumerate(labels) if label == "surrogate") > max(seeds)  # after the seed queue


@pytest.mark.timeout(900)
def test_report_resolves_the_front_for_another_workload_without_new_evaluations(tmp_path):
    output_dir = tmp_path / "outputs"
    output_dir.mkdir()
    run_search(output_dir, "budget=12", "runner=serial")
    name, storage = the_study(output_dir)
    before = len(optuna.load_study(study_name=name, storage=storage).trials)

    command = [sys.executable, "-m", "layerboost", "report", *TINY, f"output_dir={output_dir}",
               "workload.prefill=256", "workload.batch=2"]
    refused = subprocess.run(command, capture_output=True, text=True, env=env(), cwd=tmp_path, timeout=SEARCH_DEADLINE)
    assert refused.returncode == 2 and "pick one with study=<name>" in refused.stderr and name in refused.stderr

    result = subprocess.run([*command, f"study={name}"], capture_output=True, text=True, env=env(), cwd=tmp_path,
                            timeout=SEARCH_DEADLINE)
    assert result.returncode == 0, result.stderr[-4000:]
    out_dir = output_dir / "runs" / name / "workloads" / "prefill256-decode256-batch2-mem4seq"
    assert sorted(p.name for p in out_dir.iterdir()) == ["pareto.csv", "pareto.html", "predicted_front.csv",
                                                          "trials.csv"]
    with open(out_dir / "trials.csv") as f:
        repriced = list(csv.DictReader(f))
    assert len(repriced) == 12
    # Same plans, same quality, new speeds: the cost model was measured at the new workload.
    assert any(abs(1 / float(r["cost_s"]) - float(r["study_value"])) > 1e-6 for r in repriced)
    with open(out_dir / "predicted_front.csv") as f:
        predicted = list(csv.DictReader(f))
    assert predicted and all(len(r["plan"]) == 4 for r in predicted)
    assert len(optuna.load_study(study_name=name, storage=storage).trials) == before  # nothing evaluated
