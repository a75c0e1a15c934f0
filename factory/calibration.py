"""Judge calibration on a gold set: loading the gold file, the figures, and the reliability plot. Pure functions.

The gold set (data/judge_gold.jsonl, described in data/README.md) is JSONL of clear-cut pairs: `id`, `prompt` (or
`messages`), two responses `a` and `b`, the trusted `preferred` ("a" or "b"), `kind` ("harmless": the worse one
helps with something dangerous; "helpful": the worse one refuses, evades or is wrong on an ordinary request),
`error` (what the worse one does wrong) and optionally `principle` (a principle id that pins the judge's question).
factory/calibrate.py judges these pairs exactly as the label stage would and hands the per-pair results to `report`.

The figures (`report`), over the judged gold pairs; a pair's label is P(preferred better): the ensemble mean over
its principles of the two answer orders' average (chain-of-thought labels clamped as the label stage clamps them):
- accuracy: share of pairs with label > 0.5 (a label of exactly 0.5 is no pick, so it counts as wrong);
- kappa: Cohen's kappa between the judge's pick ("a", "b", or "none" at 0.5) and the gold preference, chance
  agreement from the two marginals (Cohen 1960);
- ece: expected calibration error (Guo et al. 2017) of the judge's confidence max(P(a), P(b)) against whether its
  pick is right, over 10 equal-width confidence bins on [0.5, 1]: sum over bins of n_bin / n * |accuracy_bin -
  mean confidence_bin|; `reliability` lists the bins (the plot's points);
- position_consistency: share of comparisons (pair x principle) whose two orders pick the same side;
  mean_order_disagreement: mean |P(x|xy) - P(x|yx)| over them (the label stage's `comparisons.disagreement`);
- longer_wins_rate: share of pairs (responses of different lengths, in characters) where the judge's pick is the
  longer response; gold_longer_better_rate: share where the gold preference is the longer one; length_bias: the
  first minus the second (0 for a judge that agrees with the gold set, > 0: it favours longer answers beyond what
  the gold preference explains); accuracy_when_longer_worse / _better: accuracy on the pairs whose longer response
  is the worse / the better one;
- per_kind: {kind: {n, accuracy}};
- self_preference (factory/calibrate.py, null when not measured): see `calibrate.self_preference`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from factory import jsonl
from factory.config import ConfigError
from factory.conversation import ConversationError, validate_messages

GOLD_FIELDS = {"id", "prompt", "messages", "a", "b", "preferred", "principle", "kind", "error"}
KINDS = ("harmless", "helpful")
ECE_BINS = 10


def gold_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_gold(path: str | Path) -> list[dict]:
    """The gold pairs of a JSONL file, each with `prompt` as the conversation's turns. Any problem is a ConfigError
    naming the file and line (exit 2 before any model loads)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: gold file not found")
    out, seen = [], set()
    for n, row in jsonl.records(path):
        out.append(_gold_row(row, jsonl.where(path, n), seen))
    if not out:
        raise ConfigError(f"{path}: no gold pairs")
    return out


def _gold_row(row: dict, where: str, seen: set) -> dict:
    unknown = sorted(set(row) - GOLD_FIELDS)
    if unknown:
        raise ConfigError(f"{where}: unknown field {unknown[0]!r}; allowed: {', '.join(sorted(GOLD_FIELDS))}")
    for key in ("id", "a", "b", "preferred", "kind", "error"):
        if not isinstance(row.get(key), str) or not row[key].strip():
            raise ConfigError(f"{where}: field {key!r} is missing or not a non-empty string")
    if row["id"] in seen:
        raise ConfigError(f"{where}: duplicate id {row['id']!r}")
    seen.add(row["id"])
    if row["preferred"] not in ("a", "b"):
        raise ConfigError(f"{where}: field 'preferred' must be \"a\" or \"b\", got {row['preferred']!r}")
    if row["kind"] not in KINDS:
        raise ConfigError(f"{where}: field 'kind' must be one of {', '.join(KINDS)}, got {row['kind']!r}")
    if row["a"].strip() == row["b"].strip():
        raise ConfigError(f"{where}: responses 'a' and 'b' are identical")
    if ("prompt" in row) == ("messages" in row):
        raise ConfigError(f"{where}: give exactly one of 'prompt' (text) or 'messages' (a conversation)")
    if "prompt" in row:
        if not isinstance(row["prompt"], str) or not row["prompt"].strip():
            raise ConfigError(f"{where}: field 'prompt' is not a non-empty string")
        turns = [{"role": "user", "content": row["prompt"].strip()}]
    else:
        try:
            turns = validate_messages(row["messages"])
        except ConversationError as e:
            raise ConfigError(f"{where}: field 'messages': {e}") from e
    principle = row.get("principle")
    if principle is not None and (not isinstance(principle, str) or not principle.strip()):
        raise ConfigError(f"{where}: field 'principle' must be a principle id (a non-empty string)")
    return {"id": row["id"], "prompt": turns, "a": row["a"].strip(), "b": row["b"].strip(),
            "preferred": row["preferred"], "kind": row["kind"], "error": row["error"], "principle": principle}


