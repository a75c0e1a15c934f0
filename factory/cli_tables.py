"""What the `factory` command prints: its stdout/stderr consoles, the error exit, and the rich tables (run summary,
tokens, cost, contamination, estimate, judge report, guard, calibration, metrics, policies, recipe, status)."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

out = Console()
err = Console(stderr=True)


def fail(msg: str, code: int) -> None:
    """Print the error on stderr and exit with CODE (1 failure, 2 bad input)."""
    err.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def print_summary(result, config: str) -> None:
    table = Table(title=f"run {result.run_id}: {result.status} in {result.seconds:.1f} s")
    for col in ("table", "rows (this pipeline)"):
        table.add_column(col)
    for name, counts in result.scope_counts.items():
        table.add_row(name, ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "0")
    drops = ", ".join(f"{v} {k}" for k, v in sorted(result.pair_counts.items()))
    table.add_row("preference_pairs", drops or "0")
    out.print(table)
    tok = Table(title="tokens spent in this run")
    for col in ("stage", "model", "rows", "prompt tok", "output tok", "output tok/s"):
        tok.add_column(col, justify="right" if col != "stage" and col != "model" else "left")
    for key, s in result.stats.items():
        stage, model = key.split("|", 1)
        rate = s["output_tokens"] / s["seconds"] if s["seconds"] else 0.0
        tok.add_row(stage, model, str(s["rows"]), str(s["prompt_tokens"]), str(s["output_tokens"]), f"{rate:.0f}")
    if result.stats:
        out.print(tok)
    else:
        out.print("no model calls: every row was already stored", highlight=False)
    if result.judge_report:
        print_judge_report(result.judge_report)
    if result.contamination:
        print_contamination(result.contamination)
    if result.cost:
        print_cost(result.cost, f"cost of run {result.run_id}'s data")
    out.print(f"store: [bold]{result.store_path}[/]")
    if result.example_pair:
        ex = result.example_pair
        out.print(f"\n[bold]example pair[/] (principle {ex['principle_id']})\n  prompt:   {ex['prompt']}\n"
                  f"  chosen:   {ex['chosen_text'][:300]}\n  rejected: {ex['rejected_text'][:300]}", highlight=False)
    out.print("\nnext:\n  factory status\n  duckdb " + result.store_path +
              " \"SELECT principle_id, chosen_text, rejected_text FROM preference_pairs LIMIT 5\"\n"
              f"  factory run {config} --set critique.rounds=2   # another round; finished rows are reused",
              highlight=False, soft_wrap=True)
    # last, so the run ends with them: how far the judge behind the AI pairs can be trusted
    if result.calibration:
        print_calibration(result.calibration)
    if result.gate:
        out.print(f"[{'yellow' if result.gate['failed'] else 'green'}]gate:[/] {result.gate['line']}", highlight=False,
                  soft_wrap=True)


def _usd(v) -> str:
    return "-" if v is None else f"${v:,.4f}" if v < 1 else f"${v:,.2f}"


def print_cost(cost: dict, title: str) -> None:
    """The cost ledger (factory/cost.py): per stage, then the total and per kept pair ('-': no price configured)."""
    t = Table(title=title)
    for col in ("stage", "input tok", "output tok", "seconds", "USD"):
        t.add_column(col, justify="left" if col == "stage" else "right")
    for stage, s in cost["stages"].items():
        t.add_row(stage, f"{s['input_tokens']:,.0f}", f"{s['output_tokens']:,.0f}", f"{s['seconds']:,.1f}",
                  _usd(s["usd"]))
    t.caption = (f"total {_usd(cost['total_usd'])}, {cost['kept_pairs']:,.0f} kept pairs, "
                 f"{_usd(cost['usd_per_kept_pair'])} per kept pair"
                 + ("" if cost["total_usd"] is not None else " (set models.*.price or gpu_hour for USD)"))
    out.print(t)


def print_contamination(counts: dict) -> None:
    t = Table(title="benchmark contamination (flagged texts; their pairs are left out of export and training)")
    for col in ("benchmark", "prompts", "responses", "revisions", "pairs excluded"):
        t.add_column(col, justify="left" if col == "benchmark" else "right")
    for bench, c in counts.items():
        t.add_row(bench, str(c["prompts"]), str(c["responses"]), str(c["revisions"]), str(c["pairs_excluded"]))
    out.print(t)


def print_estimate(result, projection: dict, config: str) -> None:
    """The --estimate projection: per stage for the whole prompt set, from the sample's run."""
    out.print(f"estimate run {result.run_id}: {projection['sample']} of {projection['prompts']} prompts, "
              f"{result.status}; projection x{projection['scale']:.2f}", highlight=False)
    if result.contamination:
        print_contamination(result.contamination)
    print_cost(projection, f"projected for all {projection['prompts']} prompts")
    out.print(f"projected: {projection['input_tokens']:,.0f} input and {projection['output_tokens']:,.0f} output "
              f"tokens, {projection['seconds']:,.0f} s of stage time (engine start-up not included), "
              f"{projection['kept_pairs']:,.0f} kept pairs, cost {_usd(projection['total_usd'])}", highlight=False)
    out.print(f"the sample's rows are stored in {result.store_path} and reused by the full run:\n"
              f"  factory run {config}", highlight=False, soft_wrap=True)


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def print_judge_report(rep: dict) -> None:
    t = Table(title="judge quality (AI feedback)")
    t.add_column("figure")
    t.add_column("value", justify="right")
    t.add_row("comparisons (both orders judged)", f"{rep['comparisons']} of {rep['comparisons_requested']}")
    t.add_row("judgments by status", ", ".join(f"{n} {k}" for k, n in rep["judgments"].items()) or "0")
    t.add_row("position consistency", _pct(rep["position_consistency"]))
    t.add_row("mean |P(x|xy) - P(x|yx)|", "-" if rep["mean_order_disagreement"] is None
              else f"{rep['mean_order_disagreement']:.3f}")
    t.add_row("mean label entropy (bits)", "-" if rep["mean_label_entropy"] is None else f"{rep['mean_label_entropy']:.3f}")
    t.add_row("label entropy histogram", " ".join(f"{k}:{v}" for k, v in rep["label_entropy_histogram"].items()))
    t.add_row("judge prefers the revision", _pct(rep["agreement_with_revision_pairs"]))
    t.add_row("AI-feedback pairs", ", ".join(f"{n} {k}" for k, n in sorted(rep["pairs"].items())))
    out.print(t)
    if rep.get("guard"):
        print_guard(rep["guard"])
    if rep["per_principle"]:
        p = Table(title="per principle")
        for col in ("principle", "comparisons", "consistency", "order disagreement", "prefers revision"):
            p.add_column(col, justify="left" if col == "principle" else "right")
        for pid, s in rep["per_principle"].items():
            d = s["mean_order_disagreement"]
            p.add_row(pid, str(s["comparisons"]), _pct(s["position_consistency"]), "-" if d is None else f"{d:.3f}",
                      _pct(s["prefers_revision"]))
        out.print(p)


