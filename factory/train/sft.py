"""SL-CAI: supervised fine-tuning on the final revisions (Constitutional AI's first stage), with TRL's `SFTTrainer`.

Reads: the store's revisions (the last revision of each response that parsed, of the runs in `data.runs`) and
their prompts; optionally a user's SFT dataset (`sft.mix_dataset`), mixed in at `sft.mix_ratio`. Writes: the
trained model to `<output_root>/<name>/` (LoRA merged), metrics.json and a `train-sft` run in the store.

The data is TRL's prompt-completion format (the prompt rendered as the pipeline rendered it for the policy, plain
or chat), so `SFTTrainer` trains on the completion only (`completion_only_loss`): the prompt is masked from the
loss. The split by prompt is the one every trainer uses (`data.eval_fraction`, `seed`), so an SFT model, the DPO
model trained from it and `factory eval` never see each other's held-out prompts. The result is the natural
starting and reference policy for DPO, KTO and PPO (`model: outputs/<name>`).
"""

from __future__ import annotations

import random
from pathlib import Path

from factory import jsonl
from factory.config import TrainConfig
from factory.conversation import turns_of
from factory.store import row_id
from factory.train import common, trl_utils
from factory.train.data import render_completion, render_prompt, split_by_prompt

# The last revision that parsed of each response (a failed later round leaves the one before it), one row per
# prompt and text.
REVISIONS_SQL = """
WITH final AS (
    SELECT v.revision_id, v.prompt_id, v.text FROM revisions v
    WHERE v.status = 'ok' AND length(trim(v.text)) > 0
      AND {revisions_of_runs}  -- Store.run_scope: the runs' revisions
      AND ($constitution IS NULL OR v.constitution_id = $constitution)
      AND {uncontaminated}  -- neither the prompt nor the revision flagged by decontamination
    QUALIFY v.round = max(v.round) OVER (PARTITION BY v.response_id))
SELECT f.revision_id AS pair_id, f.prompt_id, p.text AS prompt, p.messages, f.text AS completion
FROM final f JOIN prompts p USING (prompt_id)
QUALIFY row_number() OVER (PARTITION BY f.prompt_id, f.text ORDER BY f.revision_id) = 1
ORDER BY f.revision_id
"""


def load_revisions(cfg: TrainConfig) -> list[dict]:
    from factory.store import Store

    d = cfg.data
    with Store.open(d.store, read_only=True) as store:
        scope = store.run_scope(d.runs, kind="pipeline")
        from factory.decontam import clean_sql

        rows = store.query(REVISIONS_SQL.format(revisions_of_runs=scope.sql("revisions", "v"),
                                                uncontaminated=clean_sql(store, "v.prompt_id", "v.revision_id")),
                           {"constitution": d.constitution_id})
        if store._has("guard_flags"):  # a revision that addresses the judge (factory/guard.py) is no SFT target
            flagged = {r[0] for r in store.run_sql("SELECT row_id FROM guard_flags WHERE tbl = 'revisions'")}
            rows = [r for r in rows if r["pair_id"] not in flagged]
    if not rows:
        raise ValueError(f"no revisions in {d.store} for data.runs={d.runs}, data.constitution_id={d.constitution_id}; "
                         "run a pipeline with critique and revise first (factory run ...) or relax the filters")
    return rows


