"""Store -> `datasets` in TRL's formats, deduplicated, split by prompt.

Formats (TRL's dataset formats, loadable by its trainers without conversion):
- `preference`: prompt / chosen / rejected as text (HH-RLHF style "Human: ...\\n\\nAssistant:" prompt),
- `preference_chat`: the same as conversational message lists,
- `unpaired`: prompt / completion / label for KTO (each pair gives a desirable and an undesirable example),
- `sft`: revisions as chat `messages` (user prompt, assistant revision).
Soft label (`label_prob` = P(chosen)) and `margin` columns come along where the store has them.

Deduplication before export: exact duplicates (normalised text hash) are removed, and near-duplicate
prompts (MinHash LSH from `datasketch`) are grouped so a group always lands in one split.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

from datasets import Dataset, DatasetDict

from factory.decontam import clean_sql
from factory.store import Store
from factory.train.data import is_eval_prompt, render_completion, render_prompt

FORMATS = ("preference", "preference_chat", "unpaired", "sft")


@dataclass
class ExportFilter:
    runs: list[str] = field(default_factory=list)  # pipeline runs whose rows to export ('latest' allowed; [] = all)
    principle: str | None = None
    min_margin: float = 0.0
    sources: list[str] = field(default_factory=lambda: ["ai_feedback", "final_vs_initial", "round_vs_previous"])
    test_fraction: float = 0.1
    seed: int = 0
    near_dup_threshold: float = 0.8


# {pairs_of_runs} / {revisions_of_runs}: the rows of the runs asked for (Store.run_scope: their run_rows, or for a
# store written before run_rows, the rows their families wrote). {pairs_of_families}: only that fallback; there a
# revision also counts when its prompt has a pair of the family (revisions reused from another pipeline's run).
PAIRS_SQL = """
SELECT pp.pair_id, pp.prompt_id, p.text AS prompt, p.messages, pp.chosen_text AS chosen, pp.rejected_text AS rejected,
       pp.source, pp.principle_id, pp.constitution_id, pp.label AS label_prob, pp.margin, pp.run_id
FROM preference_pairs pp JOIN prompts p USING (prompt_id)
WHERE pp.dropped_reason IS NULL AND list_contains($sources, pp.source)
  AND {pairs_of_runs}
  AND {uncontaminated}  -- no side flagged by decontamination (factory/decontam.py)
  AND ($principle IS NULL OR list_contains(string_split(coalesce(pp.principle_id, ''), ','), $principle))
  AND coalesce(pp.margin, 1.0) >= $min_margin
ORDER BY pp.label IS NULL, pp.pair_id  -- of exact duplicates, keep the one with a soft label
"""

SFT_SQL = """
SELECT v.revision_id, v.prompt_id, p.text AS prompt, p.messages, v.text AS revision, v.principle_id, v.round,
       v.constitution_id, v.run_id
FROM revisions v JOIN prompts p USING (prompt_id)
WHERE v.status = 'ok' AND length(trim(v.text)) > 0
  AND ({revisions_of_runs} OR v.prompt_id IN (SELECT prompt_id FROM preference_pairs pp WHERE {pairs_of_families}))
  AND ($principle IS NULL OR v.principle_id = $principle)
  AND {uncontaminated}