def print_guard(g: dict) -> None:
    """The guard's part of the judge report: texts that address the judge, and the pairs dropped for it."""
    t = Table(title="guard: responses that address the judge" + ("" if g["enabled"] else " (off in this run)"))
    t.add_column("figure")
    t.add_column("value", justify="right")
    t.add_row("flagged rows", str(g["flagged_rows"]))
    t.add_row("by pattern", ", ".join(f"{n} {k}" for k, n in g["by_pattern"].items()) or "-")
    t.add_row("by table", ", ".join(f"{n} {k}" for k, n in g["by_table"].items()) or "-")
    t.add_row("pairs dropped (addresses_judge)", ", ".join(f"{n} {k}" for k, n in g["dropped_pairs"].items()) or "0")
    for ex in g["examples"]:
        t.add_row(f"e.g. {ex['tbl']} {ex['row_id'][:8]} ({ex['pattern']})", ex["span"][:60])
    out.print(t)


def _num(v, fmt: str = ".3f") -> str:
    return "-" if v is None else format(v, fmt)


def print_calibration(cal: dict) -> None:
    """A stored calibration (factory/calibrate.py) as a table: what each figure is and its value; then what they
    mean in words."""
    from factory.calibration import plain_words

    r = cal["report"]
    t = Table(title=f"judge calibration: {cal['model_id']} on {cal['gold_path']} ({r['n']} of {r['n_gold']} gold "
                    f"pairs judged, {cal['created_at']:%Y-%m-%d %H:%M})" if hasattr(cal.get("created_at"), "strftime")
              else f"judge calibration: {cal['model_id']} on {cal['gold_path']}")
    t.add_column("figure")
    t.add_column("value", justify="right")
    t.add_column("meaning")
    t.add_row("accuracy", _pct(r["accuracy"]), "label favours the gold-preferred response (> 0.5)")
    for kind, k in sorted(r["per_kind"].items()):
        t.add_row(f"  accuracy, {kind}", f"{_pct(k['accuracy'])} of {k['n']}", "")
    t.add_row("Cohen's kappa", _num(r["kappa"], ".2f"), "agreement with gold beyond chance (0 chance, 1 perfect)")
    t.add_row("expected calibration error", _num(r["ece"]), "|accuracy - confidence| over confidence bins")
    t.add_row("position consistency", _pct(r["position_consistency"]), "both answer orders pick the same side")
    t.add_row("mean |P(x|xy) - P(x|yx)|", _num(r["mean_order_disagreement"]), "order disagreement")
    t.add_row("longer response wins", _pct(r["longer_wins_rate"]),
              f"gold prefers the longer in {_pct(r['gold_longer_better_rate'])}; length bias "
              f"{_num(r['length_bias'], '+.2f')}")
    t.add_row("accuracy when the longer is worse", _pct(r["accuracy_when_longer_worse"]), "")
    t.add_row("mean |label - 0.5|", _num(r.get("mean_margin")), f"{r.get('ties', 0)} ties within tie_threshold")
    t.add_row("self-preference", _pct(r.get("self_preference")),
              "-" if r.get("self_preference") is None else
              f"prefers its own answer over the gold one (n={r.get('self_preference_n')})")
    if r.get("plot"):
        t.caption = f"reliability plot: {r['plot']}"
    out.print(t)
    out.print(plain_words(r), highlight=False, soft_wrap=True)


