"""`edgedistill compare`: like-for-like checks and one table from tiny real runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import EXACT_TEACHER
from typer.testing import CliRunner

from edgedistill.cli import app
from edgedistill.compare import check_agreement, run_compare
from edgedistill.recipe import load_config
from edgedistill.errors import UserError

TINY = {
    "student": {"arch": "mobilenetv3_small_100"},
    "data": {"loader": "torchvision", "workers": 0},
    "train": {"batch_size": 16, "max_steps": 2, "log_every": 1, "checkpoint_every": 2},
    "eval": {"linear_epochs": 3},
}


def _recipe(tmp_path: Path, name: str, method: dict, **sections) -> Path:
    data = {"name": name, "seed": 0, "method": method, **{k: dict(v) for k, v in TINY.items()}}
    for section, values in sections.items():
        data[section].update(values)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_disagreeing_recipes_are_refused_with_the_differences(tmp_path):
    a = _recipe(tmp_path, "a", {"name": "mocov2", "queue_size": 64})
    b = _recipe(tmp_path, "b", {"name": "supervised"}, train={"max_steps": 3}, student={"stem_stride": 1})
    configs = [(str(p), load_config(p)) for p in (a, b)]
    with pytest.raises(UserError) as e:
        check_agreement(configs)
    msg = str(e.value)
    assert "train.max_steps" in msg and "student.stem_stride" in msg and "--set" in msg
    # Method hyper-parameters and the loader are allowed to differ.
    assert "queue_size" not in msg and "loader" not in msg
    forced = [(str(p), load_config(p, ["train.max_steps=2", "student.stem_stride=1"])) for p in (a, b)]
    check_agreement(forced)


def test_compare_two_recipes_writes_one_table(tmp_path):
    a = _recipe(tmp_path, "moco", {"name": "mocov2", "queue_size": 64})
    b = _recipe(tmp_path, "sup", {"name": "supervised"})
    out = tmp_path / "cmp"
    result = CliRunner().invoke(app, ["compare", str(a), str(b), "--out", str(out), "--set", "seed=1"])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "compare.json").read_text())
    assert data["schema"] == "edgedistill.compare/1" and data["complete"] is True
    assert [r["method"] for r in data["rows"]] == ["mocov2", "supervised"]
    assert data["shared"]["seed"] == 1 and data["shared"]["train.max_steps"] == 2
    params = {r["params"] for r in data["rows"]}
    assert len(params) == 1  # the same student architecture, backbone only
    for row in data["rows"]:
        assert 0 <= row["knn_top1"] <= 100 and 0 <= row["linear_top1"] <= 100
        assert row["images_per_s"] > 0 and row["steps"] == 2 and not row["reused"]
        assert (Path(row["run"]) / "student.safetensors").is_file()
    md = (out / "compare.md").read_text()
    assert "| method | teacher | student | parameters | kNN top-1 | linear top-1 | images/s | wall time (s) |" in md
    assert md.count("| mocov2 |") == 1 and md.count("| supervised |") == 1
    assert "final InfoNCE" in md and "ln(K+1) = 4.174" in md  # K = 64
    png = out / "compare.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

    # A second call reuses the finished runs instead of training again.
    again = run_compare([a, b], ["seed=1"], out)
    assert all(r["reused"] for r in again["rows"])
    # ... but refuses to overwrite a run folder made with other settings.
    with pytest.raises(UserError, match="differs"):
        run_compare([a, b], ["seed=2"], out)


def test_untrained_row_dogo_peer_row_and_curves(tmp_path, monkeypatch):
    from edgedistill.report import plots

    drawn = {}
    original = plots.training_curves

    def spy(curves, path):
        drawn["curves"] = curves
        return original(curves, path)

    monkeypatch.setattr(plots, "training_curves", spy)
    a = _recipe(tmp_path, "dogo", {"name": "dogo", "peer": {"arch": "resnet20_cifar"}})
    out = tmp_path / "cmp"
    result = run_compare([a], [], out, untrained=True)
    assert [r["method"] for r in result["rows"]] == ["untrained", "dogo", "dogo (peer)"]
    untrained, student, peer = result["rows"]
    assert untrained["steps"] == 0 and untrained["student"] == student["student"] == "mobilenetv3_small_100"
    assert untrained["images_per_s"] is None and untrained["train_wall_s"] is None  # "-" in the table, not 0
    assert peer["student"] == "resnet20_cifar" and peer["params"] != student["params"]
    assert result["complete"] is True
    curves = {c["label"]: c for c in drawn["curves"]}
    assert [r["step"] for r in curves["dogo"]["records"]] == [1, 2]
    assert "ntxent_student" in curves["dogo"]["records"][0] and "kl_student" in curves["dogo"]["records"][0]
    assert (out / "compare.png").is_file()


def test_markdown_marks_an_incomplete_comparison():
    from edgedistill.compare import markdown_table

    row = {"method": "mocov2", "teacher": "-", "student": "resnet18", "params": 11_000_000, "knn_top1": 50.0,
           "linear_top1": 55.5, "images_per_s": 10.0, "train_wall_s": 3.0, "recipe": "a.yaml"}
    md = markdown_table({"shared": {"seed": 0}, "rows": [row], "recipes": ["a.yaml", "b.yaml"], "complete": False})
    assert "| mocov2 | - | resnet18 | 11.00M | 50.00 | 55.50 | 10.0 | 3.0 |" in md
    assert "still to run: b.yaml" in md


def test_teacher_row_is_added_on_reuse_and_scored_like_the_students(tmp_path):
    import torch

    from edgedistill.config import ModelConfig
    from edgedistill.models import create_backbone

    torch.manual_seed(0)
    ckpt = tmp_path / "resnet20.pt"
    torch.save(create_backbone(ModelConfig(arch="resnet20_cifar")).state_dict(), ckpt)
    a = _recipe(tmp_path, "moco", {"name": "mocov2", "queue_size": 64})
    b = _recipe(tmp_path, "disco", {"name": "disco", "queue_size": 64})
    data = yaml.safe_load(b.read_text())
    data["teacher"] = {"arch": "resnet20_cifar", "checkpoint": str(ckpt),
                       "precision": EXACT_TEACHER["teacher.precision"]}
    b.write_text(yaml.safe_dump(data))
    out = tmp_path / "cmp"
    first = run_compare([a, b], [], out)
    assert [r["method"] for r in first["rows"]] == ["mocov2", "disco"]
    assert json.loads((out / "disco" / "eval.json").read_text())["teacher"] is None

    # Asked later, the finished runs are reused and only the teacher is scored, by the same evaluation;
    # its row closes the table whatever the recipes' order.
    result = CliRunner().invoke(app, ["compare", str(b), str(a), "--out", str(out), "--teacher"])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "compare.json").read_text())
    assert [r["method"] for r in data["rows"]] == ["disco", "mocov2", "teacher"] and data["complete"] is True
    teacher = data["rows"][2]
    scores = json.loads((out / "disco" / "eval.json").read_text())["teacher"]
    assert teacher["student"] == "resnet20_cifar" and teacher["teacher"] == "-"
    assert teacher["linear_top1"] == scores["linear_top1"] and 0 <= teacher["knn_top1"] <= 100
    assert teacher["params"] == sum(p.numel() for p in create_backbone(ModelConfig(arch="resnet20_cifar")).parameters())
    assert teacher["images_per_s"] is None and data["rows"][0]["linear_top1"] == first["rows"][1]["linear_top1"]
    assert "| teacher | - | resnet20_cifar |" in (out / "compare.md").read_text()

    with pytest.raises(UserError, match="none of these recipes has a teacher"):
        run_compare([a], [], out, teacher=True)


def test_a_cut_last_metrics_line_is_tolerated(tmp_path, caplog):
    """A run killed mid-write leaves half a JSON line at the end of metrics.jsonl: compare's
    curves skip it (with a warning); a damaged line before the end is an error naming the file."""
    from edgedistill.compare import draw_curves
    from edgedistill.errors import UserError
    from edgedistill.runfolder import read_metrics

    run = tmp_path / "run"
    run.mkdir()
    good = [{"step": s, "loss": 2.0 / s, "lr": 0.1, "images_per_s": 10.0} for s in (1, 2)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in good) + '{"step": 3, "lo')
    with caplog.at_level("WARNING"):
        assert read_metrics(run) == good
    assert "cut" in caplog.text
    row = {"run": str(run), "method": "mocov2", "linear_top1": 50.0}
    assert draw_curves({"rows": [row]}, tmp_path / "compare.png").is_file()
    (run / "metrics.jsonl").write_text('{"step": 1, "lo\n' + json.dumps(good[1]) + "\n")
    with pytest.raises(UserError, match="metrics.jsonl line 1"):
        read_metrics(run)
    assert read_metrics(tmp_path / "nowhere") == []


def test_paired_difference_of_two_runs(evaluated_run):
    """bench/paired_difference.py: the deployable classifier reproduces eval.json's linear top-1
    image for image, and the paired error counts only the images on which two runs disagree."""
    import numpy as np

    from conftest import bench_script

    script = bench_script("paired_difference")
    right, info = script.correct_per_image(evaluated_run)
    assert info["top1"] == pytest.approx(info["eval_json_linear_top1"], abs=0.01) and right.size == info["images"]
    same = script.paired(right, right)
    assert same["difference"] == 0 and same["paired_se"] == 0 and same["unpaired_se"] > 0
    a, b = np.array([1.0] * 60 + [0.0] * 40), np.array([1.0] * 50 + [0.0] * 50)  # b is right on a subset of a's
    row = script.paired(a, b)
    assert row["difference"] == 10.0 and (row["only_first_right"], row["only_second_right"]) == (10, 0)
    assert row["paired_se"] == pytest.approx(100 * np.std(a - b, ddof=1) / 10, abs=1e-3)
    assert row["paired_se"] < row["unpaired_se"]


def test_seed_spread_of_compare_results(tmp_path):
    """bench/seed_spread.py: per method, the spread over seeds of compare results; a difference's
    standard error from that spread (a one-seed method borrows the other's); mixed budgets refused."""
    from conftest import bench_script

    script = bench_script("seed_spread")

    def result(seed: int, rows: dict, steps: int = 6000) -> Path:
        shared = {"seed": seed, "train.max_steps": steps, "train.batch_size": 128, "student.arch": "s", "data.train": "d"}
        path = tmp_path / f"s{seed}_{steps}.json"
        path.write_text(json.dumps({"shared": shared, "rows": [{"method": m, "knn_top1": v, "linear_top1": v + 1}
                                                               for m, v in rows.items()]}))
        return path

    files = [result(0, {"simclr": 30.0, "dogo": 33.0, "untrained": 10.0}), result(1, {"simclr": 32.0}),
             result(2, {"simclr": 34.0})]
    methods = {name: script.summary(rows) for name, rows in script.collect(files).items()}
    assert set(methods) == {"simclr", "dogo"} and methods["simclr"]["seeds"] == [0, 1, 2]
    assert methods["simclr"]["knn_top1"] == {"mean": 32.0, "sd": 2.0} and methods["dogo"]["knn_top1"]["sd"] is None
    diff = script.difference(methods["dogo"], methods["simclr"])["linear_top1"]
    assert diff["difference"] == 1.0 and diff["se"] == pytest.approx((4 / 1 + 4 / 3) ** 0.5, abs=1e-3)
    assert "paired" not in diff  # one shared seed: no paired spread
    files[1] = result(1, {"simclr": 32.0, "dogo": 33.0})  # dogo - simclr per seed: +3, +1
    methods = {name: script.summary(rows) for name, rows in script.collect(files).items()}
    paired = script.difference(methods["dogo"], methods["simclr"])["knn_top1"]["paired"]
    assert paired["seeds"] == [0, 1] and paired["differences"] == [3.0, 1.0]
    assert paired["mean"] == 2.0 and paired["se"] == pytest.approx(1.0)
    with pytest.raises(SystemExit, match="differ in budget"):
        script.collect([files[0], result(3, {"simclr": 30.0}, steps=4000)])
    # an earlier spread is an input: its seeds combine with a later session's (seed 0 from the first input)
    spread = tmp_path / "spread.json"
    assert script.main([*map(str, files), "--diff", "dogo", "simclr", "--out", str(spread)]) == 0
    assert json.loads(spread.read_text())["budgets"] == [[6000, 128, "s", "d"]]
    later = script.collect([spread, result(2, {"simclr": 99.0, "dogo": 31.0})])
    assert sorted(later["dogo"]) == [0, 1, 2] and later["simclr"][2]["knn_top1"] == 34.0
    with pytest.raises(SystemExit, match="differ in budget"):
        script.collect([spread, result(5, {"dogo": 30.0}, steps=4000)])
