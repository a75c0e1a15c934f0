"""`factory eval` renders prompts exactly as training did: the ids it feeds a policy for a stored conversation with a
system prompt are the prompt ids TRL's DPOTrainer built for the same row, and its pair and prompt ids for the
log-probabilities are DPOTrainer's too (real family tokenizers and chat templates, a real DPOTrainer)."""

import pytest

from factory.config import TrainConfig, make_model_config
from factory.conversation import canonical, transcript

pytestmark = pytest.mark.integration

CONVERSATION = [{"role": "system", "content": "You are a terse assistant. Answer in one sentence."},
                {"role": "user", "content": "How do I kill a Python process?"},
                {"role": "assistant", "content": "Use kill with its process id."},
                {"role": "user", "content": "And if it ignores SIGTERM?"}]
ROW = {"pair_id": "pair-1", "prompt_id": "prompt-1", "prompt": transcript(CONVERSATION),
       "messages": canonical(CONVERSATION), "chosen": "Send SIGKILL: kill -9 <pid>.", "rejected": "Reboot.",
       "label": 1.0, "margin": 1.0, "source": "ai_feedback"}


# llama3 keeps the system turn; mistral's template refuses one and gemma3's folds it (both: into the first user turn);
# plain format (base models): Human/Assistant text, as training wrote it
@pytest.mark.parametrize("family,fmt", [("llama3", "chat"), ("mistral", "chat"), ("gemma3", "chat"), ("gemma3", "plain")])
def test_eval_feeds_the_policy_the_prompt_ids_dpo_trained_on(family, fmt, family_models, tmp_path):
    from trl import DPOConfig, DPOTrainer

    from factory.engines.base import create_engine
    from factory.train.common import fold_unsupported_system, load_tokenizer
    from factory.train.data import preference_dataset
    from factory.train.evaluate import policy_inputs, training_examples
    from factory.train.logratio import pair_ids, prompt_ids

    path = str(family_models[family].policy)
    # training's path (common.load_data, dpo.train_dpo): the tokenizer, the fold, TRL's preference format
    tok = load_tokenizer(path, TrainConfig(prompt_format=fmt))
    train_rows = [dict(ROW)]
    if fmt == "chat":
        fold_unsupported_system(train_rows, tok)
    dataset = preference_dataset(train_rows, fmt).select_columns(["prompt", "chosen", "rejected"])
    trainer = DPOTrainer(model=path, args=DPOConfig(output_dir=str(tmp_path), max_length=512, use_cpu=True,
                                                    report_to="none", per_device_train_batch_size=1),
                         train_dataset=dataset, processing_class=tok)
    trl_row = trainer.train_dataset[0]
    # eval's path: the stored row as it is, through the policy's engine
    mcfg = make_model_config(path=path, engine="transformers", prompt_format=fmt)
    engine = create_engine(mcfg, path)
    try:
        fed = policy_inputs(engine, mcfg, [ROW])[0]
    finally:
        engine.close()
    assert fed == trl_row["prompt_ids"]
    assert "ignores SIGTERM" in tok.decode(fed) and "Use kill with its process id" in tok.decode(fed)  # every turn
    assert ("terse assistant" in tok.decode(fed)) == (fmt == "chat")  # the system prompt, where training kept it
    # the ids of the log-probabilities (pair accuracy, KL samples) are DPOTrainer's as well
    example = training_examples([ROW], fmt, tok)[0]
    assert pair_ids(tok, example) == (trl_row["prompt_ids"], trl_row["chosen_ids"], trl_row["rejected_ids"])
    assert prompt_ids(tok, training_examples([{"prompt": ROW["prompt"], "messages": ROW["messages"]}], fmt,
                                             tok)[0]["prompt"]) == fed
