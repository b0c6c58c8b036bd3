"""The report's two PNGs and `compare`'s training curves (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

PRECISION_COLORS = {"fp32": "#1f77b4", "fp16": "#2ca02c", "int8": "#d62728", "teacher": "#7f7f7f"}
FORMAT_MARKERS = {"torch": "s", "onnx": "o", "tensorrt": "D", "teacher": "*"}
RUNTIME_MARKERS = ["o", "s", "D", "^", "v", "P", "X", "<", ">"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def accuracy_vs_size(report: dict, path: Path) -> Path:
    """Top-1 against file size (MB, log scale): one point per artifact, the teacher for scale."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.8), dpi=120)
    points = []
    for a in report["artifacts"]:
        if a.get("top1") is None or not a.get("bytes"):
            continue
        points.append((a["bytes"] / 1e6, a["top1"], a["name"], a.get("precision", "fp32"), a.get("format", "onnx")))
    teacher = report.get("models", {}).get("teacher")
    if teacher and teacher.get("linear_top1") is not None and teacher.get("params"):
        points.append((teacher["params"] * 4 / 1e6, teacher["linear_top1"], f"teacher {teacher['arch']} (fp32 est.)",
                       "teacher", "teacher"))
    placed: list[tuple[float, float]] = []
    for size, acc, name, prec, fmt in points:
        ax.scatter(size, acc, s=140 if fmt == "teacher" else 70, c=PRECISION_COLORS.get(prec, "#9467bd"),
                   marker=FORMAT_MARKERS.get(fmt, "o"), edgecolors="black", linewidths=0.6, zorder=3)
        k = _crowding(placed, size, acc)
        ax.annotate(name, (size, acc), textcoords="offset points", xytext=(6, 5 - 11 * k), fontsize=8)
    if points:
        ax.set_xscale("log")
        _pad(ax, [p[0] for p in points], [p[1] for p in points], logx=True)
    ax.set_xlabel("file size (MB, log scale)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"accuracy vs size: {report['models']['student']['arch']}  (up-left is better)", fontsize=10)
    handles = [plt.Line2D([], [], marker="o", ls="", color=c, markeredgecolor="black", label=p)
               for p, c in PRECISION_COLORS.items() if any(pt[3] == p for pt in points)]
    if handles:
        ax.legend(handles=handles, title="precision", fontsize=8, title_fontsize=8, loc="lower right")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def accuracy_vs_latency(report: dict, path: Path, batch: int = 1) -> Path:
    """Top-1 against p50 latency at `batch` (ms, log scale): one point per artifact x runtime x host."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.8), dpi=120)
    acc = {a["name"]: a.get("top1") for a in report["artifacts"]}
    prec = {a["name"]: a.get("precision", "fp32") for a in report["artifacts"]}
    rows = [r for r in report.get("latency", []) if r["batch"] == batch and acc.get(r["artifact"]) is not None]
    runtimes = list(dict.fromkeys(f"{r['runtime']}@{r['host']}" for r in rows))
    markers = {rt: RUNTIME_MARKERS[i % len(RUNTIME_MARKERS)] for i, rt in enumerate(runtimes)}
    labelled = set()
    placed: list[tuple[float, float]] = []
    for r in sorted(rows, key=lambda r: r["p50_ms"]):
        key = f"{r['runtime']}@{r['host']}"
        x, y = r["p50_ms"], acc[r["artifact"]]
        ax.errorbar(x, y, xerr=[[0], [max(r["p99_ms"] - x, 0)]], fmt="none", ecolor="gray", alpha=0.6, zorder=2)
        ax.scatter(x, y, s=70, marker=markers[key], c=PRECISION_COLORS.get(prec[r["artifact"]], "#9467bd"),
                   edgecolors="black", linewidths=0.6, zorder=3)
        if (r["artifact"], key) not in labelled:  # the same pair measured twice: label the faster point
            labelled.add((r["artifact"], key))
            k = _crowding(placed, x, y)
            ax.annotate(f"{r['artifact']}\n{r['runtime']}", (x, y), textcoords="offset points",
                        xytext=(-4, 6 - 20 * k), fontsize=7, ha="right")
    if rows:
        ax.set_xscale("log")
        _pad(ax, [r["p50_ms"] for r in rows] + [r["p99_ms"] for r in rows], [acc[r["artifact"]] for r in rows],
             logx=True)
        handles = [plt.Line2D([], [], marker=markers[rt], ls="", color="white", markeredgecolor="black", label=rt)
                   for rt in runtimes]
        handles += [plt.Line2D([], [], marker="o", ls="", color=c, markeredgecolor="black", label=p)
                    for p, c in PRECISION_COLORS.items() if p in set(prec.values()) and p != "teacher"]
        ax.legend(handles=handles, fontsize=7, loc="lower right")
    else:
        ax.text(0.5, 0.5, f"no latency measured at batch {batch}\n(run `edgedistill bench` first)",
                ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(f"p50 latency at batch {batch} (ms, log scale; whisker to p99)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"accuracy vs latency: {report['models']['student']['arch']}  (up-left is better)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _crowding(placed: list[tuple[float, float]], x: float, y: float) -> int:
    """How many labelled points sit almost on (x, y) (log-x within 8 %, y within 0.6 points);
    records (x, y). Used to stack labels instead of overprinting them."""
    k = sum(1 for px, py in placed if abs(px - x) <= 0.08 * max(px, x) and abs(py - y) <= 0.6)
    placed.append((x, y))
    return k


def _pad(ax, xs, ys, logx: bool) -> None:
    from matplotlib.ticker import FuncFormatter

    lo, hi = min(xs), max(xs)
    if logx:
        ax.set_xlim(lo / 2.5, hi * 3.0)  # room for the labels
        plain = FuncFormatter(lambda v, _pos: f"{v:g}")
        ax.xaxis.set_major_formatter(plain)
        if hi / lo < 30:  # few decades: label the minor ticks too
            ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _pos: f"{v:g}" if str(f"{v:g}")[0] in "1235" else ""))
    ylo, yhi = min(ys), max(ys)
    span = max(yhi - ylo, 2.0)
    ax.set_ylim(ylo - 0.25 * span, yhi + 0.25 * span)


# Loss keys drawn by `training_curves`: the contrastive term and the distillation term of each method.
CONTRASTIVE_KEYS = ("info_nce", "ntxent_student")
DISTILL_KEYS = ("distill", "seed_ce", "kl_student")


def training_curves(curves: list[dict], path: Path) -> Path:
    """`compare`'s PNG: per method, the contrastive loss per step (with ln(K+1), the InfoNCE of an
    encoder that has learnt nothing, dashed for queue methods), the distillation term per step,
    and the final linear top-1 (frozen and, where run, the papers' protocol).

    curves: one dict per row with "label", "records" (metrics.jsonl records), optional
    "queue_size", "linear_top1" and "paper_linear_top1"."""
    import math

    plt = _pyplot()
    fig, (ax_c, ax_d, ax_a) = plt.subplots(1, 3, figsize=(15, 4.5), dpi=110)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, row in enumerate(curves):
        colour = colours[i % len(colours)]
        records = row.get("records") or []
        steps = [r["step"] for r in records]
        for key in CONTRASTIVE_KEYS:
            if records and key in records[0]:
                ax_c.plot(steps, [r[key] for r in records], color=colour, label=f"{row['label']} ({key})")
        if row.get("queue_size"):
            ax_c.axhline(math.log(row["queue_size"] + 1), color=colour, ls="--", lw=0.8,
                         label=f"ln(K+1) = {math.log(row['queue_size'] + 1):.2f} (K={row['queue_size']})")
        for key in DISTILL_KEYS:
            if records and key in records[0]:
                ax_d.plot(steps, [r[key] for r in records], color=colour, label=f"{row['label']} ({key})")
    ax_c.set_title("contrastive loss per step", fontsize=10)
    ax_d.set_title("distillation term per step", fontsize=10)
    for ax in (ax_c, ax_d):
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no such term", ha="center", va="center", transform=ax.transAxes)
    labels = [row["label"] for row in curves]
    frozen = [row.get("linear_top1") for row in curves]
    paper = [row.get("paper_linear_top1") for row in curves]
    xs = list(range(len(curves)))
    width = 0.4 if any(v is not None for v in paper) else 0.8
    ax_a.bar([x - (width / 2 if width < 0.8 else 0) for x in xs], [v or 0 for v in frozen], width, label="frozen probe")
    if width < 0.8:
        ax_a.bar([x + width / 2 for x in xs], [v or 0 for v in paper], width, label="papers' protocol")
    for x, v in zip(xs, frozen):
        if v is not None:
            ax_a.annotate(f"{v:.1f}", (x - (width / 2 if width < 0.8 else 0), v), ha="center", va="bottom", fontsize=7)
    ax_a.set_xticks(xs)
    ax_a.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax_a.set_ylabel("linear top-1 (%) after training")
    ax_a.set_title("linear top-1", fontsize=10)
    ax_a.legend(fontsize=7)
    ax_a.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
