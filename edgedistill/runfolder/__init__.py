"""The run folder: the name of every file `train` and `eval` write, and the readers of them.

`RUN_FOLDER` is the one listing of the folder (README.md and docs/design.md are tested against
it). This package owns reading a run folder: here the torch-free readers (the recipe as a dict,
metrics.jsonl, the JSON files), in `runfolder.load` the models (recipe as config, student,
classifier, peer), which `eval`, `export`, `bench` and `report` share. JSON files are written
atomically (`edgedistill.fileio`), tensors through `models.checkpoint`. This module is a leaf
(it imports only `errors`), so models and methods may import its names.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from edgedistill.errors import UserError

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
LOG_FILE = "train.log"
CHECKPOINT_FILE = "checkpoint.pt"
STUDENT_FILE = "student.safetensors"
HEAD_FILE = "head.safetensors"
PEER_FILE = "peer.safetensors"
TEACHER_CENTER_FILE = "teacher_center.json"
TEACHER_FIDELITY_FILE = "teacher_fidelity.json"
TENSORBOARD_DIR = "tensorboard"
EVAL_FILE = "eval.json"
CLASSIFIER_FILE = "classifier.safetensors"
EXPORT_DIR = "export"
REPORT_DIR = "report"

# (name, what it holds): every file or folder a run folder can hold, in the order of the docs.
RUN_FOLDER: tuple[tuple[str, str], ...] = (
    (CONFIG_FILE, "the resolved recipe (itself a valid recipe; what eval, export and compare rebuild from)"),
    (METRICS_FILE, "one JSON object per logging interval (losses, lr, images/s)"),
    (LOG_FILE, "the log"),
    (CHECKPOINT_FILE, "last training checkpoint, written atomically: weights, optimizer, lr schedule, CPU and "
                      "CUDA RNG state, the recipe; --resume continues from it"),
    (STUDENT_FILE, "the student backbone only: what is deployed"),
    (HEAD_FILE, "its projection head (lets the run be a teacher later; never deployed)"),
    (PEER_FILE, "DoGo only: the peer backbone (scored by eval like the student)"),
    (TEACHER_CENTER_FILE, "DisCo/SEED with a head-less teacher: the per-channel mean the teacher target is "
                          "centred by (computed once, reused on --resume)"),
    (TEACHER_FIDELITY_FILE, "DisCo/SEED: the teacher's precision (requested, chosen) and its fidelity to fp32 "
                            "(cosine mean / 0.1% quantile, kNN top-1 both ways)"),
    (TENSORBOARD_DIR + "/", "train.tensorboard: true only: TensorBoard event files of the metrics"),
    (RUN_FILE, "status, steps, loader, images/s, wall time, skipped images, resumes, versions"),
    (EVAL_FILE, "edgedistill eval: kNN / linear top-1, student and optionally teacher"),
    (CLASSIFIER_FILE, "edgedistill eval: the deployed classifier on top of the backbone"),
    (EXPORT_DIR + "/", "edgedistill export: ONNX / INT8 / engines, manifest, device kit"),
    (REPORT_DIR + "/", "edgedistill report: report.json, report.md, plots"),
)


def read_config(run_dir: str | Path) -> dict:
    """`<run>/config.yaml` as a dict (UserError when the folder is not a run)."""
    import yaml

    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{run_dir} is not an edgedistill run folder: {CONFIG_FILE} is missing")
    return yaml.safe_load(path.read_text())


def read_json(path: str | Path, fix: str) -> dict | None:
    """A JSON object of the run folder, None when absent; damaged JSON is a UserError with `fix`."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON ({e}): {fix}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} does not hold a JSON object: {fix}")
    return data


def read_eval(run_dir: str | Path, required: bool = True) -> dict | None:
    """`<run>/eval.json` (what `edgedistill eval` wrote); missing: a UserError saying to run eval
    (None when not `required`)."""
    path = Path(run_dir) / EVAL_FILE
    fix = f"re-run `edgedistill eval {run_dir}`"
    data = read_json(path, fix)
    if data is None:
        if required:
            raise UserError(f"{path} is missing: run `edgedistill eval {run_dir}` first")
        return None
    if "student" not in data:
        raise UserError(f"{path} has no 'student' entry: {fix}")
    return data


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of `<run>/metrics.jsonl` ([] when absent). A cut last line (the run was killed
    mid-write) is skipped with a warning; a bad line before it is an error naming the file."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            if i == len(lines) - 1:
                log.warning("%s: the last line is cut (the run was stopped mid-write): skipped", path)
                continue
            raise UserError(f"{path} line {i + 1} is not JSON: the file was edited or damaged; remove that line") from None
    return records