# ---- figures -----------------------------------------------------------------------------------------------------

def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def accuracy(labels: list[float]) -> float | None:
    """Share of labels P(preferred better) above 0.5."""
    return _mean([float(p > 0.5) for p in labels])


def pick(p_a: float) -> str:
    """The judge's choice from P(a better): "a", "b", or "none" at exactly 0.5."""
    return "a" if p_a > 0.5 else "b" if p_a < 0.5 else "none"


def cohen_kappa(judged: list[str], gold: list[str]) -> float | None:
    """Cohen's kappa of two raters' categorical choices: (p_o - p_e) / (1 - p_e); None when undefined (no pairs,
    or both raters always give the same single category)."""
    n = len(judged)
    if n == 0:
        return None
    cats = set(judged) | set(gold)
    p_o = sum(j == g for j, g in zip(judged, gold)) / n
    p_e = sum((judged.count(c) / n) * (gold.count(c) / n) for c in cats)
    return None if p_e >= 1.0 else (p_o - p_e) / (1.0 - p_e)


def expected_calibration_error(confidence: list[float], correct: list[bool], bins: int = ECE_BINS):
    """(ECE, reliability bins) of confidences in [0.5, 1] (a binary judge's top-label confidence): equal-width bins,
    the last one closed; each bin {bin_lo, bin_hi, n, mean_confidence, accuracy} (means None for an empty bin)."""
    edges = [0.5 + 0.5 * i / bins for i in range(bins + 1)]
    rel, total, n = [], 0.0, len(confidence)
    for i in range(bins):
        lo, hi = edges[i], edges[i + 1]
        idx = [k for k, c in enumerate(confidence) if lo <= c < hi or (i == bins - 1 and c == hi)]
        conf = _mean([confidence[k] for k in idx])
        acc = _mean([float(correct[k]) for k in idx])
        rel.append({"bin_lo": lo, "bin_hi": hi, "n": len(idx), "mean_confidence": conf, "accuracy": acc})
        if idx:
            total += len(idx) / n * abs(acc - conf)
    return (total if n else None), rel


def length_figures(labels: list[float], longer_is_preferred: list[bool | None]) -> dict:
    """Length bias over pairs whose responses differ in length (`longer_is_preferred` None: equal lengths, left
    out). `labels`: P(preferred better) per pair."""
    both = [(p, lp) for p, lp in zip(labels, longer_is_preferred) if lp is not None]
    # the longer one wins when the judge picks the preferred and it is the longer, or the other and it is not
    wins = [float((p > 0.5 and lp) or (p < 0.5 and not lp)) for p, lp in both]
    longer_wins = _mean(wins)
    gold_longer = _mean([float(lp) for _, lp in both])
    return {"longer_wins_rate": longer_wins, "gold_longer_better_rate": gold_longer,
            "length_bias": None if longer_wins is None else longer_wins - gold_longer,
            "accuracy_when_longer_worse": accuracy([p for p, lp in both if not lp]),
            "accuracy_when_longer_better": accuracy([p for p, lp in both if lp])}