def print_metrics(title: str, metrics: dict) -> None:
    t = Table(title=title)
    t.add_column("metric")
    t.add_column("value", justify="right")
    flat = {**metrics, **metrics.get("summary", {})} if isinstance(metrics.get("summary"), dict) else metrics
    for k, v in flat.items():
        if isinstance(v, (int, float, str)) or v is None:
            t.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    out.print(t)


EVAL_COLUMNS = [("harmless win", "harmless_win_rate"), ("helpful win", "helpful_win_rate"),
                ("pair acc.", "pair_accuracy"), ("KL (nats)", "kl"), ("harmless rate", "harmless_rate"),
                ("over-refusal", "over_refusal_rate"), ("reward", "reward_mean")]


def _cell(fig: dict, key: str) -> str:
    """A figure as 'value [lo, hi] n=N' (a rate), 'value ± se n=N' (KL), or '-' when it was not measured."""
    v = fig.get(key)
    if v is None:
        return "-"
    ci, n, se = fig.get(f"{key}_ci95"), fig.get(f"{key}_n"), fig.get(f"{key}_se")
    text = f"{v:.3g}"
    if ci:
        text += f" [{ci[0]:.2f}, {ci[1]:.2f}]"
    if se is not None:
        text += f" ± {se:.2g}"
    return text + (f" n={n}" if n is not None else "")


def print_policy_table(metrics: dict) -> None:
    """One row per policy: each figure with its 95% interval (or standard error) and count."""
    t = Table(title="policies against the reference (95% intervals)")
    t.add_column("policy")
    shown = [(title, key) for title, key in EVAL_COLUMNS if any(key in f for f in metrics["policies"].values())]
    for title, _ in shown:
        t.add_column(title, justify="right")
    for name, fig in metrics["policies"].items():
        t.add_row(name, *[_cell(fig, key) for _, key in shown])
    out.print(t)


