"""Many drivers, one study: `python search.py` started 2 and 3 times at once on the same study (tiny model,
serial runner, sqlite) ends with exactly `budget` completed distinct plans, no plan evaluated twice, no trial
of a live driver failed, and every driver exits 0 without a traceback."""
from __future__ import annotations

import subprocess
import time
from collections import Counter

import optuna
import pytest
from optuna.trial import TrialState

from .test_search_cli import env, search_command

BUDGET = 12


@pytest.mark.integration
@pytest.mark.timeout(420)
@pytest.mark.parametrize("drivers", [2, 3])
def test_concurrent_drivers_share_the_budget_without_duplicates_or_failures(tmp_path, drivers):
    output_dir = tmp_path / "outputs"
    output_dir.mkdir()
    storage = f"sqlite:///{output_dir / 'shared.db'}"
    command = search_command(output_dir, f"budget={BUDGET}", "runner=serial", "study=shared",
                             f"storage={storage}")
    started = time.monotonic()
    processes = []
    for _ in range(drivers):  # all in the same instant: they race for the schema and for the seeded trials
        processes.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                          env=env(), cwd=tmp_path))
    errors = [p.communicate(timeout=400)[1] for p in processes]
    seconds = time.monotonic() - started
    for process, stderr in zip(processes, errors):
        assert process.returncode == 0, stderr[-4000:]
        assert "Traceback" not in stderr, stderr[-4000:]
        # one waiting trial handed to two drivers (study.waiting_trial_lock) shows up as this warning
        assert "finished by another driver" not in stderr, stderr[-4000:]

    trials = optuna.load_study(study_name="shared", storage=storage).get_trials(deepcopy=False)
    states = Counter(t.state.name for t in trials)
    # every evaluation ends in COMPLETE (or FAIL, of which there must be none): distinct completed plans
    # are evaluations without duplicates
    done = [t.user_attrs["plan"] for t in trials if t.state == TrialState.COMPLETE]
    print(f"{drivers} drivers: {seconds:.0f} s, trial states {dict(states)}, {len(done)} evaluations of "
          f"{len(set(done))} plans")
    assert len(done) == BUDGET and len(set(done)) == BUDGET, Counter(done).most_common(3)
    assert states["FAIL"] == 0 and states["RUNNING"] == 0, states