ORDER BY v.revision_id
"""


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.lower()).strip()


def text_hash(*texts: str) -> str:
    return hashlib.sha256("\x1f".join(normalise(t) for t in texts).encode()).hexdigest()


def prompt_groups(prompts: dict[str, str], threshold: float) -> dict[str, str]:
    """prompt_id -> group id: near-duplicate prompts (Jaccard >= threshold on word 3-grams) share a group."""
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=128)
    group: dict[str, str] = {}
    for pid in sorted(prompts):
        words = normalise(prompts[pid]).split()
        shingles = {" ".join(words[i:i + 3]) for i in range(max(1, len(words) - 2))}
        mh = MinHash(num_perm=128, seed=1)
        for s in shingles:
            mh.update(s.encode())
        near = lsh.query(mh)
        group[pid] = group[min(near)] if near else pid
        lsh.insert(pid, mh)
    return group


def _dedup(rows: list[dict], key_fields: tuple[str, ...], f: ExportFilter) -> tuple[list[dict], dict]:
    seen, kept = set(), []
    for r in rows:
        h = text_hash(*(r[k] for k in key_fields))
        if h not in seen:
            seen.add(h)
            kept.append(r)
    groups = prompt_groups({r["prompt_id"]: r["prompt"] for r in kept}, f.near_dup_threshold)
    for r in kept:
        r["split_group"] = groups[r["prompt_id"]]
    stats = {"rows_before": len(rows), "exact_duplicates_removed": len(rows) - len(kept),
             "prompts": len(groups), "near_duplicate_prompts_grouped": sum(1 for p, g in groups.items() if p != g)}
    return kept, stats


def _records(fmt: str, rows: list[dict]) -> list[dict]:
    if fmt in ("preference", "preference_chat"):
        style = "plain" if fmt == "preference" else "chat"
        return [{"prompt": render_prompt(r["prompt"], style, r["messages"]), "chosen": render_completion(r["chosen"], style),
                 "rejected": render_completion(r["rejected"], style), "label_prob": r["label_prob"],
                 "margin": r["margin"], "source": r["source"], "principle_id": r["principle_id"],
                 "prompt_id": r["prompt_id"], "pair_id": r["pair_id"]} for r in rows]
    if fmt == "unpaired":
        out = []
        for r in rows:
            for text, label in ((r["chosen"], True), (r["rejected"], False)):
                out.append({"prompt": render_prompt(r["prompt"], "plain", r["messages"]), "completion": render_completion(text, "plain"),
                            "label": label, "label_prob": r["label_prob"], "source": r["source"],
                            "prompt_id": r["prompt_id"], "pair_id": r["pair_id"]})
        return out
    if fmt == "sft":
        return [{"messages": render_prompt(r["prompt"], "chat", r["messages"]) + [{"role": "assistant", "content": r["revision"]}],
                 "principle_id": r["principle_id"], "round": r["round"], "prompt_id": r["prompt_id"],
                 "revision_id": r["revision_id"]} for r in rows]
    raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


def build_export(store: Store, fmt: str, f: ExportFilter) -> tuple[DatasetDict, dict]:
    """One format as a DatasetDict with train/test splits (by prompt group), plus the dedup figures."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    scope = store.run_scope(f.runs, kind="pipeline")
    if fmt == "sft":
        sql = SFT_SQL.format(revisions_of_runs=scope.sql("revisions", "v"), pairs_of_families=scope.family_sql("pp"),
                             uncontaminated=clean_sql(store, "v.prompt_id", "v.revision_id"))
        rows = store.query(sql, {"principle": f.principle})
        if store._has("guard_flags"):  # a revision that addresses the judge (factory/guard.py) is no SFT target
            flagged = {r[0] for r in store.run_sql("SELECT row_id FROM guard_flags WHERE tbl = 'revisions'")}
            rows = [r for r in rows if r["revision_id"] not in flagged]
        rows, stats = _dedup(rows, ("prompt", "revision"), f)
    else:
        rows = store.query(PAIRS_SQL.format(pairs_of_runs=scope.sql("preference_pairs", "pp"), uncontaminated=clean_sql(
                               store, "pp.prompt_id", "pp.chosen_id", "pp.rejected_id")),
                           {"principle": f.principle, "min_margin": f.min_margin, "sources": f.sources})
        rows, stats = _dedup(rows, ("prompt", "chosen", "rejected"), f)
    if not rows:
        raise ValueError(f"nothing to export as {fmt}: no rows match runs={f.runs} {scope.runs} "
                         f"principle={f.principle} min_margin={f.min_margin} sources={f.sources}")
    split = {"train": [], "test": []}
    for r in rows:
        split["test" if is_eval_prompt(r["split_group"], f.test_fraction, f.seed) else "train"].append(r)
    dd = DatasetDict({name: Dataset.from_list(_records(fmt, rs)) for name, rs in split.items() if rs})
    stats.update({f"{name}_rows": len(ds) for name, ds in dd.items()})
    return dd, stats


def write_export(dd: DatasetDict, out: str, file_format: str) -> list[str]:
    """Write a DatasetDict as Parquet or JSONL files per split, or as a `datasets` folder."""
    from pathlib import Path

    path = Path(out)
    if file_format == "datasets":
        dd.save_to_disk(str(path))
        return [str(path)]
    path.mkdir(parents=True, exist_ok=True)
    written = []
    for name, ds in dd.items():
        target = path / f"{name}.{ 'parquet' if file_format == 'parquet' else 'jsonl'}"
        (ds.to_parquet if file_format == "parquet" else ds.to_json)(str(target))
        written.append(str(target))
    return written
