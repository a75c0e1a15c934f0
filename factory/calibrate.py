"""Judge calibration and the label gate: the pipeline's judge judges the gold set exactly as the label stage would.

Reads: the gold file (factory.calibration.load_gold), the pipeline config (judge model, constitution, label
settings). Writes: `judge_calibrations` (one row per calibration: the judge as comparisons.model_id shows it, the
gold file's path and sha256, a hash of the settings the labels depend on, the figures as JSON) and a reliability
plot (PNG). Nothing else: the gold pairs' judgments are not rows of the store.

"Exactly as the label stage would": each gold pair is a candidate pair (x = `a`, y = `b`) asked under the same
principles (`principles_per_comparison` sampled by `label.principles_for`, seeded like the label stage; a gold
`principle` the constitution has is pinned first), each principle in both orders, rendered, encoded and scored by
the label stage's own functions (`_render_parts`, `_encode_all`, `_judge_batch`; rubric replies that do not parse
asked again up to `rubric_retries` times), averaged over the orders (clamped for chain-of-thought) and then over the
principles. The figures are in factory/calibration.py.

The gate (`label.gate`): before the label stage judges, `check_gate` takes the calibration stored for this judge
(fingerprint, settings, gold file hash) or runs it on the stage's own judge engine, and compares it with the
thresholds. A failing judge still writes its judgments and comparisons; its kept pairs get dropped_reason
'judge_failed_gate' unless `enforce: false`.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from factory import judge, templates
from factory.calibration import gold_sha256, load_gold, reliability_plot, report
from factory.config import ConfigError, PipelineConfig
from factory.conversation import split_reasoning, with_system
from factory.model_info import answer_cue
from factory.stages import label as label_stage
from factory.stages.common import Job, StageStats, encode_all, fit_to_context, job_seed, parse_completion, \
    render, sampling_json
from factory.store import Store, now, row_id


def settings(cfg: PipelineConfig, constitution, info) -> dict:
    """What a calibration's figures depend on besides the gold file: the judge (fingerprint), its format and context,
    the label settings (mode, template, sampling, ensemble, clamp, retries, seed) and the constitution's content."""
    lineage, _ = label_stage.judge_lineage(cfg, constitution, info)
    lc = cfg.label
    return {"judge": info.key, "fingerprint": info.fingerprint, "prompt_format": cfg.judge.prompt_format,
            "max_model_len": cfg.judge.max_model_len, "mode": lc.mode, "template_hash": lineage["template_hash"],
            "sampling": lineage["sampling"], "principles_per_comparison": lc.principles_per_comparison,
            "cot_clamp": list(lc.cot_clamp), "rubric_retries": lc.rubric_retries, "seed": cfg.seed,
            "tie_threshold": lc.tie_threshold,
            "constitution": hashlib.sha256(constitution.model_dump_json().encode()).hexdigest()}


def settings_hash(s: dict) -> str:
    return hashlib.sha256(json.dumps(s, sort_keys=True).encode()).hexdigest()[:24]


# ---- judging -----------------------------------------------------------------------------------------------------

