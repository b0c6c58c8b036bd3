"""The run folder: the name of every file `train` and `eval` write, in one place (a leaf module).

    <run>/config.yaml            the resolved recipe (what `eval`, `export`, `compare` rebuild from)
    <run>/run.json               summary: status, steps, images/s, final losses, environment
    <run>/metrics.jsonl          one JSON record per logged step
    <run>/train.log              the log
    <run>/checkpoint.pt          model + optimizer + scheduler + RNG state (`--resume`)
    <run>/student.safetensors    the student backbone (what is deployed)
    <run>/head.safetensors       the projection head (training machinery)
    <run>/teacher_center.json    the teacher target's per-channel mean (DisCo/SEED, head-less teachers)
    <run>/teacher_fidelity.json  the teacher's precision: requested, chosen, cosine / kNN vs fp32 (DisCo/SEED)
    <run>/eval.json              `edgedistill eval`: kNN / linear top-1, probe choice, environment
    <run>/classifier.safetensors `edgedistill eval`: the classifier deployed on top of the backbone

JSON files are written atomically (`edgedistill.fileio`), tensors through `models.checkpoint`.
"""

from __future__ import annotations

CONFIG_FILE = "config.yaml"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
LOG_FILE = "train.log"
CHECKPOINT_FILE = "checkpoint.pt"
STUDENT_FILE = "student.safetensors"
HEAD_FILE = "head.safetensors"
TEACHER_CENTER_FILE = "teacher_center.json"
TEACHER_FIDELITY_FILE = "teacher_fidelity.json"
EVAL_FILE = "eval.json"
CLASSIFIER_FILE = "classifier.safetensors"
