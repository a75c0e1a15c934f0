"""The cost ledger: what a run's data cost, per stage and per kept pair, from the stored rows.

Reads: the run's config (`runs.config`: the prices, `price` per million tokens for an `openai` model, `gpu_hour` for a
local one), its rows (`run_rows`: everything it wanted, written by it or by an earlier run), their token columns
(`prompt_tokens`, `output_tokens` of responses, critiques, revisions and judgments) and the stage seconds in
`run_progress`. Writes nothing; the pipeline stores the result in `runs.stats['cost']` when a run finishes.

Per stage (`generate`, `critique rN`, `revise rN`, `label`, and model-free ones such as `decontaminate`): input and
output tokens summed over the run's rows; seconds are the stage seconds of the runs that wrote those rows, each in
proportion to the share of its rows this run uses (a run that resumed another, or reused an estimate's rows, is
charged for the rows it contains, at the seconds they took). USD: tokens times the price for an `openai` model; for a
local engine, seconds / 3600 x gpu_hour x the GPUs it holds (tensor_parallel_size x pipeline_parallel_size, x
ray.replicas under executor ray); on a CPU gpu_hour reads as the price of one machine-hour. A stage without a
price has usd null; total_usd sums the priced stages (null when none is). All aggregation is SQL.
"""

from __future__ import annotations

import json

from factory import decontam

# Every model-written row with its stage as `run_progress` names it, its writer and tokens, per table.
_ROWS = {
    "responses": "SELECT 'responses' AS tbl, response_id AS id, 'generate' AS stage, run_id AS writer, prompt_tokens, "
                 "output_tokens FROM responses",
    "critiques": "SELECT 'critiques', critique_id, 'critique r' || round, run_id, prompt_tokens, output_tokens "
                 "FROM critiques",
    "revisions": "SELECT 'revisions', revision_id, 'revise r' || round, run_id, prompt_tokens, output_tokens "
                 "FROM revisions",
    "judgments": "SELECT 'judgments', judgment_id, 'label', run_id, prompt_tokens, output_tokens FROM judgments"}

_STAGES_SQL = """
WITH all_rows AS ({rows}),
mine AS (SELECT DISTINCT tbl, id FROM run_rows WHERE run_id = $run),
used AS (SELECT a.* FROM all_rows a SEMI JOIN mine m ON m.tbl = a.tbl AND m.id = a.id),
per_writer AS (SELECT stage, writer, count(*) AS n, coalesce(sum(prompt_tokens), 0) AS pin,
                      coalesce(sum(output_tokens), 0) AS pout FROM used GROUP BY ALL),
written AS (SELECT a.stage, a.writer, count(*) AS total FROM all_rows a
            SEMI JOIN (SELECT DISTINCT writer FROM per_writer) w ON w.writer = a.writer GROUP BY ALL)
SELECT p.stage, sum(p.pin)::BIGINT, sum(p.pout)::BIGINT, sum(coalesce(g.seconds, 0) * p.n / w.total)
FROM per_writer p JOIN written w USING (stage, writer)
LEFT JOIN run_progress g ON g.run_id = p.writer AND g.stage = p.stage
GROUP BY p.stage"""


def stage_order(stage: str) -> tuple:
    """generate, then each round's critique and revise, then label, then stages without a model."""
    name, _, rnd = stage.partition(" r")
    if name in ("critique", "revise") and rnd.isdigit():
        return (1, int(rnd), name == "revise")
    return {"generate": (0,), "label": (2,)}.get(stage, (3, stage))


def stage_model(cfg: dict, stage: str) -> dict | None:
    """The model section that ran a stage: the policy generates; the judge critiques, revises and labels."""
    models = cfg.get("models") or {}
    if stage == "generate":
        return models.get("policy")
    if stage == "label" or stage.startswith(("critique", "revise")):
        return models.get("judge") or models.get("policy")
    return None  # no model (decontaminate)


