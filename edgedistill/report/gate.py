"""`edgedistill gate REPORT --baseline BASE`: fail CI when a model got worse for its size.

Checks, per gated artifact (default: every artifact of the baseline; `--artifact` narrows it):
- accuracy: top-1 fell more than `max_drop` points below the baseline's;
- size budget: file larger than `max_size_mb`;
- latency budget: p50 at `latency_batch` (any runtime measured) above `max_latency_ms`;
- latency regression: p50 slower than the baseline's by more than `latency_tolerance` percent, for
  the same artifact / runtime / batch / threads, only when measured on the same kind of machine
  (same CPU model and GPU; otherwise the comparison is skipped with a notice: timings from two
  machines say nothing about the model), and skipped as well when the new timing is marked
  unreliable (its spread p90/p50 said the machine was busy);
- dominated: the baseline is at least as accurate *and* at least as small, and strictly better in
  one of them (accuracy ties within `accuracy_noise` points, size within 0.5 %): any loss of
  accuracy must buy a smaller model.
A baseline artifact missing from the report fails too. When report and baseline scored top-1 on
different numbers of images (or one does not say), the accuracy check still compares them and
says so, in its detail and in an `images` notice (a GitHub annotation with `--format github`). Exit 0 when every check holds, 1 otherwise;
bad inputs raise UserError (exit 2) naming the file.

Baseline file ("edgedistill.baseline/1", small enough to commit): the gated numbers of a report
plus the budgets it was written with (flags given on the command line win). A full report
("edgedistill.report/1") is accepted as a baseline as well.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgedistill.errors import UserError
from edgedistill.fileio import write_json

BASELINE_SCHEMA = "edgedistill.baseline/1"
REPORT_SCHEMA = "edgedistill.report/1"
DEFAULTS = {"max_drop": 1.0, "max_size_mb": None, "max_latency_ms": None, "latency_tolerance": 30.0,
            "accuracy_noise": 0.0, "latency_batch": 1, "artifacts": None}
SIZE_NOISE = 0.005  # relative: ONNX files move by a few bytes with metadata


@dataclass
class Check:
    check: str  # accuracy | images | size | latency | latency-regression | dominated | missing | new
    artifact: str
    status: str  # pass | fail | skip
    measured: str = ""
    limit: str = ""
    detail: str = ""


@dataclass
class GateResult:
    report: str
    baseline: str
    budgets: dict
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not any(c.status == "fail" for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.status == "fail"]

    def to_dict(self) -> dict:
        return {"report": self.report, "baseline": self.baseline, "passed": self.passed, "budgets": self.budgets,
                "checks": [asdict(c) for c in self.checks]}


# ----------------------------------------------------------------------------- inputs


def _load(path: Path, what: str) -> dict:
    from edgedistill.kit import load_kit_module

    kit = load_kit_module("edgekit")
    missing = "run `edgedistill report RUN` first" if what == "report" else \
        "create it with `edgedistill gate REPORT --baseline FILE --update-baseline`"
    try:
        return kit.read_json_object(path, f"not an edgedistill {what}", missing=missing)
    except kit.KitError as e:
        raise UserError(f"{what} {e}") from None


def load_report(path) -> dict:
    data = _load(Path(path), "report")
    if data.get("schema") != REPORT_SCHEMA:
        raise UserError(f"report {path} has schema {data.get('schema')!r}, expected {REPORT_SCHEMA!r}: "
                        "rebuild it with `edgedistill report RUN`")
    if not isinstance(data.get("artifacts"), list):
        raise UserError(f"report {path} has no 'artifacts' list: rebuild it with `edgedistill report RUN`")
    return normalize(data)


def load_baseline(path) -> dict:
    data = _load(Path(path), "baseline")
    schema = data.get("schema")
    if schema == REPORT_SCHEMA:
        return normalize(data)
    if schema != BASELINE_SCHEMA:
        raise UserError(f"baseline {path} has schema {schema!r}, expected {BASELINE_SCHEMA!r} "
                        f"(or a {REPORT_SCHEMA!r} report)")
    if not isinstance(data.get("artifacts"), dict):
        raise UserError(f"baseline {path} has no 'artifacts' mapping: rewrite it with --update-baseline")
    data.setdefault("latency", [])
    data.setdefault("budgets", {})
    return data


def normalize(report: dict) -> dict:
    """A report reduced to what the gate compares (this is also the baseline format)."""
    arts = {}
    for a in report["artifacts"]:
        arts[a["name"]] = {k: a.get(k) for k in ("format", "precision", "top1", "n", "bytes", "params", "macs")}
    latency = [{k: r.get(k) for k in ("artifact", "runtime", "host", "cpu", "cpu_features", "gpu", "batch", "threads",
                                      "p50_ms", "p99_ms", "throughput_ips", "unreliable")}
               for r in report.get("latency", [])]
    student = (report.get("models") or {}).get("student") or {}
    return {"schema": BASELINE_SCHEMA, "run": report.get("run"), "student_arch": student.get("arch"),
            "artifacts": arts, "latency": latency, "budgets": report.get("budgets", {})}


def write_baseline(report_path, baseline_path, budgets: dict) -> Path:
    doc = load_report(report_path)
    doc["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    doc["source_report"] = str(report_path)
    doc["budgets"] = {k: v for k, v in budgets.items() if v is not None}
    path = Path(baseline_path)
    write_json(path, doc)
    return path


# ----------------------------------------------------------------------------- checks


def _mb(b) -> str:
    return "-" if b is None else f"{b / 1e6:.3f} MB"


def run_gate(report_path, baseline_path, **flags) -> GateResult:
    """Compare a report with a baseline; flags (None = from the baseline, else the defaults) are the
    budgets: max_drop, max_size_mb, max_latency_ms, latency_tolerance, accuracy_noise,
    latency_batch, artifacts."""
    new = load_report(report_path)
    base = load_baseline(baseline_path)
    budgets = {k: (flags.get(k) if flags.get(k) is not None else base["budgets"].get(k, DEFAULTS[k]))
               for k in DEFAULTS}
    result = GateResult(str(report_path), str(baseline_path), budgets)
    names = budgets["artifacts"] or list(base["artifacts"])
    unknown = [n for n in names if n not in base["artifacts"] and n not in new["artifacts"]]
    if unknown:
        raise UserError(f"--artifact {', '.join(unknown)} is in neither {report_path} nor {baseline_path} "
                        f"(they list {', '.join(sorted(set(base['artifacts']) | set(new['artifacts'])))})")
    checks = result.checks
    for name in names:
        b, n = base["artifacts"].get(name), new["artifacts"].get(name)
        if n is None:
            checks.append(Check("missing", name, "fail", "absent", "present", "in the baseline, not in the report"))
            continue
        # accuracy vs baseline
        if b is None:
            checks.append(Check("accuracy", name, "skip", detail="not in the baseline (new artifact)"))
        elif b.get("top1") is None or n.get("top1") is None:
            checks.append(Check("accuracy", name, "skip", detail="no top-1 in report or baseline"))
        else:
            drop = b["top1"] - n["top1"]
            ok = drop <= budgets["max_drop"] + 1e-9
            images = _image_counts(n.get("n"), b.get("n"))
            checks.append(Check("accuracy", name, "pass" if ok else "fail", f"{n['top1']:.2f}%",
                                f">= {b['top1'] - budgets['max_drop']:.2f}%",
                                f"{(-drop) or 0.0:+.2f} pp vs baseline {b['top1']:.2f}% (max drop {budgets['max_drop']:g})"
                                + (f"; {images}" if images else "")))
            if images:
                checks.append(Check("images", name, "skip", f"{n.get('n') or '?'} images",
                                    f"baseline {b.get('n') or '?'} images", images))
        # size budget
        if budgets["max_size_mb"] is not None:
            if n.get("bytes") is None:
                checks.append(Check("size", name, "skip", detail="file size unknown"))
            else:
                mb = n["bytes"] / 1e6
                ok = mb <= budgets["max_size_mb"]
                checks.append(Check("size", name, "pass" if ok else "fail", f"{mb:.3f} MB",
                                    f"<= {budgets['max_size_mb']:g} MB",
                                    f"{mb - budgets['max_size_mb']:+.3f} MB vs budget"))
        # latency: one number per runtime x machine x threads (the best p50 when measured twice)
        batch = budgets["latency_batch"]
        rows = _best_rows(new["latency"], name, batch)
        if budgets["max_latency_ms"] is not None:
            if not rows:
                checks.append(Check("latency", name, "skip", detail=f"no latency measured at batch {batch}"))
            for r in rows:
                ok = r["p50_ms"] <= budgets["max_latency_ms"]
                checks.append(Check("latency", name, "pass" if ok else "fail", f"{r['p50_ms']:.3f} ms",
                                    f"<= {budgets['max_latency_ms']:g} ms",
                                    f"p50 batch {batch} on {r['runtime']} @ {r['host']} "
                                    f"({r['p50_ms'] - budgets['max_latency_ms']:+.3f} ms vs budget)"))
        # latency regression vs baseline, same machine only
        tol = budgets["latency_tolerance"]
        base_rows = _best_rows(base["latency"], name, batch)
        for r in rows:
            same = [x for x in base_rows if x["runtime"] == r["runtime"] and x.get("threads") == r.get("threads")]
            if not same:
                continue
            machine = [x for x in same if _machine(x) == _machine(r)]
            if machine and r.get("unreliable"):
                checks.append(Check("latency-regression", name, "skip", f"{r['p50_ms']:.3f} ms",
                                    detail=f"{r['runtime']}: timing marked unreliable (the machine was busy): "
                                           "not compared; re-run the benchmark on an idle machine"))
                continue
            if not machine:
                checks.append(Check("latency-regression", name, "skip", f"{r['p50_ms']:.3f} ms",
                                    detail=f"{r['runtime']}: baseline measured on another machine "
                                           f"({' / '.join(str(v) for v in _machine(same[0]))}; this one: "
                                           f"{' / '.join(str(v) for v in _machine(r))})"))
                continue
            ref = min(x["p50_ms"] for x in machine)
            limit = ref * (1 + tol / 100)
            ok = r["p50_ms"] <= limit
            checks.append(Check("latency-regression", name, "pass" if ok else "fail", f"{r['p50_ms']:.3f} ms",
                                f"<= {limit:.3f} ms",
                                f"{(100 * (r['p50_ms'] / ref - 1)) or 0.0:+.1f}% vs baseline {ref:.3f} ms on "
                                f"{r['runtime']} batch {batch} (tolerance {tol:g}%)"))
        # dominated on accuracy vs size
        if b is not None and None not in (b.get("top1"), n.get("top1"), b.get("bytes"), n.get("bytes")):
            eps = budgets["accuracy_noise"]
            acc_le = b["top1"] >= n["top1"] - eps
            size_le = b["bytes"] <= n["bytes"] * (1 + SIZE_NOISE)
            acc_lt = b["top1"] > n["top1"] + eps
            size_lt = b["bytes"] < n["bytes"] * (1 - SIZE_NOISE)
            dominated = acc_le and size_le and (acc_lt or size_lt)
            checks.append(Check("dominated", name, "fail" if dominated else "pass",
                                f"{n['top1']:.2f}% @ {_mb(n['bytes'])}", f"baseline {b['top1']:.2f}% @ {_mb(b['bytes'])}",
                                "the baseline is as accurate and as small, and better in one" if dominated else
                                "not dominated by the baseline"))
    for name in new["artifacts"]:
        if name not in base["artifacts"] and not budgets["artifacts"]:
            checks.append(Check("new", name, "skip", detail="not in the baseline: --update-baseline to track it"))
    return result


def _image_counts(new_n, base_n) -> str:
    """'' when report and baseline scored top-1 on the same number of images, else what differs
    (the accuracy check still compares the two: say so, so that nobody reads the gap as the
    model's alone)."""
    if new_n and base_n and new_n == base_n:
        return ""
    if not new_n or not base_n:
        return (f"image count unknown on the {'report' if not new_n else 'baseline'} side: "
                "the two top-1 may come from different images")
    return (f"top-1 measured on {new_n} images here and on {base_n} in the baseline: different image sets, "
            "so the difference includes their sampling noise (rebuild the baseline with the same --val-count)")


def _machine(row: dict) -> tuple:
    """What must be equal for two latencies to be compared: CPU model, its ISA and cores, GPU."""
    return row.get("cpu"), row.get("cpu_features"), row.get("gpu")


def _best_rows(latency: list[dict], artifact: str, batch: int) -> list[dict]:
    """Rows of `artifact` at `batch`, one per (runtime, host, cpu, gpu, threads): the lowest p50."""
    best: dict[tuple, dict] = {}
    for r in latency:
        if r["artifact"] != artifact or r["batch"] != batch or not r.get("p50_ms"):
            continue
        key = (r["runtime"], r.get("host"), *_machine(r), r.get("threads"))
        if key not in best or r["p50_ms"] < best[key]["p50_ms"]:
            best[key] = r
    return list(best.values())


# ----------------------------------------------------------------------------- output


def format_text(result: GateResult) -> str:
    from io import StringIO

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"gate: {result.report} vs {result.baseline}")
    for col in ("status", "check", "artifact", "measured", "limit", "detail"):
        table.add_column(col, overflow="fold")
    style = {"pass": "green", "fail": "bold red", "skip": "dim"}
    for c in sorted(result.checks, key=lambda c: {"fail": 0, "pass": 1, "skip": 2}[c.status]):
        table.add_row(f"[{style[c.status]}]{c.status.upper()}[/]", c.check, c.artifact, c.measured, c.limit, c.detail)
    buf = StringIO()
    console = Console(file=buf, width=160, force_terminal=False, color_system=None)
    console.print(table)
    fails = result.failures
    verdict = (f"FAILED: {len(fails)} check(s) out of budget" if fails else
               f"PASSED: {sum(c.status == 'pass' for c in result.checks)} check(s) hold")
    console.print(verdict)
    return buf.getvalue()


