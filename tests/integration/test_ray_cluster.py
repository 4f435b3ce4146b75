"""A real two-node Ray cluster on loopback: `python search.py runner.address=auto` spreads its actors over both
nodes, loses the second node mid-search, and still ends with exactly `budget` distinct completed plans.

Both nodes run as `ray start --block` children of this test, each with its own temp dir; teardown kills their
process trees by pid (never `ray stop`, which would also stop every other Ray on the machine).
"""
from __future__ import annotations

import json
import re
from datetime import datetime
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from optuna.trial import TrialState

from tests.integration.test_search_cli import complete_trials, env, free_port, search_command, the_study, \
    trial_counts

pytestmark = pytest.mark.integration

# Actors get ready seconds apart (model load), and a tiny-model plan takes ~0.5 s: the first ready one alone
# does a dozen plans before the other's first. Enough budget is left after that to lose a node mid-search.
BUDGET = 30
RAY = Path(sys.executable).parent / "ray"
# A killed raylet is declared dead after a few missed health checks (default ~15 s): make it ~3 s.
FAST_HEALTH_CHECK = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}


class Node:
    """One `ray start --block` process and its temp dir (its log says when the node is up)."""

    def __init__(self, root: Path, name: str, *args: str):
        self.temp_dir = root / name
        self.temp_dir.mkdir()
        self.log = root / f"{name}.log"
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                [str(RAY), "start", "--block", "--node-ip-address=127.0.0.1", f"--temp-dir={self.temp_dir}",
                 "--disable-usage-stats", *args],
                stdout=log, stderr=subprocess.STDOUT, env={**env(), **FAST_HEALTH_CHECK}, start_new_session=True)

    def wait_started(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while "Ray runtime started" not in self.log.read_text():
            assert self.process.poll() is None, f"ray start exited:\n{self.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"node not up in {timeout} s:\n{self.log.read_text()[-3000:]}"
            time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL the whole tree (raylet, agents, actor workers), as a machine that vanishes."""
        try:
            root = psutil.Process(self.process.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for process in tree:
            try:
                process.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(tree, timeout=30)
        self.process.wait(timeout=30)


@pytest.fixture
def cluster():
    """(head, second node, RAY_ADDRESS): a head with room for a replacement actor, a node with room for one."""
    root = Path(tempfile.mkdtemp(prefix="lb-ray-"))  # short: Ray's socket paths live under it
    port = free_port()
    nodes = []
    try:
        head = Node(root, "head", "--head", f"--port={port}", "--num-cpus=2", '--resources={"head": 1}',
                    "--include-dashboard=false")
        nodes.append(head)
        head.wait_started()
        second = Node(root, "node2", f"--address=127.0.0.1:{port}", "--num-cpus=1", '--resources={"node2": 1}')
        nodes.append(second)
        second.wait_started()
        yield head, second, f"127.0.0.1:{port}"
    finally:
        for node in reversed(nodes):
            node.kill()
        shutil.rmtree(root, ignore_errors=True)


def node_of_trials(db: Path) -> dict[int, str]:
    """Trial number -> the node that evaluated it, for the completed trials (polled while the search runs)."""
    import sqlite3

    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as connection:
            rows = connection.execute(
                "SELECT number, value_json FROM trials JOIN trial_user_attributes USING (trial_id) "
                "WHERE state = 'COMPLETE' AND key = 'node'").fetchall()
    except sqlite3.OperationalError:
        return {}
    return {number: json.loads(value) for number, value in rows}


@pytest.mark.timeout(420)
def test_search_spreads_over_two_nodes_and_survives_losing_one(cluster, tmp_path):
    head, second, address = cluster
    output_dir = tmp_path / "outputs"
    output_dir.mkdir()
    started = time.monotonic()
    process = subprocess.Popen(
        search_command(output_dir, f"budget={BUDGET}", "runner=ray", "runner.address=auto", "runner.num_workers=2",
                       "runner.num_cpus=1"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**env(), "RAY_ADDRESS": address},
        cwd=tmp_path)
    try:
        seen = wait_for_two_nodes(output_dir, process)
        first_on = {node: time.monotonic() - started for node in seen}  # upper bounds, at the poll that saw them
        second.kill()
        killed_at, killed_wall = time.monotonic(), datetime.now()  # optuna stamps trials with naive local time
        time.sleep(2)  # a result already on its way from the lost node is recorded before the cut
        done_before_kill = set(node_of_trials(output_dir / "studies" / f"{the_study(output_dir)[0]}.db"))
        stdout, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr[-4000:]
    name, storage = the_study(output_dir)
    done = complete_trials(name, storage)
    assert len(done) == BUDGET and len({t.user_attrs["plan"] for t in done}) == BUDGET
    nodes = {t.number: t.user_attrs["node"] for t in done}
    after = {nodes[n] for n in nodes if n not in done_before_kill}
    assert len(after) == 1, "plans finished after the kill ran on more than the surviving node"
    [survivor] = after
    [lost] = set(seen) - after
    # The plan the lost node was evaluating is retried on a replacement actor (a fresh model; the bank from
    # the object store): its completion, from the kill, is how long losing a node costs.
    retried = re.findall(r"died during evaluate of (\S+)", stderr)
    assert retried, stderr[-3000:]
    replaced_after = max(t.datetime_complete for t in done if t.user_attrs["plan"] in retried) - killed_wall
    print(f"\nfirst evaluation seen after start: {', '.join(f'{n[:8]} {s:.1f} s' for n, s in first_on.items())}; "
          f"node {lost[:8]} killed at {killed_at - started:.1f} s, its plan done again on a replacement "
          f"{replaced_after.total_seconds():.1f} s later; search done at "
          f"{time.monotonic() - started:.1f} s; {sum(v == lost for v in nodes.values())} plans on the lost node, "
          f"{sum(v == survivor for v in nodes.values())} on the head")


def wait_for_two_nodes(output_dir: Path, process: subprocess.Popen, timeout: float = 240) -> dict[str, int]:
    """Poll the study until completed trials name two nodes (while the search still runs): node -> a trial."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dbs = list((output_dir / "studies").glob("*.db"))
        by_node = {node: number for number, node in node_of_trials(dbs[0]).items()} if dbs else {}
        if len(by_node) >= 2:
            counts = trial_counts(dbs[0])
            assert counts.get(TrialState.COMPLETE.name, 0) < BUDGET, "the search ended before a node could be lost"
            return by_node
        assert process.poll() is None, f"search ended with one node only: {process.stderr.read()[-3000:]}"
        time.sleep(0.1)
    pytest.fail(f"completed trials never named two nodes within {timeout} s")
