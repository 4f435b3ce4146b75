"""Every new serving setting refuses a bad value in one line naming the field and the value, exit status 2,
nothing written; the default is the memory-bound workload searched for throughput with a TTFT ceiling."""
from __future__ import annotations

import pytest

from layerboost.cli import main
from layerboost.config import compose
from layerboost.settings import search_settings


@pytest.mark.parametrize("override, message", [
    ("workload.memory_gib=-2", "error: workload.memory_gib: -2.0 must be a positive number of GiB or null"),
    ("workload.memory_sequences=0", "error: workload.memory_sequences: 0 must be a whole number >= 1"),
    ("workload.decode=-1", "error: workload.decode: -1 must be a whole number >= 0"),
    ("workload.batch=0", "error: workload.batch: 0 must be a whole number >= 1"),
    ("objective.speed=fast", "error: objective.speed: unknown value 'fast'; allowed: auto, throughput, ttft, tpot, latency"),
    ("+objective.ceilings.memory=1", "error: objective.ceilings.memory: unknown metric; allowed: ttft, tpot, latency, "
                                     "throughput, kv_bytes"),
    ("objective.ceilings.throughput=-1", "error: objective.ceilings.throughput: -1 must be a positive share"),
    ("objective.ceilings.ttft=0", "error: objective.ceilings.ttft: 0 must be a positive share of all-softmax's value"),
    ("fidelity.serving_rounds=-1", "error: fidelity.serving_rounds: -1 must be a number >= 0"),
    ("fidelity.faster_k=-1", "error: fidelity.faster_k: -1 must be a number >= 0"),
    ("fidelity.rungs.0.generate=maybe", "error: fidelity.rungs[0].generate: 'maybe' is not true or false"),
    ("eval.passkey_context=3", "error: eval.passkey_context: 3 must be a number >= 16"),
])
def test_a_bad_serving_setting_is_one_line_and_exit_2(override, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["search", override, f"output_dir={tmp_path}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(message), err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("overrides, message", [
    (["workload=prefill-only", "objective.speed=throughput"],
     "error: objective.speed: throughput needs output tokens, and workload.decode is 0"),
    (["workload=prefill-only", "objective.ceilings.tpot=1.0"],
     "error: objective.ceilings.tpot: tpot needs output tokens, and workload.decode is 0"),
])
def test_output_metrics_without_output_tokens_are_refused(overrides, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["search", *overrides, f"output_dir={tmp_path}"])
    assert capsys.readouterr().err.strip().startswith(message)


def test_the_default_is_a_memory_bound_server_searched_for_throughput():
    settings = search_settings(compose([]))
    w = settings.workload
    assert (w.prefill, w.decode, w.batch, w.memory_gib, w.memory_sequences) == (512, 256, 32, None, 4)
    assert settings.speed == "throughput"
    assert {k: v for k, v in settings.objective.ceilings.items() if v is not None} == {"ttft": 1.0}
    assert search_settings(compose(["workload=prefill-only"])).speed == "latency"
    chat = search_settings(compose(["workload=chat"])).workload
    assert not chat.memory_bound and chat.batch == 8


def test_a_front_re_priced_for_much_longer_prompts_says_its_quality_was_not_measured_there():
    from layerboost_search.resolve import longer_prompt_warning

    warning = longer_prompt_warning(512, 7680)
    assert warning.startswith("warning:") and "512-token" in warning and "7,680" in warning
    assert longer_prompt_warning(512, 1024) == ""  # twice the length: the study's `long` rung measured it
    assert longer_prompt_warning(2048, 512) == ""  # shorter prompts: nothing to warn about