def judge_pairs(cfg: PipelineConfig, constitution, info, engine, pairs: list[dict]) -> list[dict]:
    """Judge candidate pairs as the label stage does. `pairs`: dicts with `key` (what seeds the principle sampling,
    like the label stage's candidate ids), `prompt` (turns), `a`, `b`, optional `principle` (pinned). Returns per
    pair {"p_a": P(a better) or None when no principle got both orders, "orders": [(P(a|ab), P(a|ba))] per judged
    principle, "principles": [ids]}."""
    lc, fmt, sp = cfg.label, cfg.judge.prompt_format, info.special_tokens
    cue = answer_cue(info.tokenizer, judge.ANSWER_CUE) if lc.mode != "rubric" else ([], [])
    comparisons = {}  # comparison id -> (pair index, principle)
    for i, p in enumerate(pairs):
        for pr in label_stage.principles_for(constitution, lc.principles_per_comparison, cfg.seed, "gold", p["key"],
                                             p.get("principle")):
            comparisons[row_id("gold-comparison", p["key"], pr.id)] = (i, pr)
    p_x: dict[tuple[str, str], float] = {}
    need = [(cid, order) for cid in comparisons for order in ("xy", "yx")]
    reserve = lc.sampling.max_tokens + 8 if lc.mode != "logprob" else 1
    for attempt in range(lc.rubric_retries + 1 if lc.mode == "rubric" else 1):
        jobs = []
        for cid, order in need:
            i, pr = comparisons[cid]
            x, y = pairs[i]["a"], pairs[i]["b"]
            a, b = (x, y) if order == "xy" else (y, x)
            jid = row_id("gold-judgment", cid, order, attempt)
            jobs.append(Job(jid, label_stage._render_parts(lc.mode, fmt, pr.comparison, pairs[i]["prompt"], a, b, sp),
                            {"cid": cid, "order": order}, job_seed(cfg.seed + attempt, jid)))
        render(jobs)
        _, runnable, ids = fit_to_context(engine, jobs, reserve, {}, "judgment_id", StageStats(),
                                          encode=lambda ps: label_stage._encode_all(engine, ps, cue[0]))
        results = label_stage._judge_batch(engine, lc.mode, cfg, ids, runnable, cue, sp) if runnable else []
        for job, res in zip(runnable, results):
            if res.get("status", "ok") == "ok" and res.get("p_a") is not None:
                p_x[(job.fields["cid"], job.fields["order"])] = judge.first_better(res["p_a"], job.fields["order"])
        need = [(cid, order) for cid, order in need if (cid, order) not in p_x]
        if not need:
            break
    out = [{"p_a": None, "orders": [], "principles": []} for _ in pairs]
    votes: dict[int, list[float]] = {}
    for cid, (i, pr) in comparisons.items():
        if (cid, "xy") in p_x and (cid, "yx") in p_x:
            xy, yx = p_x[(cid, "xy")], p_x[(cid, "yx")]
            avg = judge.swap_average(xy, yx)
            votes.setdefault(i, []).append(judge.clamp(avg, *lc.cot_clamp) if lc.mode == "cot" else avg)
            out[i]["orders"].append((xy, yx))
            out[i]["principles"].append(pr.id)
    for i, v in votes.items():
        out[i]["p_a"] = sum(sorted(v)) / len(v)  # the label stage's ensemble mean
    return out


def own_answers(cfg: PipelineConfig, info, engine, gold: list[dict]) -> list[str | None]:
    """The policy's answer to each gold prompt, as the generate stage writes it (its template, system prompt, sampling
    and stops; an empty answer or one that only repeats the request is None)."""
    mcfg, sampling = cfg.models.policy, cfg.generate.sampling
    plain = mcfg.prompt_format == "plain"
    render_ = templates.plain_generate if plain else templates.chat_generate
    stop = templates.PLAIN_STOPS + sampling.stop if plain else sampling.stop
    prompts = [render_(with_system(g["prompt"], cfg.generate.system_prompt), info.special_tokens) for g in gold]
    ids = encode_all(engine, prompts)
    keep = [k for k, t in enumerate(ids) if len(t) + sampling.max_tokens <= engine.max_model_len]
    comps = engine.generate([ids[k] for k in keep], sampling,
                            [job_seed(cfg.seed, row_id("gold-own", gold[k]["id"])) for k in keep], stop)
    out: list[str | None] = [None] * len(gold)
    for k, c in zip(keep, comps):
        _, answer = split_reasoning(c.text)
        text, status, _ = parse_completion(answer, templates.clean_output, False, gold[k]["prompt"][-1]["content"])
        out[k] = text if status == "ok" else None
    return out


def self_preference(cfg: PipelineConfig, constitution, info, engine, gold: list[dict]) -> dict:
    """Self-preference of a judge that is also the policy. The judge first answers every gold prompt itself, as the
    generate stage would; then each own answer is judged against the gold set's preferred answer exactly as a gold
    pair (same principles, both orders, same ensemble). `self_preference` is the share of gold prompts (with a usable
    own answer) where the judge's label favours its own answer (P(own better) > 0.5); `self_preference_mean` the
    mean P(own better). The gold answers are written to be clearly good, so an unbiased judge of a weak policy
    scores low; a high figure says the judge favours text like its own over better text."""
    own = own_answers(cfg, info, engine, gold)
    pairs = [{"key": g["id"], "prompt": g["prompt"], "a": o, "b": g[g["preferred"]],
              "principle": g["principle"]} for g, o in zip(gold, own) if o and o.strip() != g[g["preferred"]]]
    res = [r["p_a"] for r in judge_pairs(cfg, constitution, info, engine, pairs) if r["p_a"] is not None]
    return {"self_preference": sum(p > 0.5 for p in res) / len(res) if res else None,
            "self_preference_mean": sum(res) / len(res) if res else None, "self_preference_n": len(res),
            "self_preference_unusable": len(gold) - len(pairs)}


