"""One enqueued trial goes to one driver: processes asking a sqlite study at the same instant under
`waiting_trial_lock` pop every waiting trial exactly once. (Without the lock, Optuna on sqlite hands one
waiting trial to two of them: its pop reads WAITING before either writes RUNNING.)"""
from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap
import time
from collections import Counter

import optuna
from filelock import FileLock

from layerboost_search.study import storage_url_of, waiting_trial_lock

WAITING, PROCESSES = 60, 4

# Each process waits for the shared start time, then asks until the queue is empty, printing what it popped.
ASKER = textwrap.dedent("""
    import logging, sys, time
    import optuna
    from layerboost_search.study import waiting_trial_lock
    optuna.logging.set_verbosity(logging.WARNING)
    url, start = sys.argv[1], float(sys.argv[2])
    study = optuna.load_study(study_name="queue", storage=url)
    lock = waiting_trial_lock(url)
    while time.time() < start:
        time.sleep(0.001)
    while True:
        with lock:
            trial = study.ask()
        if "item" not in trial.user_attrs:  # the queue is empty: a fresh trial
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            break
        print(trial.user_attrs["item"], flush=True)
        study.tell(trial, 0.0, skip_if_finished=True)  # a trial popped twice is finished by the other asker
""")


def test_concurrent_askers_pop_each_waiting_trial_once(tmp_path):
    url = f"sqlite:///{tmp_path / 'queue.db'}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="queue", storage=url)
    for item in range(WAITING):
        study.enqueue_trial({}, user_attrs={"item": item})
    start = time.time() + 8  # every process imported and loaded by then
    processes = [subprocess.Popen([sys.executable, "-c", ASKER, url, str(start)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(PROCESSES)]
    outputs = [p.communicate(timeout=120) for p in processes]
    for process, (_, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr[-2000:]
    popped = Counter(int(line) for stdout, _ in outputs for line in stdout.split())
    assert sorted(popped) == list(range(WAITING)), sorted(set(range(WAITING)) - set(popped))
    assert max(popped.values()) == 1, popped.most_common(3)


def test_the_lock_is_a_file_beside_a_sqlite_database_and_nothing_elsewhere(tmp_path):
    lock = waiting_trial_lock(f"sqlite:///{tmp_path / 'a.db'}")
    assert isinstance(lock, FileLock) and lock.lock_file == f"{tmp_path / 'a.db'}.ask.lock"
    for url in (None, "sqlite://", "sqlite:///:memory:", "postgresql://user@host/db", "mysql+pymysql://u@h/db"):
        assert isinstance(waiting_trial_lock(url), contextlib.nullcontext), url


def test_storage_url_of_reads_through_optunas_cache(tmp_path):
    url = f"sqlite:///{tmp_path / 'b.db'}"
    assert storage_url_of(optuna.create_study(storage=url)) == url
    assert storage_url_of(optuna.create_study()) is None  # in memory
