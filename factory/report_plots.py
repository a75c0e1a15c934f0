"""The run report's plots: PNG files drawn with matplotlib (Agg backend, no display) from `run_figures`' dict.

Each plot function takes one section of the figures and a path, and returns False (writing nothing) when the
section has nothing to draw. The files are byte-for-byte the same for the same figures (no timestamps in the PNG
metadata), so publishing a run twice uploads nothing the second time.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: a server, CI, a headless container
import matplotlib.pyplot as plt  # noqa: E402

DPI = 100
_METADATA = {"Software": None}  # no matplotlib version in the file: the same figures give the same bytes
KEPT, DROPPED, NEUTRAL = "#2b8a3e", "#c92a2a", "#1c7ed6"


def _save(fig, path: Path) -> bool:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, metadata=_METADATA)
    plt.close(fig)
    return True


def _short(text: str, n: int = 38) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def plot_funnel(funnel: dict, path: Path) -> bool:
    """Left: rows at each step from prompts to kept pairs. Right: pairs dropped, by reason."""
    steps = funnel["steps"]
    if not steps:
        return False
    drops = funnel["dropped"]
    fig, axes = plt.subplots(1, 2, figsize=(12, max(3.0, 0.42 * max(len(steps), len(drops)) + 1.2)),
                             gridspec_kw={"width_ratios": [3, 2]})
    ax = axes[0]
    names = [s["step"] for s in steps][::-1]
    values = [s["n"] for s in steps][::-1]
    colors = [KEPT if n.startswith("kept") else NEUTRAL for n in names]
    bars = ax.barh(range(len(names)), values, color=colors)
    ax.set_yticks(range(len(names)), [_short(n) for n in names])
    ax.bar_label(bars, padding=3, fontsize=8)
    ax.set_xlabel("rows")
    ax.set_title("funnel: prompts to kept pairs")
    ax.margins(x=0.15)
    ax = axes[1]
    if drops:
        reasons = list(drops)[::-1]
        bars = ax.barh(range(len(reasons)), [drops[r] for r in reasons], color=DROPPED)
        ax.set_yticks(range(len(reasons)), [_short(r, 28) for r in reasons])
        ax.bar_label(bars, padding=3, fontsize=8)
        ax.margins(x=0.2)
        ax.set_xlabel("pairs")
    else:
        ax.text(0.5, 0.5, "no pair was dropped", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    ax.set_title("dropped pairs by reason")
    return _save(fig, path)


def _stacked_hist(ax, hist: dict, title: str, xlabel: str) -> None:
    edges = hist["edges"]
    widths = [b - a for a, b in zip(edges, edges[1:])]
    bottom = [0] * len(widths)
    groups = sorted(hist["counts"], key=lambda g: (g != "kept", g))
    for i, g in enumerate(groups):
        counts = hist["counts"][g]
        color = KEPT if g == "kept" else plt.get_cmap("Reds")(0.45 + 0.5 * i / max(1, len(groups)))
        ax.bar(edges[:-1], counts, width=widths, bottom=bottom, align="edge", color=color, edgecolor="white",
               linewidth=0.5, label=_short(g, 24))
        bottom = [b + c for b, c in zip(bottom, counts)]
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("pairs")
    ax.legend(fontsize=8)


def plot_labels(labels: dict, path: Path) -> bool:
    """Histograms of P(chosen) and of the margin of the AI-feedback pairs, kept and dropped stacked."""
    if not labels["label"]["counts"] and not labels["margin"]["counts"]:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.6))
    _stacked_hist(axes[0], labels["label"], "AI-feedback label P(chosen)", "P(chosen)")
    _stacked_hist(axes[1], labels["margin"], "margin 2 P(chosen) - 1", "margin")
    return _save(fig, path)


def plot_principles(principles: list[dict], path: Path) -> bool:
    """Per principle: position consistency and the share of revision comparisons won by the revision."""
    if not principles:
        return False
    names = [p["principle_id"] or "(none)" for p in principles][::-1]
    cons = [p["position_consistency"] or 0.0 for p in principles][::-1]
    rev = [p["prefers_revision"] if p["prefers_revision"] is not None else 0.0 for p in principles][::-1]
    fig, ax = plt.subplots(figsize=(10, max(2.8, 0.36 * len(names) + 1.4)))
    y = range(len(names))
    ax.barh([i + 0.2 for i in y], cons, height=0.4, color=NEUTRAL, label="position consistency")
    ax.barh([i - 0.2 for i in y], rev, height=0.4, color=KEPT, label="prefers the revision")
    ax.set_yticks(list(y), [_short(n, 30) for n in names])
    ax.axvline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of comparisons")
    for i, (c, r) in enumerate(zip(cons, rev)):
        ax.text(min(c, 0.86) + 0.01, i + 0.2, f"{c:.0%}", va="center", fontsize=7)
        ax.text(min(r, 0.86) + 0.01, i - 0.2, f"{r:.0%}", va="center", fontsize=7)
    ax.set_title("per principle", pad=24)
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    return _save(fig, path)


def plot_bias(position: dict, length: dict, path: Path) -> bool:
    """Left: share of judgments choosing (A) per order. Right: label against length difference (kept AI pairs),
    a 2-D histogram with the mean label per length bin."""
    if not position["orders"] and not (length.get("grid")):
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8), gridspec_kw={"width_ratios": [2, 3]})
    ax = axes[0]
    if position["orders"]:
        orders = position["orders"] + [{"answer_order": "all", "chose_a": position["chose_a"]}]
        labels = {"xy": "first as (A)", "yx": "second as (A)", "all": "both orders"}
        vals = [o["chose_a"] or 0.0 for o in orders]
        bars = ax.bar([labels.get(o["answer_order"], o["answer_order"]) for o in orders], vals,
                      color=[NEUTRAL] * (len(orders) - 1) + ["#5f3dc4"])
        ax.bar_label(bars, labels=[f"{v:.0%}" for v in vals], fontsize=8)
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_ylim(0, 1.1)
        ax.set_ylabel("share of judgments choosing (A)")
    else:
        ax.text(0.5, 0.5, "no judgments", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("position bias")
    ax = axes[1]
    grid = length.get("grid")
    if grid:
        xe, ye = grid["x_edges"], grid["y_edges"]
        mesh = ax.pcolormesh(xe, ye, grid["counts"], cmap="Blues", shading="flat")
        fig.colorbar(mesh, ax=ax, label="pairs")
        mids = [(a + b) / 2 for a, b in zip(xe, xe[1:])]
        pts = [(x, m) for x, m in zip(mids, grid["mean_label"]) if m is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color="#e8590c", ms=3, label="mean label")
            ax.legend(fontsize=8, loc="upper left")
        ax.axvline(0, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("length of chosen - length of rejected (characters)")
        ax.set_ylabel("P(chosen)")
        ax.set_ylim(ye[0], ye[-1])
        rate = length.get("longer_wins_rate")
        ax.set_title("length bias: the longer text wins " + ("-" if rate is None else f"{rate:.0%}"))
    else:
        ax.text(0.5, 0.5, "no kept AI-feedback pairs", ha="center", va="center", transform=ax.transAxes)
        ax.set_title("length bias")
    return _save(fig, path)


def plot_calibration(calibration: dict | None, path: Path) -> bool:
    """Reliability diagram of each calibrated judge: accuracy against mean confidence per bin."""
    judges = [j for j in (calibration or {}).get("judges", []) if j["report"].get("reliability")]
    if not judges:
        return False
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="perfect calibration")
    for j in judges:
        rel = [b for b in j["report"]["reliability"] if b.get("n")]
        rep = j["report"]
        name = _short(str(j["model_id"]), 30)
        ece = rep.get("ece")
        ax.plot([b["mean_confidence"] for b in rel], [b["accuracy"] for b in rel], "o-",
                label=f"{name} (ECE {ece:.3f})" if ece is not None else name)
        for b in rel:
            ax.annotate(str(b["n"]), (b["mean_confidence"], b["accuracy"]), fontsize=7, xytext=(3, -9),
                        textcoords="offset points")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("judge confidence")
    ax.set_ylabel("accuracy on the gold set")
    ax.set_title("calibration (reliability)")
    ax.legend(fontsize=7, loc="upper left")
    return _save(fig, path)


def plot_stages(stages: list[dict], path: Path) -> bool:
    """Per stage: output tokens of the run's rows, and this run's rows/s."""
    rows = [s for s in stages if s.get("rows") is not None or s.get("seconds")]
    if not rows:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.2))
    names = [s["stage"] for s in rows]
    for ax, key, title in ((axes[0], "output_tokens", "output tokens (the run's rows)"),
                           (axes[1], "rows_per_s", "rows/s (this run)")):
        vals = [s.get(key) or 0 for s in rows]
        bars = ax.bar(names, vals, color=NEUTRAL)
        ax.bar_label(bars, labels=[f"{v:.3g}" for v in vals], fontsize=8)
        ax.set_title(title)
        ax.tick_params(axis="x", labelrotation=20)
        ax.margins(y=0.2)
    return _save(fig, path)


PLOTS = {"funnel": lambda f, p: plot_funnel(f["funnel"], p),
         "labels": lambda f, p: plot_labels(f["labels"], p),
         "principles": lambda f, p: plot_principles(f["principles"], p),
         "bias": lambda f, p: plot_bias(f["position_bias"], f["length_bias"], p),
         "calibration": lambda f, p: plot_calibration(f["calibration"], p),
         "stages": lambda f, p: plot_stages(f["stages"], p)}


def write_plots(figures: dict, folder: Path) -> dict[str, str]:
    """Every plot that has something to draw, as folder/<name>.png; returns {name: file name}."""
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, plot in PLOTS.items():
        path = folder / f"{name}.png"
        path.unlink(missing_ok=True)  # a plot with nothing to draw this time leaves no stale file
        if plot(figures, path):
            written[name] = path.name
    return written