def _user_rows(path: str) -> list[dict]:
    """A user's SFT data: a JSONL file or a `datasets` folder (saved with save_to_disk; its train split if it has
    splits), each record either `messages` (a conversation ending with the assistant's turn) or `prompt` and
    `completion` (text, or TRL's conversational lists)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"sft.mix_dataset: {path} does not exist; give a JSONL file or a datasets folder")
    if p.is_dir():
        from datasets import DatasetDict, load_from_disk

        ds = load_from_disk(str(p))
        if isinstance(ds, DatasetDict):
            if "train" not in ds:
                raise ValueError(f"sft.mix_dataset: {path} has splits {list(ds)} but no 'train'")
            ds = ds["train"]
        return [_user_record(r, f"{path}, row {i}") for i, r in enumerate(ds)]
    out = [_user_record(record, jsonl.where(path, n)) for n, record in jsonl.records(p, "sft.mix_dataset: ")]
    if not out:
        raise ValueError(f"sft.mix_dataset: {path} has no records")
    return out


def _user_record(r, where: str) -> dict:
    """(turns before the answer, answer text) of one user record."""
    if not isinstance(r, dict):
        raise ValueError(f"sft.mix_dataset: {where}: expected an object with 'messages' or 'prompt' and 'completion'")
    if r.get("messages"):
        turns = r["messages"]
        if not isinstance(turns, list) or not turns or not isinstance(turns[-1], dict) or \
                turns[-1].get("role") != "assistant" or len(turns) < 2:
            raise ValueError(f"sft.mix_dataset: {where}: 'messages' must be a list of turns ending with the "
                             "assistant's answer")
        return {"turns": turns[:-1], "completion": turns[-1]["content"]}
    if "prompt" in r and "completion" in r:
        prompt, completion = r["prompt"], r["completion"]
        turns = prompt if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
        if isinstance(completion, list):
            completion = completion[-1]["content"] if completion and isinstance(completion[-1], dict) else ""
        if not str(completion).strip():
            raise ValueError(f"sft.mix_dataset: {where}: the completion is empty")
        return {"turns": turns, "completion": str(completion)}
    raise ValueError(f"sft.mix_dataset: {where}: expected 'messages', or 'prompt' and 'completion'; got keys "
                     f"{sorted(r)}")


def _example(turns: list[dict], completion: str, fmt: str) -> dict:
    # Plain prompts end with "Assistant:" and the completion starts with a space, as the pipeline rendered them.
    return {"prompt": render_prompt("", fmt, turns), "completion": render_completion(completion, fmt)}


def mix(own: list[dict], user: list[dict], ratio: float, seed: int) -> tuple[list[dict], dict]:
    """`own` plus enough of `user` (sampled with `seed`) that the user's share of the result is `ratio`; all of
    `user` when it has fewer rows. Returns the mixed rows (shuffled) and the counts."""
    want = round(len(own) * ratio / (1 - ratio)) if ratio > 0 else 0
    rng = random.Random(seed)
    picked = rng.sample(user, want) if want < len(user) else list(user)
    rows = own + picked
    rng.shuffle(rows)
    return rows, {"mix_rows": len(picked), "mix_rows_available": len(user),
                  "mix_share": round(len(picked) / len(rows), 4) if rows else 0.0}


def sft_trainer(cfg: TrainConfig):
    """(TRL's SFTTrainer over the run's final revisions, mixed with the user's data; the data's figures)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    out, path = common.output_dir(cfg), common.model_path(cfg)
    tok = common.load_tokenizer(path, cfg)
    rows = load_revisions(cfg)
    if cfg.prompt_format == "chat":
        common.fold_unsupported_system(rows, tok)
    train_rows, eval_rows = split_by_prompt(rows, cfg.data.eval_fraction, cfg.seed)
    if cfg.data.max_pairs:
        train_rows = train_rows[: cfg.data.max_pairs]
    fmt = cfg.prompt_format

    def examples(rs: list[dict]) -> list[dict]:
        return [_example(turns_of(r["prompt"], r["messages"]), r["completion"], fmt) for r in rs]

    mixed, mix_info = examples(train_rows), {}
    if cfg.sft.mix_dataset:
        user = [_example(u["turns"], u["completion"], fmt) for u in _user_rows(cfg.sft.mix_dataset)]
        mixed, mix_info = mix(mixed, user, cfg.sft.mix_ratio, cfg.seed)
    held_out = examples(eval_rows)
    data = common.TrainData(train=train_rows, eval=eval_rows, pair_ids_hash=row_id(*sorted(r["pair_id"] for r in train_rows)),
                            info={"train_revisions": len(train_rows), "eval_revisions": len(eval_rows),
                                  "train_prompts": len({r["prompt_id"] for r in train_rows}),
                                  "eval_prompts": len({r["prompt_id"] for r in eval_rows}), **mix_info})
    args = SFTConfig(**common.trl_args(cfg, "sft", out, max_length=cfg.optim.max_length, completion_only_loss=True,
                                       model_init_kwargs={"trust_remote_code": cfg.trust_remote_code}))
    trainer = SFTTrainer(model=path, args=args, train_dataset=Dataset.from_list(mixed), processing_class=tok,
                         eval_dataset=Dataset.from_list(held_out) if held_out else None,
                         peft_config=common.peft_config(cfg))
    return trainer, data


def train_sft(cfg: TrainConfig) -> dict:
    trainer, data = sft_trainer(cfg)
    out = common.output_dir(cfg)
    result = trainer.train()
    metrics = {**trl_utils.base_metrics(cfg, "sft", data, out), **trl_utils.train_summary(trainer, result)}
    if data.eval:  # loss on the held-out prompts' revisions (completion tokens only)
        metrics.update(trl_utils.float_metrics(trainer.evaluate()))
    metrics.update(trl_utils.save_trained(trainer, trainer.processing_class, out, common.model_path(cfg)))
    return trl_utils.finish_run(cfg, "sft", data, out, metrics)
