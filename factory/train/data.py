"""Store -> training data: preference pairs filtered by run, source, constitution and margin, split into
train and eval by prompt id (deterministic; no prompt is in both), rendered as TRL's dataset formats.

Prompts are rendered as the pipeline rendered them for the policy: `plain` ("Human: ...\\n\\nAssistant:"
with the completion after a space) for base models, `chat` (conversational messages) for instruct models.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict

from datasets import Dataset

from factory.config import TrainDataConfig
from factory.conversation import turns_of
from factory.decontam import clean_sql
from factory.store import Store

PAIRS_SQL = """
SELECT pp.pair_id, pp.prompt_id, p.text AS prompt, p.messages, pp.chosen_text AS chosen, pp.rejected_text AS rejected,
       pp.source, pp.run_id, pp.constitution_id, coalesce(pp.label, 1.0) AS label,
       coalesce(pp.margin, 1.0) AS margin
FROM preference_pairs pp JOIN prompts p USING (prompt_id)
WHERE pp.dropped_reason IS NULL AND list_contains($sources, pp.source)
  AND {pairs_of_runs}  -- Store.run_scope: the runs' pairs (run_rows, or their families in an older store)
  AND {uncontaminated}  -- no side flagged by decontamination (factory/decontam.py)
  AND ($constitution IS NULL OR pp.constitution_id = $constitution)
  AND coalesce(pp.margin, 1.0) >= $min_margin
ORDER BY pp.pair_id
"""


def load_pairs(cfg: TrainDataConfig) -> list[dict]:
    """Kept preference pairs matching the filters; `label` is P(chosen) (1.0 for revision pairs)."""
    with Store.open(cfg.store, read_only=True) as store:
        scope = store.run_scope(cfg.runs, kind="pipeline")
        rows = store.query(PAIRS_SQL.format(pairs_of_runs=scope.sql("preference_pairs", "pp"), uncontaminated=clean_sql(
                               store, "pp.prompt_id", "pp.chosen_id", "pp.rejected_id")),
                           {"sources": cfg.sources, "constitution": cfg.constitution_id, "min_margin": cfg.min_margin})
    if not rows:
        raise ValueError(f"no preference pairs in {cfg.store} match data.sources={cfg.sources}, data.runs={cfg.runs}, "
                         f"data.constitution_id={cfg.constitution_id}, data.min_margin={cfg.min_margin}; run a "
                         "pipeline first (factory run ...) or relax the filters")
    return rows


def resolve_conflicts(rows: list[dict], policy: str) -> tuple[list[dict], dict[str, int]]:
    """One pair per prompt and pair of texts. Sources overlap: a revision pair says the revision beats the response,
    and the judge's pair over the same two texts may say the opposite; two revision sources (final_vs_initial and
    round_vs_previous after one round) give the same pair twice. Pairs that agree collapse into one: the judge's,
    which carries the soft label (the revision pair under `revision_wins`). Pairs that disagree are a conflict,
    settled by `policy`: `judge_wins` keeps the judge's pair, `revision_wins` the revision pair, `drop_both` neither
    (nor when the side that wins disagrees with itself). Returns the rows kept, in their order, and the counts."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["prompt_id"], frozenset((r["chosen"], r["rejected"])))].append(r)
    keep: set[str] = set()
    counts = {"pairs_loaded": len(rows), "duplicate_pairs": 0, "conflicts": 0, "conflict_pairs_dropped": 0}
    for group in groups.values():
        judge = [r for r in group if r["source"] == "ai_feedback"]
        revision = [r for r in group if r["source"] != "ai_feedback"]
        preferred = revision + judge if policy == "revision_wins" else judge + revision
        if len({(r["chosen"], r["rejected"]) for r in group}) == 1:  # all agree: one of them
            keep.add(preferred[0]["pair_id"])
            counts["duplicate_pairs"] += len(group) - 1
            continue
        counts["conflicts"] += 1
        winners = {"judge_wins": judge, "revision_wins": revision, "drop_both": []}[policy]
        if winners and len({(r["chosen"], r["rejected"]) for r in winners}) == 1:
            keep.add(winners[0]["pair_id"])
            counts["conflict_pairs_dropped"] += len(group) - len(winners)
            counts["duplicate_pairs"] += len(winners) - 1
        else:
            counts["conflict_pairs_dropped"] += len(group)
    kept = [r for r in rows if r["pair_id"] in keep]
    return kept, {**counts, "pairs_kept": len(kept)}


