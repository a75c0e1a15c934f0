"""The run report as one HTML page (inline CSS, the plots as PNG files beside it) and as a dataset-card section.

`write_report(figures, folder)` writes folder/report.html and folder/*.png from `factory.run_report.run_figures`.
Everything that came from the store (ids, drop reasons, principle ids, matched spans, model names) is model output
or user text: it goes through `html.escape` (the page) or `_md` (the card) and never becomes markup.
"""

from __future__ import annotations

import html
import math
import re
from pathlib import Path

from factory.report_plots import write_plots

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1240px;padding:16px 24px;
color:#212529;line-height:1.4}
h1{font-size:1.6em;margin-bottom:4px}h2{border-bottom:1px solid #dee2e6;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;margin:8px 0 16px;font-size:0.92em}
th,td{border:1px solid #dee2e6;padding:3px 10px;text-align:left;vertical-align:top;overflow-wrap:anywhere}
th{background:#f1f3f5}td.n{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;border:1px solid #e9ecef;margin:6px 0}
.meta td{text-align:left}.note{color:#495057;font-size:0.92em}.lead{font-size:1.1em}
.tables{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}
table.examples{table-layout:fixed;width:100%}table.examples td{white-space:pre-wrap;font-size:0.9em}
code{background:#f1f3f5;padding:0 3px;border-radius:3px}
"""


def _e(value) -> str:
    return html.escape("" if value is None else str(value))


def _num(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:,.0f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def _pct(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}%"


_NUMERIC = ' class="n"'
_NUMBER = re.compile(r"-|[-+]?[\d,]*\.?\d+(e[-+]?\d+)?%?")


def _is_number(cell) -> bool:
    return isinstance(cell, (int, float)) or bool(_NUMBER.fullmatch(str(cell)))


def _table(head: list[str], rows: list[list]) -> str:
    """An HTML table; every cell is escaped (cells are text from the store or numbers formatted above)."""
    out = ["<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"]
    out += ["<tr>" + "".join(f'<td{_NUMERIC if _is_number(c) else ""}>{_e(c)}</td>' for c in row) + "</tr>"
            for row in rows]
    return "".join(out) + "</table>"


def _img(images: dict, name: str, alt: str) -> str:
    return f'<img src="{_e(images[name])}" alt="{_e(alt)}">' if name in images else ""


def _funnel(f: dict, images: dict) -> str:
    fu = f["funnel"]
    steps = _table(["step", "rows", "of"], [[s["step"], _num(s["n"]), _num(s["of"]) if s["of"] is not None else ""]
                                            for s in fu["steps"]])
    pairs = _table(["pair source", "outcome", "pairs"], [[p["source"], p["status"], _num(p["n"])] for p in fu["pairs"]])
    drops = _table(["drop reason", "pairs"], [[r, _num(n)] for r, n in fu["dropped"].items()]) if fu["dropped"] \
        else "<p>No pair was dropped.</p>"
    statuses = _table(["table", "rows by status"], [[t, ", ".join(f"{n} {k}" for k, n in s.items()) or "0"]
                                                   for t, s in fu["statuses"].items()])
    return (f"<h2>Funnel: prompts to kept pairs</h2>{_img(images, 'funnel', 'funnel')}"
            f'<div class="tables">{steps}{pairs}{drops}{statuses}</div>')


def _labels(f: dict, images: dict) -> str:
    counts = f["labels"]["label"]["counts"]
    if not counts:
        return "<h2>Labels</h2><p>No AI-feedback pair has a label (the label stage did not run).</p>"
    rows = [[g, _num(sum(c))] for g, c in counts.items()]
    return (f"<h2>Labels and margins (AI feedback)</h2>{_img(images, 'labels', 'label histograms')}"
            + _table(["outcome", "labelled pairs"], rows))


def _principles(f: dict, images: dict) -> str:
    ps = f["principles"]
    if not ps:
        return "<h2>Per principle</h2><p>No comparisons.</p>"
    rows = [[p["principle_id"], _num(p["comparisons"]), _pct(p["position_consistency"]),
             _num(p["mean_order_disagreement"]), _num(p["revision_comparisons"]), _pct(p["prefers_revision"])]
            for p in ps]
    return ("<h2>Per principle: consistency and preference for the revision</h2>"
            + _img(images, "principles", "per-principle figures")
            + _table(["principle", "comparisons", "position consistency", "mean order disagreement",
                      "revision comparisons", "prefers the revision"], rows))


def _bias(f: dict, images: dict) -> str:
    pb, lb = f["position_bias"], f["length_bias"]
    names = {"xy": "first candidate as (A)", "yx": "second candidate as (A)"}
    pos = _table(["judgments", "n", "chose (A)", "mean P(A)"],
                 [[names.get(o["answer_order"], o["answer_order"]), _num(o["judgments"]), _pct(o["chose_a"]),
                   _num(o["mean_p_a"])] for o in pb["orders"]]
                 + [["all", _num(pb["judgments"]), _pct(pb["chose_a"]), ""]])
    figs = _table(["figure", "value"], [
        ["comparisons", _num(pb["comparisons"])],
        ["position consistency", _pct(pb["position_consistency"])],
        ["mean |P(x|xy) - P(x|yx)|", _num(pb["mean_order_disagreement"])],
        ["kept AI pairs", _num(lb["pairs"])],
        ["longer text chosen", f"{_pct(lb['longer_wins_rate'])} ({_num(lb['longer_wins'])} of "
                               f"{_num(lb['longer_wins'] + lb['shorter_wins'])}; "
                               f"{_num(lb['same_length'])} same length)"],
        ["corr(label, length difference)", _num(lb["label_length_corr"])],
        ["mean length difference (chars)", _num(lb["mean_length_difference"])]])
    return (f"<h2>Position and length bias</h2>{_img(images, 'bias', 'position and length bias')}"
            f'<div class="tables">{pos}{figs}</div>')


def _calibration(f: dict, images: dict) -> str:
    cal = f["calibration"]
    if not cal:
        return ("<h2>Calibration</h2><p>No calibration is stored for this run's judge: run "
                "<code>factory judge calibrate --gold FILE</code> to measure it on trusted pairs.</p>")
    keys = [("gold pairs", "n", _num), ("accuracy", "accuracy", _pct), ("Cohen's kappa", "kappa", _num),
            ("expected calibration error", "ece", _num), ("position consistency", "position_consistency", _pct),
            ("mean order disagreement", "mean_order_disagreement", _num),
            ("longer response wins", "longer_wins_rate", _pct),
            ("accuracy when the longer is worse", "accuracy_when_longer_worse", _pct),
            ("self-preference", "self_preference", _pct)]
    judges = cal["judges"]
    rows = [["gold set", *[j["gold_path"] for j in judges]], ["measured", *[j["created_at"] for j in judges]]]
    rows += [[title, *[fmt(j["report"].get(key)) for j in judges]] for title, key, fmt in keys]
    kinds = [[j["model_id"], kind, _num(v.get("n")), _pct(v.get("accuracy"))] for j in judges
             for kind, v in (j["report"].get("per_kind") or {}).items()]
    return (f'<h2>Calibration</h2><div class="tables">{_img(images, "calibration", "reliability diagram")}'
            + _table(["judge", *[j["model_id"] for j in judges]], rows)
            + (_table(["judge", "kind of pair", "n", "accuracy"], kinds) if kinds else "") + "</div>")


def _stages(f: dict, images: dict) -> str:
    rows = [[s["stage"], _num(s["rows"]), _num(s["written"]), _num(s["prompt_tokens"]), _num(s["output_tokens"]),
             _num(s["seconds"]), _num(s["rows_per_s"]), _num(s["output_tokens_per_s"])] for s in f["stages"]]
    if not rows:
        return "<h2>Stages</h2><p>No stage rows.</p>"
    return ("<h2>Stages: tokens, seconds, throughput</h2>" + _img(images, "stages", "per-stage figures")
            + _table(["stage", "rows", "written by this run", "input tokens", "output tokens", "seconds (this run)",
                      "rows/s", "output tokens/s"], rows)
            + '<p class="note">Rows and tokens: all of the run\'s rows, reused ones included. Seconds, rows/s and '
              "tokens/s: what this run itself wrote (run_progress).</p>")


def _guard(f: dict) -> str:
    g = f["guard"]
    if g is None:
        return "<h2>Guard</h2><p>The guard has not run on this store (no <code>guard_flags</code> table).</p>"
    if not g["counts"]:
        return "<h2>Guard</h2><p>No response or revision of this run was flagged as addressing the judge.</p>"
    return (f"<h2>Guard: texts that address the judge</h2><p>Rows flagged: {_num(g['rows'])}.</p>"
            + _table(["table", "pattern", "rows", "flags"], [[c["tbl"], c["pattern"], _num(c["rows"]), _num(c["flags"])]
                                                              for c in g["counts"]])
            + _table(["table", "pattern", "matched span (first ones)"], [[x["tbl"], x["pattern"], x["span"]]
                                                                        for x in g["examples"]]))


def _contamination(f: dict) -> str:
    c = f["contamination"]
    if c is None:
        return ("<h2>Contamination</h2><p>No decontamination has run on this store (no <code>contamination</code> "
                "table).</p>")
    if not c["counts"]:
        return "<h2>Contamination</h2><p>No row of this run overlaps a benchmark.</p>"
    return (f"<h2>Contamination</h2><p>Rows that overlap a benchmark: {_num(c['rows'])}.</p>"
            + _table(["table", "benchmark", "rows", "n-gram hits"], [[x["tbl"], x["benchmark"], _num(x["rows"]),
                                                                      _num(x["hits"])] for x in c["counts"]]))


def _examples(f: dict) -> str:
    ex = f["examples"]
    if not ex:
        return ""
    rows = [[x["source"], x["status"], x["principle_id"], _num(x["label"]), x["prompt"], x["chosen"], x["rejected"]]
            for x in ex]
    return ('<h2>Example pairs</h2><p class="note">One pair per source and outcome (texts cut to 400 characters; '
            "the side shown as chosen of a dropped pair is the one the stage would have chosen).</p>"
            + _table(["source", "outcome", "principle", "label", "prompt", "chosen", "rejected"], rows)
            .replace("<table>", '<table class="examples"><colgroup>' + "".join(
                f'<col style="width:{w}%">' for w in (11, 12, 11, 5, 15, 23, 23)) + "</colgroup>", 1))


def _money(v) -> str:
    return "-" if v is None else f"{v:.4g}"


def _cost(f: dict) -> str:
    c = f["cost"]
    if not c or c.get("total_usd") is None:
        return ("<h2>Cost</h2><p>No prices are configured, so no cost is shown: tokens and seconds per stage are "
                "above.</p>")
    cur = c.get("currency", "USD")
    rows = [[stage, _num(s.get("input_tokens")), _num(s.get("output_tokens")), _num(s.get("seconds")),
             _money(s.get("usd"))] for stage, s in (c.get("stages") or {}).items()]
    return ("<h2>Cost</h2>" + _table(["stage", "input tokens", "output tokens", "seconds", cur], rows)
            + f"<p>Total {_e(_money(c.get('total_usd')))} {_e(cur)}; {_e(_num(c.get('kept_pairs')))} kept pairs; "
              f"{_e(_money(c.get('usd_per_kept_pair')))} {_e(cur)} per kept pair.</p>")


def render_html(f: dict, images: dict[str, str]) -> str:
    """The page: every section of `f` (run_figures' dict), the plots as <img> of the files in `images`."""
    r, fu = f["run"], f["funnel"]
    prompts = fu["statuses"]["prompts"].get("ok", 0)
    meta = _table(["run", r["run_id"]], [
        ["pipeline", r["name"]], ["status", f"{r['status']}" + (f" ({r['message']})" if r["message"] else "")],
        ["started / finished", f"{r['started_at']} / {r['finished_at']}"], ["config", r["config_path"]],
        ["policy", r["policy"]], ["judge", r["judge"]], ["constitution", r["constitution"]],
        ["label stage", f"{r['label_mode']} (tie threshold {r['tie_threshold']})" if r["label_enabled"] else "off"]])
    lead = (f'<p class="lead">{_e(_num(prompts))} prompts &rarr; {_e(_num(fu["pairs_total"]))} pairs &rarr; '
            f'<b>{_e(_num(fu["kept"]))} kept</b>; {_e(_num(sum(fu["dropped"].values())))} dropped.</p>')
    body = "".join([meta.replace("<table>", '<table class="meta">', 1), lead, _funnel(f, images), _labels(f, images),
                    _principles(f, images), _bias(f, images), _calibration(f, images), _stages(f, images), _guard(f),
                    _contamination(f), _cost(f), _examples(f)])
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>factory run {_e(r["run_id"])}'
            f"</title><style>{CSS}</style></head><body><h1>factory run report</h1>{body}</body></html>\n")


def write_report(figures: dict, folder: str | Path) -> Path:
    """folder/report.html and the PNGs it shows; returns the page's path."""
    folder = Path(folder)
    images = write_plots(figures, folder)
    page = folder / "report.html"
    page.write_text(render_html(figures, images), encoding="utf-8")
    return page


# ---- the dataset card's section ------------------------------------------------------------------------------
def _md(value) -> str:
    """Store text in a Markdown table cell: escaped HTML, no pipes or line breaks."""
    return html.escape("" if value is None else str(value)).replace("|", "\\|").replace("\n", " ")


def card_section(f: dict, images: dict[str, str]) -> str:
    """The card's report: the plots (paths relative to the card) and the main figures as Markdown."""
    fu, pb, lb = f["funnel"], f["position_bias"], f["length_bias"]
    lines = ["## Run report", "", f"{fu['statuses']['prompts'].get('ok', 0)} prompts, {fu['pairs_total']} pairs, "
             f"**{fu['kept']} kept**, {sum(fu['dropped'].values())} dropped.", ""]
    titles = {"funnel": "Funnel", "labels": "Labels and margins", "principles": "Per principle",
              "bias": "Position and length bias", "calibration": "Calibration", "stages": "Stages"}
    for name, path in images.items():
        lines += [f"![{titles.get(name, name)}]({path})", ""]
    lines += ["", "| step | rows |", "| --- | --- |"] + [f"| {_md(s['step'])} | {s['n']} |" for s in fu["steps"]]
    if fu["dropped"]:
        lines += ["", "| drop reason | pairs |", "| --- | --- |"]
        lines += [f"| {_md(k)} | {n} |" for k, n in fu["dropped"].items()]
    lines += ["", f"- position bias: the judge chose (A) in {_pct(pb['chose_a'])} of {pb['judgments']} judgments; "
                  f"position consistency {_pct(pb['position_consistency'])}, mean order disagreement "
                  f"{_num(pb['mean_order_disagreement'])}",
              f"- length bias: the longer text was chosen in {_pct(lb['longer_wins_rate'])} of {lb['pairs']} kept "
              "AI-feedback pairs"]
    for j in (f["calibration"] or {}).get("judges", []):
        rep = j["report"]
        lines.append(f"- calibration of `{_md(j['model_id'])}` on {rep.get('n')} gold pairs: accuracy "
                     f"{_pct(rep.get('accuracy'))}, kappa {_num(rep.get('kappa'))}, ECE {_num(rep.get('ece'))}")
    if f["guard"] is not None:
        lines.append(f"- guard: {f['guard']['rows']} responses or revisions flagged as addressing the judge")
    if f["contamination"] is not None:
        per = ", ".join(f"{_md(c['benchmark'])} ({_md(c['tbl'])}): {c['rows']}" for c in f["contamination"]["counts"])
        lines.append(f"- contamination: {f['contamination']['rows']} rows overlap a benchmark"
                     + (f" ({per})" if per else ""))
    c = f["cost"]
    if c and c.get("total_usd") is not None:
        lines.append(f"- cost: {_money(c['total_usd'])} {_md(c.get('currency', 'USD'))} in total, "
                     f"{_money(c.get('usd_per_kept_pair'))} per kept pair")
    else:
        lines.append("- cost: no prices configured")
    return "\n".join(lines) + "\n"
