"""Scale-out on the CPU: `torchrun --nproc-per-node 2 -m edgedistill ...` with the gloo backend.

One test, two real torchrun launches on the embedded digits at 16x16 with the torchvision loader:
the CLI (`-m edgedistill train`), then a script that resumes the run with the same world size and
evaluates it (what `-m edgedistill train --resume` and `-m edgedistill eval` call; one launch
instead of two keeps the test short on 2 cores), then the single-process evaluation of the same
run folder, which must give the same numbers as the distributed one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from conftest import tiny_overrides

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available")


RESUME_AND_EVAL = """
import json, sys
from edgedistill.recipe import load_config
from edgedistill.evaluate import evaluate_run
from edgedistill.train import train

run, overrides = sys.argv[1], json.loads(sys.argv[2])
train(load_config(None, overrides), run, resume=True)
evaluate_run(run)  # reuses the process group train() joined
"""


def _torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _overrides(**extra) -> list[str]:
    base = {"method.name": "mocov2", "data.img_size": 16, "train.batch_size": 16, "train.log_every": 1,
            "train.max_steps": 2}
    base.update(extra)
    return tiny_overrides(**base)


@pytest.mark.slow
def test_torchrun_train_resume_and_exact_eval(tmp_path):
    run = tmp_path / "ddp"
    _torchrun("-m", "edgedistill", "train", *[a for kv in _overrides() for a in ("--set", kv)], "--out", str(run),
              cwd=tmp_path)

    summary = json.loads((run / "run.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2 and summary["loader"] == "torchvision"
    # Only rank 0 writes: one metrics line per logged step, one "done" line in the log, no stray files.
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert (run / "train.log").read_text().count("done: 2 steps") == 1
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoint.pt", "config.yaml", "head.safetensors", "metrics.jsonl", "run.json", "student.safetensors",
        "train.log"]
    ckpt = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["world_size"] == 2

    # Resume with the same world size continues from step 2; then the distributed evaluation.
    script = tmp_path / "resume_and_eval.py"
    script.write_text(RESUME_AND_EVAL)
    _torchrun(str(script), str(run), json.dumps(_overrides(**{"train.max_steps": 3})), cwd=tmp_path)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert json.loads((run / "run.json").read_text())["steps"] == 3
    assert torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)["step"] == 3

    # Distributed evaluation: every image counted once, same numbers as one process.
    ddp = json.loads((run / "eval.json").read_text())
    from edgedistill.evaluate import evaluate_run

    single = evaluate_run(run)
    assert (ddp["n_train"], ddp["n_val"]) == (single.n_train, single.n_val)
    assert ddp["student"]["knn_top1"] == single.student.knn_top1
    # Features are identical up to float summation order (other batch split): allow one image.
    assert abs(ddp["student"]["linear_top1"] - single.student.linear_top1) <= 100 / single.n_val + 1e-6


def _gather_worker(rank: int, world: int, init_file: str, sizes: list[int], queue) -> None:
    import math

    from edgedistill import distributed as du

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for n in sizes:
            per = math.ceil(n / world)
            idx = torch.arange(rank * per, min(n, (rank + 1) * per))  # extract_features' contiguous shard
            feats = torch.stack([torch.full((4,), float(i)) for i in idx]) if len(idx) else torch.empty(0, 4)
            all_f, all_y = du.gather_shards(feats, idx, per)
            if rank == 0:
                queue.put((n, all_f[:, 0].tolist(), all_y.tolist()))
    finally:
        dist.destroy_process_group()


def test_gather_shards_counts_every_sample_once(tmp_path):
    """3 ranks, uneven shards and (n=2) an empty one: the gathered result is 0..n-1 in order."""
    import torch.multiprocessing as mp

    sizes = [2, 7, 9]
    queue = mp.get_context("spawn").Queue()
    mp.start_processes(_gather_worker, args=(3, str(tmp_path / "rdzv"), sizes, queue), nprocs=3, start_method="spawn")
    for n in sizes:
        got_n, feats, labels = queue.get(timeout=60)
        assert got_n == n and labels == list(range(n)) and feats == [float(i) for i in range(n)]


def test_gather_shards_single_process_is_identity():
    from edgedistill.distributed import gather_shards

    f, y = torch.randn(5, 3), torch.arange(5)
    gf, gy = gather_shards(f, y, per_rank=5)
    assert torch.equal(gf, f) and torch.equal(gy, y)


def _collective_worker(rank: int, world: int, init_file: str, queue) -> None:
    """Two checks in one launch (each spawn costs seconds): cross-rank shuffle-BN returns each
    key to its own row, and a NaN seen by one rank stops every rank with exit code 3."""
    from pathlib import Path

    import typer

    from edgedistill.cli_helpers import handle_errors
    from edgedistill.methods.components import ShuffleBN
    from edgedistill.train import _check_finite

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        local = 8
        x = (torch.arange(rank * local, (rank + 1) * local, dtype=torch.float32)[:, None] * torch.ones(1, 3))
        seen: list[float] = []

        def encoder(group: torch.Tensor) -> torch.Tensor:  # row-wise, plus the group's own statistic
            seen.extend(group[:, 0].tolist())
            return torch.cat([2 * group, group[:, :1].mean(0, keepdim=True).expand(len(group), 1)], dim=1)

        shuffle = ShuffleBN(splits=2, seed=0)
        restored = [shuffle(encoder, x, call).tolist() for call in range(3)]
        result = {"restored": restored, "x": x.tolist(), "seen": seen}

        losses = {"loss": torch.tensor(float("nan") if rank == 1 else 1.0)}
        try:
            handle_errors(lambda: _check_finite(losses, 7, Path(init_file + ".ckpt")))()
            result["exit"] = 0
        except typer.Exit as e:
            result["exit"] = e.exit_code
        dist.barrier()  # both ranks got here: nobody waits in a collective the other skipped
        queue.put((rank, result))
    finally:
        dist.destroy_process_group()


def test_cross_rank_shuffle_bn_unshuffles_and_nan_stops_every_rank(tmp_path):
    import torch.multiprocessing as mp

    queue = mp.get_context("spawn").Queue()
    mp.start_processes(_collective_worker, args=(2, str(tmp_path / "rdzv"), queue), nprocs=2, start_method="spawn")
    results = dict(queue.get(timeout=60) for _ in range(2))
    for rank, r in results.items():
        for out in r["restored"]:
            # Each row comes back to the rank and row its key came from, encoded by a rank.
            assert [row[:3] for row in out] == [[2 * v for v in row] for row in r["x"]], rank
        own = {row[0] for row in r["x"]}
        assert set(r["seen"]) - own, f"rank {rank} only ever encoded its own keys: not shuffled across ranks"
        assert r["exit"] == 3, f"rank {rank} did not stop on the other rank's NaN (exit {r['exit']})"
    # Group statistics differ from a plain BN over the whole batch: the groups are real.
    means = {row[3] for out in results[0]["restored"] for row in out}
    assert len(means) > 1
