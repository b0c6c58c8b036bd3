"""`edgedistill export`: ONNX fp32/fp16/INT8 artifacts checked on real validation images,
manifest + metadata, calibration cache, the --max-drop fallback, TensorRT skip, bad input.

Uses the session's tiny evaluated run (mobilenetv3_small_100, 32x32 digits); calibration and
validation counts are kept small so the file runs in about a minute on 2 cores.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edgedistill.cli import app
from edgedistill.deploy import quantize as q

FAST = {"val_count": 96, "calib_count": 48, "timing_budget_s": 0.15}


@pytest.fixture(scope="module")
def export_dir(evaluated_run, tmp_path_factory) -> Path:
    """fp32 + fp16 + INT8 for ort-cpu (format timed here), with the sensitivity report."""
    from edgedistill.deploy import export_run

    out = tmp_path_factory.mktemp("export") / "full"
    cache = tmp_path_factory.mktemp("calib-cache")
    return export_run(evaluated_run, int8=True, fp16=True, out=out, sensitivity=True, max_drop=100.0,
                      cache_dir=cache, **FAST)


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def test_export_writes_checked_artifacts(export_dir, evaluated_run):
    import hashlib

    m = _manifest(export_dir)
    assert m["schema"] == "edgedistill.export/1"
    assert m["status"] == "ok" and m["kind"] == "classifier"
    assert m["source_run"] == str(Path(evaluated_run).resolve())
    assert m["input"]["shape"] == ["batch", 3, 32, 32] and m["input"]["mean"] and m["input"]["std"]
    assert len(m["classes"]) == 10
    assert m["environment"]["versions"]["onnxruntime"]
    arts = {a["name"]: a for a in m["artifacts"]}
    assert {"torch-fp32", "onnx-fp32", "onnx-fp16"} <= set(arts)
    int8 = [a for a in arts.values() if a["precision"] == "int8"]
    assert len(int8) == 1
    assert arts["onnx-fp32"]["parity"]["passed"] and arts["onnx-fp16"]["parity"]["passed"]
    assert arts["onnx-fp32"]["accuracy"]["agreement"] >= 99.0
    assert arts["onnx-fp32"]["accuracy"]["top1"] == pytest.approx(arts["torch-fp32"]["accuracy"]["top1"], abs=1.1)
    assert "drop_vs_fp32" in int8[0]["accuracy"] and "top1" in int8[0]["accuracy"]
    # Sizes: fp16 about half, INT8 smaller than fp32.
    assert arts["onnx-fp16"]["bytes"] < 0.6 * arts["onnx-fp32"]["bytes"]
    assert int8[0]["bytes"] < arts["onnx-fp32"]["bytes"]
    # Every file listed with a correct sha256.
    listed = {f["path"]: f for f in m["files"]}
    for name in ("model.onnx", "model.fp16.onnx", int8[0]["file"], "accuracy.json", "sample_inputs.npy",
                 "sample_labels.npy", "kit/build_engine.py", "calibration.json", "sensitivity.json"):
        assert name in listed, name
        assert hashlib.sha256((export_dir / name).read_bytes()).hexdigest() == listed[name]["sha256"]
    acc = json.loads((export_dir / "accuracy.json").read_text())
    assert set(acc["artifacts"]) == set(arts) and acc["validation"]["images"] == FAST["val_count"]
    # --placement auto: both placements scored (and timed: this machine is of the declared class), one kept;
    # the recommendation names an artifact of the export and its reason.
    choice = m["int8"]["placement_choice"]
    assert set(choice["held_out_divergence"]) == {"tuned", "split-hardswish"} and choice["measured"]
    assert choice["chosen"] in choice["held_out_divergence"] and set(choice["latency_ms_batch1"]) >= {"fp32", "tuned"}
    # --calibrator auto chose once, on the tuned placement; the other placement reuses the choice.
    calibration = m["int8"]["calibration"]
    assert calibration["label"] == min(calibration["auto_scores"], key=lambda s: s["output_divergence"])["calibrator"]
    assert calibration.get("chosen_on") == (None if choice["chosen"] == "tuned" else "tuned")
    rec = m["recommendation"]
    assert rec["artifact"] in arts and rec["reason"]
    # timed on every CPU runtime installed (the test extra has OpenVINO), and it names the runtime to use
    assert set(rec["latency_ms_batch1"]) == set(q.cpu_runtimes()) >= {"ort-cpu", "openvino-cpu"}
    assert rec["runtime"] in rec["latency_ms_batch1"]
    assert m["int8"]["scored_with"]["exact"] is False  # declared class auto = this machine: its own kernels


def test_onnx_files_carry_metadata(export_dir):
    import onnx

    from edgedistill.deploy.onnx_export import read_metadata

    for name in ("model.onnx", "model.fp16.onnx", *[p.name for p in export_dir.glob("model.int8.*.onnx")]):
        meta = read_metadata(export_dir / name)
        pre = json.loads(meta["edgedistill.preprocess"])
        assert pre["input_size"] == [3, 32, 32] and pre["center_crop"] == 32 and len(pre["mean"]) == 3
        assert len(json.loads(meta["edgedistill.classes"])) == 10
        assert meta["edgedistill.version"] and meta["edgedistill.source_run"]
        model = onnx.load(str(export_dir / name))
        batch = model.graph.input[0].type.tensor_type.shape.dim[0]
        assert batch.dim_param, f"{name}: batch dimension is not dynamic"
        assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_sample_inputs_are_real_preprocessed_images(export_dir):
    from edgedistill.deploy.runtime import run, session

    x, y = np.load(export_dir / "sample_inputs.npy"), np.load(export_dir / "sample_labels.npy")
    assert x.dtype == np.float32 and x.shape == (32, 3, 32, 32) and y.shape == (32,) and y.dtype == np.int64
    assert x.std() > 0.1  # normalised images, not zeros
    logits = run(session(export_dir / "model.onnx"), x)
    assert logits.shape == (32, 10)


def test_int8_format_is_measured_for_ort_cpu(export_dir):
    m = _manifest(export_dir)
    choice = m["int8"]["format_choice"]
    assert choice["measured"] is True
    lat = choice["latency_ms_batch1"]
    assert set(lat) == {"fp32", "qdq-s8s8-sym", "qdq-u8s8"} and all(v > 0 for v in lat.values())
    assert choice["chosen"] == min(("qdq-s8s8-sym", "qdq-u8s8"), key=lat.get)
    assert choice["chosen"] in choice["reason"]
    calib = m["int8"]["calibration"]
    assert calib["images"] + calib["held_out_images"] == FAST["calib_count"] and calib["held_out_images"] > 0
    assert m["int8"]["max_drop"]["reached"] and m["int8"]["max_drop"]["kept_in_float"] == []
    sens = json.loads((export_dir / "sensitivity.json").read_text())
    layers = sens["layers"]
    assert layers and {"node", "op", "gain", "divergence_with_layer_in_float"} <= set(layers[0])
    # every INT8 layer but the one whose output the pooling averages (it writes float: part of the head) is ranked
    assert len(layers) == m["int8"]["int8_layers"]["int8"] - 1
    assert not {r["node"] for r in layers} & set(m["int8"]["placement"]["float_nodes"])
    assert [r["gain"] for r in layers] == sorted((r["gain"] for r in layers), reverse=True)
    assert "held-out calibration images" in sens["measured_on"]


def test_calibration_cache_key_and_invalidation(export_dir, evaluated_run, tmp_path):
    from edgedistill.deploy import data as ddata
    from edgedistill.deploy.onnx_export import load_deployable, preprocess_spec

    dep = load_deployable(evaluated_run)
    files, _ = ddata.calibration_files(dep.cfg, None, 16, True)
    pre = tmp_path / "pre.onnx"
    q.prepare(export_dir / "model.onnx", pre)
    spec = preprocess_spec(dep)

    def calib(model=pre, fl=files, settings=q.QuantSettings()):
        return q.Calibration(model, fl, ddata.file_list_fingerprint(fl), settings, spec, tmp_path / "cache",
                             lambda: ddata.make_reader(fl, dep.cfg, "input", 8))

    first = calib()
    assert not first.hit
    first.ensure(pre)
    assert first.path.is_file() and json.loads(first.path.read_text())
    again = calib()
    assert again.hit and again.key == first.key
    # Any change of model bytes, calibration files or settings is a different key (a miss).
    assert not calib(fl=files[:-1]).hit
    assert not calib(settings=q.QuantSettings(calibrator="percentile")).hit
    assert calib(settings=q.QuantSettings(calibrator="percentile", percentile=99.9)).key != \
        calib(settings=q.QuantSettings(calibrator="percentile", percentile=99.99)).key
    other = tmp_path / "other.onnx"
    other.write_bytes(pre.read_bytes() + b"\0")
    assert not calib(model=other).hit
    # A file touched after calibration (new mtime) is a new key too.
    copy_dir = tmp_path / "imgs"
    copy_dir.mkdir()
    copies = [shutil.copy(f, copy_dir / f"{i}.png") for i, f in enumerate(files[:4])]
    k1 = calib(fl=copies).key
    Path(copies[0]).write_bytes(Path(files[5]).read_bytes())
    assert calib(fl=copies).key != k1
    # The cached ranges are used: quantizing on a hit never reads a calibration image.
    def no_reader():
        raise AssertionError("calibration images read despite a cache hit")

    hit = q.Calibration(pre, files, ddata.file_list_fingerprint(files), q.QuantSettings(), spec, tmp_path / "cache", no_reader)
    assert hit.hit
    q.quantize(pre, tmp_path / "a.onnx", "qdq-s8s8-sym", hit, q.make_plan("tensorrt", pre))
    assert (tmp_path / "a.onnx").stat().st_size > 0


def test_fallback_search_judges_on_held_out_images_and_confirms_on_validation():
    """The walk is judged on the held-out calibration images; the validation images, whose drop the
    manifest reports, only confirm the first trial that fits there (and a failed confirmation goes on)."""
    from edgedistill.deploy.quantize import fallback

    ranked = [f"n{i}" for i in range(20)]
    judged, confirmed = [], []

    def judge(excluded):  # held-out drop falls as more of the ranked layers stay in float: 10 - k/2
        judged.append(len(excluded))
        return max(0.0, 10 - len(excluded) / 2)

    def confirm(excluded, offset=0.0):
        confirmed.append(len(excluded))
        d = max(0.0, 10 - len(excluded) / 2) + offset
        return {"top1": 90 - d}, d

    excluded, _, drop, trials, reached = fallback(ranked, judge, confirm, max_drop=3.0, max_layers=20)
    assert reached and excluded == [f"n{i}" for i in range(14)] and drop <= 3.0
    assert judged == list(range(1, 15)) and confirmed == [14]  # greedy; validation seen once, for the choice
    assert [t["kept_in_float"] for t in trials] == judged and [t for t in trials if "drop" in t] == [trials[-1]]
    # The validation images disagree with the held-out ones (0.6 points worse): the walk goes on past
    # the first held-out fit until the validation drop fits too, confirming each step.
    judged.clear(), confirmed.clear()
    excluded, _, drop, trials, reached = fallback(ranked, judge, lambda ex: confirm(ex, 0.6), 3.0, 20)
    assert reached and len(excluded) == 16 and confirmed == [14, 15, 16] and drop == 2.6
    # Not reachable within the cap: the trial judged best, confirmed, reported as not reached.
    judged.clear(), confirmed.clear()
    excluded, _, drop, _trials, reached = fallback(ranked, judge, confirm, max_drop=3.0, max_layers=4)
    assert not reached and excluded == ranked[:4] and drop == 8.0 and judged == [1, 2, 3, 4] and confirmed == [4]
    excluded, _, drop, _, reached = fallback(ranked, lambda ex: 50.0, lambda ex: ({"top1": 0}, 50.0), 1.0, 20)
    assert not reached and len(excluded) == 1


def test_expected_drop_is_fp32s_own_probability_lost():
    """The label-free drop: nothing when the decisions agree; a flip between near-tied classes costs
    little, a flip of a confident decision almost a whole image."""
    import numpy as np

    from edgedistill.deploy.quantize import expected_drop

    ref = np.array([[5.0, 0.0, 0.0], [0.01, 0.0, -3.0]])
    assert expected_drop(ref, ref) == 0.0
    tie_flip = expected_drop(ref, np.array([[5.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    confident_flip = expected_drop(ref, np.array([[0.0, 1.0, 0.0], [0.01, 0.0, -3.0]]))
    assert 0 < tie_flip < 1.0 and 45 < confident_flip < 50  # of 2 images: half of ~0.99 probability lost


def test_parity_failure_exits_1(evaluated_run, tmp_path):
    result = CliRunner().invoke(app, ["export", str(evaluated_run), "--out", str(tmp_path / "ex"),
                                      "--tolerance", "1e-12", "--val-count", "32"])
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert "disagrees with torch" in text and "max |diff|" in text
    m = _manifest(tmp_path / "ex")
    assert m["status"] == "parity_failed" and m["problems"]


def test_tensorrt_target_without_tensorrt(evaluated_run, tmp_path):
    from edgedistill.deploy import export_run
    from edgedistill.deploy.tensorrt import status

    ok, reason, _ = status()
    if ok:
        pytest.skip("TensorRT and a GPU are present here: the skip path cannot be tested")
    out = export_run(evaluated_run, int8=True, target="tensorrt", calibrator="minmax", out=tmp_path / "trt",
                     cache_dir=tmp_path / "c", val_count=48, calib_count=32)
    m = _manifest(out)
    trt = m["tensorrt"]
    assert trt["built"] is False and trt["reason"] == reason and "\n" not in reason
    assert (out / "model.int8.s8s8.onnx").is_file()
    art = next(a for a in m["artifacts"] if a["precision"] == "int8")
    assert art["target"] == "tensorrt" and art["quantization"]["name"] == "qdq-s8s8-sym"
    assert m["int8"]["format_choice"]["measured"] is False
    cmds = {c["name"]: c for c in trt["commands"]}
    assert "--stronglyTyped" in cmds["trt-int8"]["trtexec"] and "--fp16" in cmds["trt-fp16"]["trtexec"]
    assert "--minShapes=input:1x3x32x32" in cmds["trt-fp16"]["trtexec"]
    # Symmetric signed INT8: every activation/weight zero point is 0 and int8.
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(out / "model.int8.s8s8.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    zps = [n.input[2] for n in model.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2]
    assert zps
    for z in zps:
        arr = numpy_helper.to_array(inits[z])
        assert arr.dtype == np.int8 and not arr.any()


@pytest.mark.parametrize(("better", "auto_qad"), [(True, False), (False, False), (True, True)])
def test_max_drop_not_reachable_exits_1(evaluated_run, tmp_path, monkeypatch, better, auto_qad):
    import edgedistill.deploy.exporter as exporter
    import edgedistill.deploy.quantize as q

    # The search itself is tested above; here: what happens when no float fallback fits. The
    # best trial is kept when it beats the all-INT8 model, else the all-INT8 model is. Without
    # --qad-steps, QAD comes after the failed fallback, and the fallback is tried again on its model.
    monkeypatch.setattr(q, "layer_sensitivity", lambda *a, **k: {"layers": [{"node": "n0", "gain": 1.0}]})
    monkeypatch.setattr(exporter, "DEFAULT_QAD_STEPS", 2)

    def never(ranked, judge, confirm, max_drop, max_layers):
        m, d = confirm([])
        assert d > max_drop
        best = d / 2 if better else d + 1.0
        return ["n0"], m, best, [{"kept_in_float": 1, "judged_drop": best, "drop": best}], False

    monkeypatch.setattr(q, "fallback", never)
    result = CliRunner().invoke(app, ["export", str(evaluated_run), "--int8", "--int8-format", "qdq-u8s8", "--max-drop", "0",
                                      "--calibrator", "minmax", "--placement", "tuned",
                                      *([] if auto_qad else ["--qad-steps", "0"]), "--calib-count", "32",
                                      "--val-count", "48", "--out", str(tmp_path / "ex")])
    assert result.exit_code == 1, result.output
    assert "cannot be brought within --max-drop" in " ".join(result.output.split())
    m = _manifest(tmp_path / "ex")
    fallback = m["int8"]["max_drop"]
    assert m["status"] == "max_drop_not_reached" and fallback["reached"] is False
    assert fallback["kept_in_float"] == (["n0"] if better else [])
    if auto_qad:
        assert m["int8"]["qad"]["steps"] == 2 and fallback["before_qad"]["reached"] is False
    else:
        assert m["int8"]["qad"] is None and "before_qad" not in fallback


def test_run_without_classifier_exports_embedding(evaluated_run, tmp_path, caplog):
    from edgedistill.deploy import export_run

    run = tmp_path / "run"
    shutil.copytree(evaluated_run, run, ignore=shutil.ignore_patterns("classifier.safetensors", "export*", "*.pt"))
    with caplog.at_level("WARNING", logger="edgedistill"):
        out = export_run(run, val_count=32)
    assert "exporting the embedding model" in caplog.text
    m = _manifest(out)
    assert m["kind"] == "embedding" and m["output"]["name"] == "embedding" and m["classes"] is None
    onnx_art = next(a for a in m["artifacts"] if a["name"] == "onnx-fp32")
    assert onnx_art["parity"]["passed"] and onnx_art["accuracy"]["min_cosine"] > 0.999


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--int8", "--calib-data", "/nonexistent/calib"], "does not exist"),
        (["--int8", "--calib-count", "100000"], "fewer than --calib-count"),
        (["--target", "jetson"], "--target"),
        (["--int8", "--calibrator", "kl"], "--calibrator"),
        (["--int8", "--target", "tensorrt", "--int8-format", "qdq-u8s8"], "symmetric"),
        (["--val-count", "0"], "--val-count must be at least 1"),
    ],
)
def test_bad_input_exits_2(evaluated_run, tmp_path, args, needle):
    result = CliRunner().invoke(app, ["export", str(evaluated_run), "--out", str(tmp_path / "ex"), *args])
    assert result.exit_code == 2, result.output
    assert needle in " ".join(result.output.split())


def test_missing_run_folder_exits_2(tmp_path):
    result = CliRunner().invoke(app, ["export", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "does not exist" in " ".join(result.output.split())


def test_calib_folder_with_too_few_images(evaluated_run, tmp_path):
    from PIL import Image

    calib = tmp_path / "calib"
    calib.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 40), (i * 50, 0, 0)).save(calib / f"{i}.png")
    result = CliRunner().invoke(app, ["export", str(evaluated_run), "--int8", "--calib-data", str(calib),
                                      "--calib-count", "10", "--out", str(tmp_path / "ex")])
    assert result.exit_code == 2
    assert "holds 3 images, fewer than --calib-count 10" in " ".join(result.output.split())


def test_build_engine_kit_is_torch_free_and_prints_trtexec(export_dir):
    kit = export_dir / "kit" / "build_engine.py"
    code = (f"import sys, runpy; sys.argv = ['build_engine.py', {str(export_dir / 'model.int8.s8s8.onnx')!r}, "
            f"'--int8', '--print-trtexec']; sys.modules['torch'] = None; runpy.run_path({str(kit)!r}, run_name='__main__')")
    # The s8s8 file is not in this ort-cpu export unless chosen; any ONNX file works for the command.
    onnx_file = export_dir / "model.onnx"
    code = code.replace(str(export_dir / "model.int8.s8s8.onnx"), str(onnx_file))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "trtexec" in res.stdout and "--stronglyTyped" in res.stdout and "input:32x3x32x32" in res.stdout
    # Building without TensorRT: exit 2 and a one-line reason.
    from edgedistill.deploy.tensorrt import build_engine_module

    if build_engine_module().tensorrt_available()[0]:
        return
    res = subprocess.run([sys.executable, str(kit), str(onnx_file), "--fp16"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "TensorRT" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_clean_refuses_manifest_paths_outside_the_folder(tmp_path):
    """An earlier manifest names the files to remove; a path that leaves the export folder (a
    tampered or foreign manifest) must not delete anything, and is an error naming the manifest."""
    from edgedistill.deploy.exporter import _clean
    from edgedistill.errors import UserError

    out = tmp_path / "ex"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "x.onnx").write_text("keep me too")
    (out / "link").symlink_to(outside)
    (out / "model.onnx").write_text("old")
    for bad in ["../victim.txt", str(victim), "link/x.onnx"]:
        (out / "manifest.json").write_text(json.dumps({"files": [{"path": "model.onnx"}, {"path": bad}]}))
        with pytest.raises(UserError, match="outside"):
            _clean(out)
        assert victim.read_text() == "keep me" and (outside / "x.onnx").is_file()
        assert (out / "model.onnx").is_file()  # nothing is removed when the manifest is refused
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="manifest.json"):
        _clean(out)
    (out / "manifest.json").write_text(json.dumps({"files": [{"path": "model.onnx"}, {"path": "engines/a.engine"}]}))
    (out / "engines").mkdir()
    (out / "engines" / "a.engine").write_text("kept")
    _clean(out)
    assert not (out / "model.onnx").exists() and (out / "engines" / "a.engine").is_file()


def test_clean_refusal_is_exit_2_from_the_cli(evaluated_run, tmp_path):
    out = tmp_path / "ex"
    out.mkdir()
    (tmp_path / "victim.txt").write_text("keep me")
    (out / "manifest.json").write_text(json.dumps({"files": [{"path": "../victim.txt"}]}))
    result = CliRunner().invoke(app, ["export", str(evaluated_run), "--out", str(out), "--val-count", "8"])
    assert result.exit_code == 2, result.output
    assert "outside" in " ".join(result.output.split()) and (tmp_path / "victim.txt").is_file()


@pytest.mark.parametrize("count, batch, expected", [(37, 32, (19, 1)), (31, 32, (31, 0)), (64, 32, (32, 0)),
                                                    (97, 32, (25, 3)), (1, 32, (1, 0)), (96, 32, (32, 0))])
def test_calibration_batches_are_equal_and_never_1_for_primes(count, batch, expected):
    from edgedistill.deploy.data import calibration_batching

    got = calibration_batching(count, batch)
    assert got == expected
    b, pad = got
    assert b <= batch and (count + pad) % b == 0 and pad < (count + pad) // b


def test_calibration_reader_pads_the_last_batch(evaluated_run, tmp_path):
    from PIL import Image

    from edgedistill.deploy import data as ddata
    from edgedistill.deploy.onnx_export import load_deployable

    cfg = load_deployable(evaluated_run).cfg
    paths = []
    for i in range(7):  # prime
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (32, 32), (i * 30, 0, 0)).save(p)
        paths.append(str(p))
    reader = ddata.make_reader(paths, cfg, "input", batch_size=4)
    shapes = []
    while (batch := reader.get_next()) is not None:
        shapes.append(batch["input"].shape[0])
    assert shapes == [4, 4]  # 7 images + 1 repeated, not seven batches of 1


def test_image_walk_survives_a_symlink_cycle(tmp_path):
    from PIL import Image

    from edgedistill.data.folder import scan_folder
    from edgedistill.deploy.data import list_images

    root = tmp_path / "data"
    (root / "a" / "sub").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "a" / "x.png")
    Image.new("RGB", (8, 8)).save(root / "a" / "sub" / "y.png")
    (root / "a" / "sub" / "loop").symlink_to(root / "a")  # a cycle
    (root / "a" / "again").symlink_to(root / "a" / "sub")  # a second way into one folder
    assert sorted(Path(p).name for p in list_images(root)) == ["x.png", "y.png"]  # each once, and it ends
    folder = scan_folder(root, workers=1)
    assert sorted(Path(p).name for p, _ in folder.samples) == ["x.png", "y.png"]


def test_sample_arrays_and_metadata_stamp_are_atomic(tmp_path, monkeypatch):
    """A failing write leaves the previous file whole (no half-written .npy or .onnx)."""
    import onnx
    from onnx import helper

    from edgedistill.deploy.onnx_export import read_metadata, stamp_metadata
    from edgedistill.fileio import save_npy

    save_npy(tmp_path / "s.npy", np.arange(4))
    assert np.load(tmp_path / "s.npy").tolist() == [0, 1, 2, 3] and not (tmp_path / "s.npy.npy").exists()
    monkeypatch.setattr(np, "save", lambda f, a: (f.write(b"half"), (_ for _ in ()).throw(OSError("disk full"))))
    with pytest.raises(OSError):
        save_npy(tmp_path / "s.npy", np.arange(8))
    monkeypatch.undo()
    assert np.load(tmp_path / "s.npy").tolist() == [0, 1, 2, 3]

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph), str(path))
    stamp_metadata(path, {"edgedistill.kind": "classifier"})
    assert read_metadata(path)["edgedistill.kind"] == "classifier"
    before = path.read_bytes()

    def broken_save(proto, f):
        Path(f).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(onnx, "save", broken_save)
    with pytest.raises(OSError):
        stamp_metadata(path, {"edgedistill.kind": "embedding"})
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "s.npy"]