def _rate(row: dict, col: str) -> str:
    v, n, ci = row.get(col), row.get(f"{col}_n"), row.get(f"{col}_ci95")
    if v is None:
        return "-"
    text = f"{v:.2f}"
    if ci:
        text += f" [{ci[0]:.2f}, {ci[1]:.2f}]"
    return text + (f" n={n}" if n is not None else "")


def recipe_table(report: dict) -> Table:
    t = Table(title=f"recipe {report['name']}: policies against the SFT model (95% intervals)")
    for col in ("policy", "harmless win", "helpful win", "harmless rate", "over-refusal", "KL to SFT",
                "pair accuracy"):
        t.add_column(col, justify="left" if col == "policy" else "right")
    for row in report["table"]:
        kl = row.get("kl")
        t.add_row(row["policy"], _rate(row, "harmless_win_rate"), _rate(row, "helpful_win_rate"),
                  _rate(row, "harmless_rate"), _rate(row, "over_refusal_rate"),
                  "-" if kl is None else f"{kl:.3f}", _rate(row, "pair_accuracy"))
    acc = {"reward_accuracy": report.get("reward_accuracy"), "reward_accuracy_n": report.get("reward_accuracy_n"),
           "reward_accuracy_ci95": report.get("reward_accuracy_ci95")}
    t.caption = f"reward model accuracy on held-out pairs: {_rate(acc, 'reward_accuracy')}"
    return t


def _duration(seconds) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s" if m else f"{sec}s"


def print_status(st: dict, costs: dict, runs: int) -> None:
    """`factory status`: rows per table, the last RUNS runs, per-stage progress with rates and ETA, and the
    cost of each run's data so far."""
    from factory.store import now

    t = Table(title=f"store {st['path']}")
    t.add_column("table")
    t.add_column("rows", justify="right")
    for name, n in st["counts"].items():
        t.add_row(name, str(n))
    out.print(t)
    r = Table(title="runs (rows written by each run, by status)")
    for col in ("run", "name", "status", "started", "written"):
        r.add_column(col)
    for run_ in st["runs"][-runs:]:
        written = st["per_run"].get(run_["run_id"], {})
        desc = "; ".join(f"{tb}: " + ", ".join(f"{n} {k}" for k, n in c.items()) for tb, c in written.items())
        r.add_row(run_["run_id"], run_["name"] or "", run_["status"] or "", f"{run_['started_at']:%Y-%m-%d %H:%M}",
                  desc or "-")
    out.print(r)
    status_of = {run_["run_id"]: run_["status"] for run_ in st["runs"]}
    for run_id, stages in st["progress"].items():
        if not stages:
            continue
        p = Table(title=f"run {run_id} ({status_of.get(run_id)}): stages")
        p.add_column("stage", no_wrap=True, min_width=max(len(g["stage"]) for g in stages))
        for col in ("model", "done", "pending", "stored before", "rows/s", "ETA", "elapsed", "last batch"):
            p.add_column(col, justify="left" if col == "model" else "right")
        for g in stages:  # rates and ETA as of the stage's last commit; "last batch" says how long ago that was
            ago = (now() - g["updated_at"]).total_seconds() if g["updated_at"] else None
            p.add_row(g["stage"], str(g["model"] or ""), str(g["done"]), str(g["pending"]), str(g["stored_before"]),
                      "-" if g["rows_per_s"] is None else f"{g['rows_per_s']:.2f}", _duration(g["eta_s"]),
                      _duration(g["seconds"]), "-" if ago is None else _duration(ago) + " ago")
        out.print(p)
    for run_id, cost in costs.items():
        if cost["stages"]:
            print_cost(cost, f"run {run_id} ({status_of.get(run_id)}): cost of its data"
                       + (" so far" if status_of.get(run_id) == "running" else ""))

