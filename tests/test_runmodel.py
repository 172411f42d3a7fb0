"""The run model: stages, states, their aggregation, the error line, the records. (No import cycle around it:
test_imports.py.)"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from tunectl.recipe import load_recipe
from tunectl.runmodel import (
    FINAL,
    STAGES,
    RunState,
    RunStatus,
    StageState,
    StageStatus,
    duration,
    error_line,
    format_error,
    run_state,
    stages_for,
    upstream_of,
)


def test_the_pipeline_and_a_recipe_s_prefix_of_it():
    assert STAGES == ("train", "merge", "gguf")
    assert [upstream_of(s) for s in STAGES] == [None, "train", "merge"]
    assert stages_for(load_recipe("ruozhiba-tiny")) == ["train", "merge", "gguf"]
    assert stages_for(load_recipe("ruozhiba-tiny", ["export.gguf=[]"])) == ["train", "merge"]
    no_exports = ["export.gguf=[]", "export.merged_16bit=false", "export.lora=false"]
    assert stages_for(load_recipe("ruozhiba-tiny", no_exports)) == ["train"]


@pytest.mark.parametrize(
    ("states", "expected"),
    [
        (["succeeded", "succeeded"], "succeeded"),
        (["succeeded", "failed", "skipped"], "failed"),
        (["succeeded", "missing", "running"], "incomplete"),
        (["succeeded", "running", "waiting"], "running"),
        (["cancelled", "skipped", "skipped"], "cancelled"),
        (["interrupted", "pending", "pending"], "interrupted"),
        (["succeeded", "skipped", "skipped"], "failed"),  # upstream succeeded without a manifest: final, not done
        (["pending", "waiting"], "pending"),
        ([], "unknown"),
    ],
)
def test_one_aggregation_of_stage_states(states, expected):
    assert run_state(states) == expected and isinstance(run_state(states), RunState)


def test_an_unknown_state_is_refused():
    with pytest.raises(ValueError):
        run_state(["released"])


def test_states_read_as_their_words():
    assert f"{StageState.WAITING:<9}|" == "waiting  |" and str(RunState.INCOMPLETE) == "incomplete"
    assert json.dumps({"s": StageState.FAILED}) == '{"s": "failed"}'
    assert StageState.SUCCEEDED in FINAL and StageState.WAITING not in FINAL


def test_one_error_line_convention():
    assert format_error("bad\n  value") == "error: bad value"
    log = "INFO start\nerror: first\nTraceback...\nerror: data set x has no 'output' column\nbye\n"
    assert error_line(log) == "data set x has no 'output' column"
    assert error_line("INFO fine\n  error: indented is not one\n") is None


def test_duration_reads_both_timestamp_styles():
    now = datetime(2026, 12, 1, 10, 0, 30, tzinfo=UTC)
    assert duration("2026-12-01T10:00:00Z", None, now) == 30.0
    assert duration("2026-12-01T10:00:00+00:00", "2026-12-01T10:00:12+00:00", now) == 12.0
    assert duration(None, None, now) is None and duration("yesterday", None, now) is None


def test_records_as_json_omit_what_is_not_set():
    s = RunStatus(
        run="r-1",
        recipe="tiny",
        backend="local",
        state="failed",
        created="2026-12-01T10:00:00+00:00",
        stages=[
            StageStatus("train", "failed", error="data set x has no 'output' column", exit_code=78),
            StageStatus("merge", StageState.SKIPPED, reason="an upstream stage did not succeed"),
        ],
        path="/s/runs/r-1",
    )
    doc = json.loads(json.dumps(s.to_dict()))
    assert doc["state"] == "failed" and "namespace" not in doc and "reason" not in doc
    assert doc["stages"][0] == {
        "stage": "train",
        "state": "failed",
        "error": "data set x has no 'output' column",
        "exit_code": 78,
    }
    assert s.failure() == (
        "stage train of run r-1 failed: data set x has no 'output' column (full log: tunectl logs r-1 --stage train)"
    )
    s.state, s.stages = RunState.SUCCEEDED, [StageStatus("train", "succeeded")]
    assert s.failure() is None


def test_manifest_phases_lead_with_the_time_outside_any_phase():
    from tunectl.runmodel import manifest_phases

    doc = {"timings": {"seconds": 30.0, "phases": {"load model": 4.04, "train": 20.0}}}
    assert manifest_phases(doc) == {"start-up": 6.0, "load model": 4.0, "train": 20.0}
    assert list(manifest_phases(doc)) == ["start-up", "load model", "train"]
    assert manifest_phases({"timings": {"phases": {"train": 1}}}) is None  # no total: nothing to lead with
    assert manifest_phases({}) is None
