"""The demo end to end, gated against the committed baseline (the project's own CI gate).

A change that makes the demo student worse for its size fails here, and so fails CI.
"""

import json

import pytest

from edgedistill.demo import BASELINE, run_demo
from edgedistill.report.gate import run_gate


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return run_demo(out / "run", gate_baseline=BASELINE)


@pytest.mark.slow
def test_demo_runs_the_whole_path_and_passes_the_committed_gate(demo):
    assert BASELINE.is_file(), "baselines/demo.json must be committed"
    assert demo["gate"]["passed"]
    models = demo["models"]
    # The paper's claim in miniature: DisCo lifts the small student above MoCo v2 at the same budget.
    assert models["disco"]["linear_top1"] > models["mocov2"]["linear_top1"]
    # INT8: within the demo's 1-point budget with at least 90% of the weighted layers in INT8.
    int8 = demo["int8"]
    assert int8["drop"] <= 1.0 and int8["int8_layers"]["share"] >= 0.9, int8
    for key in ("report", "report_md", "export"):
        assert demo[key]
    assert len(demo["plots"]) == 2


@pytest.mark.slow
def test_a_worse_report_fails_the_gate_and_an_equal_one_passes(demo, tmp_path):
    report = json.loads(open(demo["report"]).read())
    equal = tmp_path / "equal.json"
    equal.write_text(json.dumps(report))
    assert run_gate(equal, demo["report"]).passed

    worse = json.loads(json.dumps(report))
    for art in worse["artifacts"]:
        if art.get("top1") is not None:
            art["top1"] -= 5.0
    worse_path = tmp_path / "worse.json"
    worse_path.write_text(json.dumps(worse))
    result = run_gate(worse_path, demo["report"])
    assert not result.passed
    assert {c.check for c in result.failures} >= {"accuracy"}