def calibrate(cfg: PipelineConfig, constitution, info, engine, gold: list[dict], measure_self: bool) -> dict:
    """The calibration report of the judge (`engine`, `info`) on the gold pairs (factory.calibration.report's
    figures, plus how the principles were chosen, the seconds it took, and per pair its label)."""
    t0 = time.perf_counter()
    names = {p.id for p in constitution.principles}
    pairs = [{"key": g["id"], "prompt": g["prompt"], "a": g["a"], "b": g["b"], "principle": g["principle"]}
             for g in gold]
    judged = judge_pairs(cfg, constitution, info, engine, pairs)
    items = []
    for g, r in zip(gold, judged):
        label = None if r["p_a"] is None else (r["p_a"] if g["preferred"] == "a" else 1.0 - r["p_a"])
        items.append({**{k: g[k] for k in ("id", "kind", "preferred", "a", "b")}, "label": label,
                      "orders": r["orders"], "principles": r["principles"]})
    rep = report(items, cfg.label.tie_threshold)
    rep["principles"] = {"pinned": sum(bool(g["principle"]) and g["principle"] in names for g in gold),
                         "sampled": sum(not g["principle"] or g["principle"] not in names for g in gold)}
    rep["seconds_judging"] = time.perf_counter() - t0
    if measure_self:
        rep.update(self_preference(cfg, constitution, info, engine, gold))
    rep["pairs"] = [{"id": it["id"], "kind": it["kind"], "label": it["label"], "principles": it["principles"]}
                    for it in items]
    rep.update(judge=info.label, mode=cfg.label.mode, constitution=constitution.id,
               seconds=time.perf_counter() - t0)
    return rep


# ---- the store ---------------------------------------------------------------------------------------------------

def save(store: Store, model_id: str, gold_path: str, sha: str, s_hash: str, rep: dict, plot_dir: Path | None) -> dict:
    """Store a calibration (and draw its reliability plot into `plot_dir`, default the store's folder)."""
    created = now()
    cid = row_id("calibration", model_id, s_hash, sha, created.isoformat())
    plot = Path(plot_dir or store.path.parent) / f"calibration-{cid}.png"
    rep = {**rep, "plot": reliability_plot(rep, plot, f"judge {model_id} on {Path(gold_path).name}")}
    store.insert("judge_calibrations", [{"calibration_id": cid, "model_id": model_id, "gold_path": str(gold_path),
                                         "gold_sha256": sha, "settings_hash": s_hash, "report": json.dumps(rep),
                                         "created_at": created}])
    return {"calibration_id": cid, "model_id": model_id, "gold_path": str(gold_path), "gold_sha256": sha,
            "settings_hash": s_hash, "report": rep, "created_at": created}


def _rows(store: Store, where: str, params: list) -> list[dict]:
    if not store._has("judge_calibrations"):  # a store written before calibrations existed, opened read-only
        return []
    rows = store.query(f"SELECT * FROM judge_calibrations WHERE {where} ORDER BY created_at DESC LIMIT 1", params)
    for r in rows:
        r["report"] = json.loads(r["report"])
    return rows


def find(store: Store, model_id: str, s_hash: str, sha: str, need_self: bool = False) -> dict | None:
    """The latest calibration of this judge, settings and gold file (one that measured self-preference if asked)."""
    extra = " AND json_extract(report, '$.self_preference_n') IS NOT NULL" if need_self else ""
    rows = _rows(store, "model_id = ? AND settings_hash = ? AND gold_sha256 = ?" + extra, [model_id, s_hash, sha])
    return rows[0] if rows else None


def latest(store: Store, model_id: str) -> dict | None:
    """The latest calibration of a judge (as comparisons.model_id names it), whatever its settings."""
    rows = _rows(store, "model_id = ?", [model_id])
    return rows[0] if rows else None


def latest_for_run(store: Store, run_id: str) -> dict | None:
    """The latest calibration of the judge whose comparisons run `run_id` has."""
    judges = store.run_sql("""SELECT DISTINCT c.model_id FROM comparisons c SEMI JOIN (SELECT id FROM run_rows
                              WHERE run_id = ? AND tbl = 'comparisons') m ON m.id = c.comparison_id""", [run_id])
    found = [c for (m,) in judges if (c := latest(store, m))]
    return max(found, key=lambda c: c["created_at"]) if found else None


# ---- the gate ----------------------------------------------------------------------------------------------------

def failures(gate, rep: dict) -> list[str]:
    """The thresholds of `gate` (label.gate) the report misses, each as 'figure value op threshold'; a figure that
    could not be measured (no pair judged) fails its threshold."""
    out = []
    checks = [("accuracy", rep.get("accuracy"), gate.min_accuracy, "<", lambda v, t: v >= t),
              ("order disagreement", rep.get("mean_order_disagreement"), gate.max_order_disagreement, ">",
               lambda v, t: v <= t),
              ("|length bias|", None if rep.get("length_bias") is None else abs(rep["length_bias"]),
               gate.max_length_bias, ">", lambda v, t: v <= t)]
    for name, value, threshold, op, ok in checks:
        if threshold is None:
            continue
        if value is None:
            out.append(f"{name} not measured (no gold pair judged)")
        elif not ok(value, threshold):
            out.append(f"{name} {value:.2f} {op} {threshold:.2f}")
    return out