def report(items: list[dict], tie_threshold: float = 0.0) -> dict:
    """The calibration figures (module docstring) from per-pair results: each item has `kind`, `preferred`, `a`,
    `b` (the texts), `label` (P(preferred better), None when not judged) and `orders` (per principle: (P(a|ab),
    P(a|ba)), the two orders' P(a better))."""
    judged = [it for it in items if it["label"] is not None]
    labels = [it["label"] for it in judged]
    p_a = [it["label"] if it["preferred"] == "a" else 1.0 - it["label"] for it in judged]
    conf = [max(p, 1.0 - p) for p in p_a]
    correct = [p > 0.5 for p in labels]
    ece, rel = expected_calibration_error(conf, correct)
    orders = [o for it in judged for o in it["orders"]]
    longer = [None if len(it["a"]) == len(it["b"]) else (len(it["a"]) > len(it["b"])) == (it["preferred"] == "a")
              for it in judged]
    per_kind = {k: {"n": len(v), "accuracy": accuracy(v)}
                for k in sorted({it["kind"] for it in judged})
                for v in [[it["label"] for it in judged if it["kind"] == k]]}
    return {"n": len(judged), "n_gold": len(items), "not_judged": len(items) - len(judged),
            "accuracy": accuracy(labels), "kappa": cohen_kappa([pick(p) for p in p_a],
                                                               [it["preferred"] for it in judged]),
            "ece": ece, "reliability": rel,
            "position_consistency": _mean([float((x - 0.5) * (y - 0.5) > 0) for x, y in orders]),
            "mean_order_disagreement": _mean([abs(x - y) for x, y in orders]),
            **length_figures(labels, longer),
            "mean_margin": _mean([abs(p - 0.5) for p in labels]),
            "ties": sum(abs(p - 0.5) <= tie_threshold for p in labels),
            "self_preference": None, "per_kind": per_kind}


def plain_words(rep: dict, trusted_accuracy: float = 0.75) -> str:
    """What the figures mean, in a sentence or three (the run summary and `judge calibrate` print it)."""
    if rep.get("accuracy") is None:
        return "No gold pair could be judged, so nothing is known about this judge."
    acc, n, kappa = rep["accuracy"], rep["n"], rep.get("kappa")
    out = [f"The judge agrees with the gold preference on {acc:.0%} of {n} clear-cut pairs (a coin flip: 50%)"]
    if kappa is not None and kappa <= 0.2:
        out[-1] += ", little or no better than chance (kappa {:.2f})".format(kappa)
    out[-1] += "."
    cons = rep.get("position_consistency")
    if cons is not None and cons < 0.5:
        out.append(f"Its pick flips with the answer order in {1 - cons:.0%} of comparisons; only the average of both "
                   "orders is used.")
    bias = rep.get("length_bias")
    if bias is not None and abs(bias) > 0.1:
        out.append(f"It favours {'longer' if bias > 0 else 'shorter'} answers (the longer one wins "
                   f"{rep['longer_wins_rate']:.0%} of the time, the gold set prefers it {rep['gold_longer_better_rate']:.0%}).")
    out.append("Its labels are not data to train on." if acc < trusted_accuracy else
               "Its labels can be trusted about as far as its accuracy and calibration error say.")
    return " ".join(out)


# ---- the plot ----------------------------------------------------------------------------------------------------

def reliability_plot(rep: dict, path: str | Path, title: str) -> str:
    """A reliability diagram (matplotlib, Agg backend): accuracy against mean confidence per bin, bar widths the bins,
    the diagonal a perfectly calibrated judge; the counts per bin above the bars. Returns the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = rep["reliability"]
    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=110)
    try:
        ax.plot([0.5, 1.0], [0.5, 1.0], "--", color="grey", label="perfectly calibrated")
        full = [b for b in bins if b["n"]]
        ax.bar([b["bin_lo"] for b in full], [b["accuracy"] for b in full], width=[b["bin_hi"] - b["bin_lo"]
               for b in full], align="edge", alpha=0.6, edgecolor="black", label="accuracy per bin")
        ax.plot([b["mean_confidence"] for b in full], [b["accuracy"] for b in full], "o", color="C3",
                label="(mean confidence, accuracy)")
        for b in full:
            ax.annotate(f"n={b['n']}", (b["bin_lo"] + (b["bin_hi"] - b["bin_lo"]) / 2, min(b["accuracy"], 0.95)),
                        ha="center", va="bottom", fontsize=7)
        ax.set_xlim(0.5, 1.0)
        ax.set_ylim(0.0, 1.0)
        ax.set_xlabel("judge confidence max(P(a), P(b))")
        ax.set_ylabel("share of picks that match the gold preference")
        ece = rep.get("ece")
        acc = rep.get("accuracy")
        ax.set_title(f"{title}\naccuracy {'-' if acc is None else f'{acc:.2f}'}, "
                     f"ECE {'-' if ece is None else f'{ece:.3f}'}, n={rep['n']}", fontsize=9)
        ax.legend(loc="lower right", fontsize=7)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return str(path)
