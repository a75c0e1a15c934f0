"""`factory run CONFIG --estimate`: run a small sample of the prompts through every stage and project tokens, time,
cost and kept pairs for the whole prompt set, before starting it.

The sample is `sample` prompts spread evenly over the (deduplicated, limited) prompt file, the same ones every time.
They run as an ordinary pipeline over the store, recorded as a run of kind `estimate` (so `latest` in export,
publish and training never picks it): their rows are stored, and a later full run reuses them (row ids are content
hashes); nothing else is stored. The projection is the sample's cost ledger (factory/cost.py: tokens over its rows,
seconds of the runs that wrote them, USD at the config's prices) times prompts / sample, stored with the run in
`runs.stats['estimate']`. Engine start-up is not in the stage seconds; a full run batches more prompts at once, so
its seconds per prompt are usually lower than the sample's (the projection leans high on time).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from factory.config import PipelineConfig
from factory.constitution import load_constitution
from factory.prompts import stage_prompts

DEFAULT_SAMPLE = 16


def sample_positions(total: int, k: int) -> list[int]:
    """k positions spread evenly over 0..total-1 (the middle of each of k equal slices), deterministic."""
    k = min(k, total)
    return [int((i + 0.5) * total / k) for i in range(k)]


def _write_sample(staged: Path, out: Path, positions: list[int]) -> None:
    want, start = set(positions), 0
    with pq.ParquetWriter(out, pq.read_schema(staged)) as writer:
        for batch in pq.ParquetFile(staged).iter_batches(batch_size=50_000):
            rows = [i - start for i in range(start, start + batch.num_rows) if i in want]
            if rows:
                writer.write_table(pa.Table.from_batches([batch]).take(rows))
            start += batch.num_rows


def project(cost: dict, total: int, sample: int) -> dict:
    """The whole prompt set's figures: the sample's cost ledger scaled by total / sample."""
    scale = total / sample if sample else 0.0
    stages = {name: {k: (None if v is None else v * scale) for k, v in s.items()} for name, s in cost["stages"].items()}
    total_usd = None if cost["total_usd"] is None else cost["total_usd"] * scale
    kept = cost["kept_pairs"] * scale
    return {"prompts": total, "sample": sample, "scale": scale, "stages": stages,
            "input_tokens": sum(s["input_tokens"] for s in stages.values()),
            "output_tokens": sum(s["output_tokens"] for s in stages.values()),
            "seconds": sum(s["seconds"] for s in stages.values()), "total_usd": total_usd, "kept_pairs": kept,
            "usd_per_kept_pair": total_usd / kept if total_usd is not None and kept else None,
            "currency": cost["currency"]}


def estimate_pipeline(cfg: PipelineConfig, sample: int = DEFAULT_SAMPLE, config_path: str | None = None,
                      progress=None, log=lambda m: None, engines=None):
    """Run the sample and return (its RunResult, the projection for every prompt)."""
    from factory.decontam import check_benchmarks
    from factory.pipeline import _run, check_models
    from factory.store import Store

    if sample < 1:
        raise ValueError(f"--sample {sample}: give at least 1 prompt")
    check_benchmarks(cfg.decontamination)
    infos = check_models(cfg)
    constitution = load_constitution(cfg.constitution)
    with tempfile.TemporaryDirectory(prefix="factory-estimate-") as tmp:
        staged, picked = Path(tmp) / "prompts.parquet", Path(tmp) / "sample.parquet"
        total = stage_prompts(cfg.prompts, staged)  # bad input fails here, before the store is touched
        positions = sample_positions(total, sample)
        _write_sample(staged, picked, positions)
        result = _run(cfg, config_path, engines, progress, log, infos, constitution, picked, kind="estimate")
    projection = project(result.cost, total, len(positions))
    with Store.open(cfg.store) as store:
        stats = json.loads(store.run_sql("SELECT stats FROM runs WHERE run_id = ?", [result.run_id])[0][0] or "{}")
        store.run_sql("UPDATE runs SET stats = ? WHERE run_id = ?",
                      [json.dumps({**stats, "estimate": projection}), result.run_id])
    return result, projection