def is_eval_prompt(prompt_id: str, eval_fraction: float, seed: int = 0) -> bool:
    """Deterministic split by prompt: the same prompt always lands on the same side."""
    h = int(hashlib.sha256(f"{seed}:{prompt_id}".encode()).hexdigest()[:8], 16)
    return h / 0xFFFFFFFF < eval_fraction


def split_by_prompt(rows: list[dict], eval_fraction: float, seed: int = 0) -> tuple[list[dict], list[dict]]:
    train = [r for r in rows if not is_eval_prompt(r["prompt_id"], eval_fraction, seed)]
    evals = [r for r in rows if is_eval_prompt(r["prompt_id"], eval_fraction, seed)]
    if eval_fraction > 0 and not evals and len({r["prompt_id"] for r in rows}) > 1:
        # Tiny stores: hold out the prompt that hashes closest to the eval side, so evaluation has data.
        last = max({r["prompt_id"] for r in rows}, key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).hexdigest())
        train = [r for r in rows if r["prompt_id"] != last]
        evals = [r for r in rows if r["prompt_id"] == last]
    return train, evals


def render_prompt(prompt: str, fmt: str, messages: str | list | None = None):
    """A stored prompt (its text, or its conversation when it has `messages`) in TRL's format: the turns as
    messages for chat, Human/Assistant text ending with the assistant's cue for plain."""
    turns = turns_of(prompt, messages)
    if fmt == "chat":
        return turns
    return "\n\n".join(f"{'Human' if t['role'] == 'user' else 'Assistant'}: {t['content']}"
                       for t in turns if t["role"] != "system") + "\n\nAssistant:"


def render_completion(text: str, fmt: str):
    if fmt == "chat":
        return [{"role": "assistant", "content": text}]
    return " " + text


def preference_dataset(rows: list[dict], fmt: str = "plain") -> Dataset:
    """TRL's preference format: prompt / chosen / rejected, plus the soft label and margin."""
    return Dataset.from_list([{"prompt": render_prompt(r["prompt"], fmt, r.get("messages")),
                               "chosen": render_completion(r["chosen"], fmt),
                               "rejected": render_completion(r["rejected"], fmt),
                               "label_prob": float(r["label"]), "margin": float(r["margin"]),
                               "prompt_id": r["prompt_id"]} for r in rows])


def unpaired_dataset(rows: list[dict], fmt: str = "plain") -> tuple[Dataset, dict[str, int]]:
    """TRL's unpaired format for KTO (TRL's `unpair_preference_dataset`: each pair gives a desirable and an
    undesirable completion). A completion of a prompt that is desirable in one pair and undesirable in another
    (a first revision, beaten by the second) has no label KTO can learn: all its rows are dropped. Repeats of the
    same completion and label are kept once. Returns the dataset and those counts."""
    from trl.data_utils import unpair_preference_dataset

    unpaired = unpair_preference_dataset(preference_dataset(rows, fmt)).to_list()
    labels: dict[tuple, set[bool]] = defaultdict(set)
    for r in unpaired:
        labels[_completion_key(r)].add(r["label"])
    out, seen = [], set()
    for r in unpaired:
        key = _completion_key(r)
        if len(labels[key]) == 1 and key not in seen:
            seen.add(key)
            out.append(r)
    counts = {"unpaired_rows": len(unpaired), "ambiguous_completions": sum(len(v) > 1 for v in labels.values()),
              "rows_kept": len(out)}
    return Dataset.from_list(out), counts


def _completion_key(r: dict) -> tuple[str, str]:
    return r["prompt_id"], json.dumps(r["completion"], sort_keys=True)


def prompt_texts(rows: list[dict]) -> list[tuple[str, str]]:
    """Distinct (prompt_id, prompt text) pairs, for PPO rollouts and policy evaluation."""
    seen: dict[str, str] = {}
    for r in rows:
        seen.setdefault(r["prompt_id"], r["prompt"])
    return sorted(seen.items())
