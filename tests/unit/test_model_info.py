"""Model identity and the checks made before any engine starts: fingerprints (not paths) in row ids, answer
tokens derived from the judge's own tokenizer, a chat template for chat format, control strings of the model."""

from __future__ import annotations

import os
import shutil

import pytest

from factory.config import ConfigError, PipelineConfig
from factory.judge import ANSWER_CUE
from factory.model_info import (answer_cue, check_chat_template, check_judge_answers, control_strings,
                                load_model_info)


def _model_cfg(path, **kw):
    return PipelineConfig.model_validate({"models": {"policy": {"path": str(path), "engine": "transformers", **kw}}}).models.policy


@pytest.fixture()
def model_copy(tmp_path, tiny_model_dir):
    dst = tmp_path / "m"
    shutil.copytree(tiny_model_dir, dst)
    return dst


def test_same_folder_by_another_path_is_the_same_model(model_copy, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    link = tmp_path / "link"
    os.symlink(model_copy, link)
    keys = {load_model_info(_model_cfg(p), "policy").key for p in ("./m", "m", model_copy, link)}
    assert len(keys) == 1 and next(iter(keys)).startswith("fp:")
    # ... while lineage shows the path as configured
    assert load_model_info(_model_cfg("./m"), "policy").label == "./m"


def test_retrained_weights_in_the_same_folder_are_a_new_model(model_copy):
    import torch
    from transformers import AutoModelForCausalLM

    before = load_model_info(_model_cfg(model_copy), "policy").key
    model = AutoModelForCausalLM.from_pretrained(model_copy)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.add_(0.01)  # one training step's worth of change, in one layer
    model.save_pretrained(model_copy)
    assert load_model_info(_model_cfg(model_copy), "policy").key != before


def test_a_new_chat_template_is_a_new_model(model_copy):
    before = load_model_info(_model_cfg(model_copy), "policy")
    assert not before.has_chat_template
    (model_copy / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    after = load_model_info(_model_cfg(model_copy), "policy")
    assert after.has_chat_template and after.key != before.key


def test_the_shipped_model_keeps_its_name_as_key():
    info = load_model_info(PipelineConfig().models.policy, "policy")
    assert info.key == "gemma-3-270m" and info.label == "gemma-3-270m" and len(info.fingerprint) == 24


def test_openai_identity_includes_server_and_served_name(tiny_model_dir):
    def key(url, name):
        cfg = PipelineConfig.model_validate({"models": {"policy": {
            "path": str(tiny_model_dir), "engine": "openai", "base_url": url, "api_model": name}}}).models.policy
        return load_model_info(cfg, "policy").key
    assert len({key("http://a/v1", "m"), key("http://b/v1", "m"), key("http://a/v1", "n")}) == 3


def test_chat_format_without_a_template_is_a_clear_error(tiny_model_dir):
    info = load_model_info(_model_cfg(tiny_model_dir), "policy")
    with pytest.raises(ConfigError, match=r"models\.policy: .* has no chat template.*prompt_format: plain"):
        check_chat_template(info, "chat")
    check_chat_template(info, "plain")


def test_answer_tokens_follow_how_the_tokenizer_continues_the_cue(shipped_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(shipped_model_dir)
    prefix, (a, b) = answer_cue(tok, ANSWER_CUE)
    assert prefix == tok(ANSWER_CUE, add_special_tokens=False)["input_ids"]  # Gemma: "(" then "A"
    assert tok.convert_ids_to_tokens([a, b]) == ["A", "B"]
    with pytest.raises(ValueError, match="one distinct token each"):
        answer_cue(tok, ANSWER_CUE, labels=("Apple pie with cream", "Banana split"))


def test_unscorable_judge_is_a_config_error_naming_the_model(tiny_model_dir, monkeypatch):
    info = load_model_info(_model_cfg(tiny_model_dir), "judge")
    monkeypatch.setattr("factory.model_info.answer_cue", lambda tok, cue: (_ for _ in ()).throw(ValueError("nope")))
    with pytest.raises(ConfigError, match=r"models\.judge: .* cannot be used as a log-probability judge.*rubric"):
        check_judge_answers(info, ANSWER_CUE)


def test_control_strings_come_from_the_tokenizer(shipped_model_dir):
    from transformers import AutoTokenizer

    strings = control_strings(AutoTokenizer.from_pretrained(shipped_model_dir))
    assert {"<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"} <= set(strings)
    assert all(not s.isspace() for s in strings)


def test_eval_checks_its_models_before_any_engine(tiny_model_dir, tmp_path, monkeypatch):
    """`factory eval`: a chat-format model without a template, or a judge whose answers cannot be scored, is a
    ConfigError (exit 2) before the store is read or an engine starts."""
    from factory.config import EvalConfig
    from factory.train import evaluate as ev

    monkeypatch.setattr("factory.pipeline.Engines.getter", lambda *a: pytest.fail("an engine was requested"))
    base = {"policy": {"path": str(tiny_model_dir), "engine": "transformers"},
            "reference": {"path": str(tiny_model_dir), "engine": "transformers"},
            "data": {"store": str(tmp_path / "missing.duckdb")}}
    cfg = EvalConfig.model_validate({**base, "judge": {"prompt_format": "chat"}})
    with pytest.raises(ConfigError, match=r"models\.judge: .* has no chat template"):
        ev.evaluate(cfg)
    monkeypatch.setattr("factory.model_info.answer_cue", lambda tok, cue: (_ for _ in ()).throw(ValueError("nope")))
    with pytest.raises(ConfigError, match=r"factory eval's win rate"):
        ev.evaluate(EvalConfig.model_validate(base))