def gpus(cfg: dict, model: dict) -> int:
    """GPUs a local engine holds while a stage runs (one device for transformers)."""
    n = 1
    if model.get("engine", "vllm") == "vllm":
        n = int(model.get("tensor_parallel_size") or 1) * int((model.get("engine_args") or {}).get(
            "pipeline_parallel_size") or 1)
    if cfg.get("executor") == "ray":
        n *= int((cfg.get("ray") or {}).get("replicas") or 1)
    return n


def stage_usd(cfg: dict, stage: str, input_tokens: int, output_tokens: int, seconds: float) -> float | None:
    """USD of one stage at the config's prices, or None when its model has no price (or it has no model)."""
    model = stage_model(cfg, stage)
    if not model:
        return None
    if model.get("engine") == "openai":
        price = model.get("price")
        if not price:
            return None
        return (input_tokens * price.get("input_per_million", 0.0) +
                output_tokens * price.get("output_per_million", 0.0)) / 1e6
    rate = model.get("gpu_hour")
    return None if rate is None else seconds / 3600.0 * rate * gpus(cfg, model)


def kept_pairs(store, run_id: str) -> int:
    """The run's pairs that export and training use: not dropped, and no side flagged by decontamination."""
    return store.run_sql(f"""SELECT count(*) FROM preference_pairs pp SEMI JOIN (SELECT id FROM run_rows
                             WHERE run_id = ? AND tbl = 'preference_pairs') m ON m.id = pp.pair_id
                             WHERE pp.dropped_reason IS NULL
                               AND {decontam.clean_sql(store, 'pp.prompt_id', 'pp.chosen_id', 'pp.rejected_id')}""",
                         [run_id])[0][0]


def summarise(stages: dict[str, dict], kept: int) -> dict:
    """The cost dict from its per-stage figures (`stages`: input_tokens, output_tokens, seconds, usd)."""
    priced = [s["usd"] for s in stages.values() if s["usd"] is not None]
    total = sum(priced) if priced else None
    return {"currency": "USD", "stages": stages, "total_usd": total, "kept_pairs": kept,
            "usd_per_kept_pair": total / kept if total is not None and kept else None}


def run_cost(store, run_id: str) -> dict:
    """{"currency": "USD", "stages": {stage: {input_tokens, output_tokens, seconds, usd}}, "total_usd", "kept_pairs",
    "usd_per_kept_pair"} for any pipeline run, from the stored rows (see the module docstring)."""
    row = store.run_sql("SELECT config FROM runs WHERE run_id = ?", [run_id])
    if not row:
        raise ValueError(f"run {run_id!r} not found in {store.path}")
    cfg = json.loads(row[0][0] or "{}")
    if not store._has("run_rows"):  # a store from before run membership: no way to tell a run's rows
        return summarise({}, 0)
    has_progress = store._has("run_progress")
    # A reader cannot migrate a store written by an older factory: only the tables it has.
    sql = _STAGES_SQL.replace("{rows}", " UNION ALL ".join(q for t, q in _ROWS.items() if store._has(t)))
    sql = sql if has_progress else sql.replace(
        "LEFT JOIN run_progress g ON g.run_id = p.writer AND g.stage = p.stage",
        "LEFT JOIN (SELECT NULL AS run_id, NULL AS stage, 0.0 AS seconds) g ON FALSE")
    figures = {s: (int(pin), int(pout), float(sec or 0.0))
               for s, pin, pout, sec in store.con.execute(sql, {"run": run_id}).fetchall()}
    if has_progress:  # stages without model rows (decontaminate): their own seconds in this run
        for stage, sec in store.run_sql("SELECT stage, seconds FROM run_progress WHERE run_id = ?", [run_id]):
            figures.setdefault(stage, (0, 0, float(sec or 0.0)))
    stages = {s: {"input_tokens": pin, "output_tokens": pout, "seconds": sec, "usd": stage_usd(cfg, s, pin, pout, sec)}
              for s, (pin, pout, sec) in sorted(figures.items(), key=lambda kv: stage_order(kv[0]))}
    return summarise(stages, kept_pairs(store, run_id))