def check_config(cfg: PipelineConfig) -> None:
    """Bad input before any model loads: the gate's gold file must load (exit 2 naming the file and line)."""
    if cfg.label.enabled and cfg.label.gate is not None:
        load_gold(cfg.label.gate.gold)


def check_gate(ctx, cfg: PipelineConfig, constitution, get_engine, info) -> dict | None:
    """The label stage's gate: None without one; else the stored calibration for this judge, settings and gold file
    (calibrated now on the stage's judge engine when none is stored) and its verdict, {"calibration", "failed",
    "failures"}."""
    gate = cfg.label.gate
    if gate is None:
        return None
    sha = gold_sha256(gate.gold)
    s_hash = settings_hash(settings(cfg, constitution, info))
    need_self = gate.self_preference and cfg.judge == cfg.models.policy
    found = find(ctx.store, info.label, s_hash, sha, need_self)
    if found is None:
        gold = load_gold(gate.gold)
        ctx.store.release()  # readers may open the store while the engine starts
        ctx.log(f"label: calibrating the judge on {gate.gold} ({len(gold)} gold pairs)")
        rep = calibrate(cfg, constitution, info, get_engine(), gold, need_self)
        found = save(ctx.store, info.label, gate.gold, sha, s_hash, rep, None)
    fails = failures(gate, found["report"])
    if fails:
        ctx.log(f"label: the judge failed the gate ({'; '.join(fails)})")
    return {"calibration": found, "failed": bool(fails), "failures": fails}


def gate_summary(store: Store, cfg: PipelineConfig, constitution, info, pair_counts: dict) -> dict | None:
    """What the run summary says about the gate, from the stored calibration (also when the label stage's rows were
    adopted from an earlier run): {"line", "failed", "calibration"}, None without a gate or a stored calibration."""
    gate = cfg.label.gate
    if gate is None or not cfg.label.enabled:
        return None
    found = find(store, info.label, settings_hash(settings(cfg, constitution, info)), gold_sha256(gate.gold))
    if found is None:
        return None
    rep, fails = found["report"], failures(gate, found["report"])
    where = f"{gate.gold} ({rep['n']} pairs)"
    acc = "-" if rep["accuracy"] is None else f"{rep['accuracy']:.2f}"
    if not fails:
        line = f"judge passed the gate on {where}: accuracy {acc}"
    elif gate.enforce:
        line = (f"judge failed the gate: {'; '.join(fails)} on {where}; its {pair_counts.get('judge_failed_gate', 0)} "
                "AI pairs are excluded (label.gate.enforce: false keeps them)")
    else:
        line = (f"judge failed the gate: {'; '.join(fails)} on {where}; its {pair_counts.get('kept', 0)} AI pairs are "
                "kept because label.gate.enforce is false")
    return {"line": line, "failed": bool(fails), "calibration": found}


def run_calibration(cfg: PipelineConfig, gold_path: str, store_path: str | None, plot_dir: str | None,
                    measure_self: bool | None, log=lambda m: None) -> dict:
    """`factory judge calibrate`: load and check everything (bad input: ConfigError before any model loads), judge
    the gold pairs with the pipeline's judge on its own engine, store the calibration. `measure_self` None: measure
    self-preference when the judge is the policy."""
    from factory.constitution import load_constitution
    from factory.engines.base import create_engine
    from factory.models import resolve_model
    from factory.pipeline import check_models

    gold = load_gold(gold_path)
    constitution = load_constitution(cfg.constitution)
    if not cfg.label.enabled:
        cfg = cfg.model_copy(update={"label": cfg.label.model_copy(update={"enabled": True})})
    info = check_models(cfg)["judge"]
    is_policy = cfg.judge == cfg.models.policy
    if measure_self and not is_policy:
        raise ConfigError("--self-preference needs a judge that is also the policy (models.judge omitted or the same "
                          "as models.policy)")
    measure = is_policy if measure_self is None else measure_self
    s_hash, sha = settings_hash(settings(cfg, constitution, info)), gold_sha256(gold_path)
    with Store.open(store_path or cfg.store) as store:  # the writer lock first: exits 1 if a run holds the store
        log(f"starting {cfg.judge.engine} engine for {info.label}")
        engine = create_engine(cfg.judge, str(resolve_model(cfg.judge.path)), cfg.seed)
        try:
            store.release()
            rep = calibrate(cfg, constitution, info, engine, gold, measure)
        finally:
            if hasattr(engine, "close"):
                engine.close()
        return save(store, info.label, gold_path, sha, s_hash, rep, Path(plot_dir) if plot_dir else None)