def _escape(text: str) -> str:  # GitHub workflow-command escaping
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def format_github(result: GateResult) -> str:
    lines = []
    for c in result.checks:
        if c.status == "fail":
            lines.append(f"::error title=edgedistill gate: {c.check} ({c.artifact})::"
                         + _escape(f"{c.artifact}: {c.check} {c.measured} (limit {c.limit}). {c.detail}"))
        elif c.status == "skip" and c.check in ("latency-regression", "new", "images"):
            lines.append(f"::notice title=edgedistill gate: {c.check} ({c.artifact})::" + _escape(c.detail))
    n_pass = sum(c.status == "pass" for c in result.checks)
    if result.passed:
        lines.append(f"::notice title=edgedistill gate passed::{n_pass} check(s) hold against {result.baseline}")
    else:
        lines.append(f"::error title=edgedistill gate failed::{len(result.failures)} check(s) failed, "
                     f"{n_pass} hold (baseline {result.baseline})")
    return "\n".join(lines)


def markdown_summary(result: GateResult) -> str:
    head = "| status | check | artifact | measured | limit | detail |\n|---|---|---|---|---|---|\n"
    body = "".join(f"| {c.status} | {c.check} | {c.artifact} | {c.measured} | {c.limit} | {c.detail} |\n"
                   for c in result.checks)
    title = "passed" if result.passed else f"FAILED ({len(result.failures)} check(s))"
    return f"### edgedistill gate {title}\n\n{head}{body}"
