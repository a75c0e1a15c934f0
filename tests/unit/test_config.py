"""Unit tests for factory.config: schema loading, error messages, --set overrides, field descriptions."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from factory import config as config_mod
from factory.config import ConfigError, PipelineConfig, load_pipeline_config, parse_override
from factory.constitution import load_constitution

ROOT = Path(__file__).parents[2]
PIPELINES = sorted((ROOT / "pipelines").glob("*.yaml"))
CONSTITUTIONS = sorted((ROOT / "constitutions").glob("*.yaml"))


def _write(tmp_path: Path, text: str, name: str = "pipe.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


# ---- shipped files ---------------------------------------------------------------------------------

def test_repo_ships_pipelines_and_constitutions():
    # Guards the parametrized tests below against silently running over an empty glob.
    assert PIPELINES, "no pipelines/*.yaml found"
    assert CONSTITUTIONS, "no constitutions/*.yaml found"
    assert (ROOT / "constitutions" / "harmless.yaml") in CONSTITUTIONS


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_every_shipped_pipeline_loads(path):
    import yaml

    raw = yaml.safe_load(path.read_text())
    if "pipeline" in raw:  # a recipe (factory recipe cai): its pipeline and every step's config validate
        from factory.config import load_recipe_config
        from factory.recipe import plan

        recipe = load_recipe_config(path)
        p = plan(recipe)
        assert set(p.steps) == {"sft", "reward", *recipe.methods} and set(p.eval.policies) == {"sft", *recipe.methods}
        assert recipe.name == raw["name"]
        return
    cfg = load_pipeline_config(path)
    assert isinstance(cfg, PipelineConfig)
    # The file's own name key is applied (not just the defaults).
    if "name" in raw:
        assert cfg.name == raw["name"]


@pytest.mark.parametrize("path", CONSTITUTIONS, ids=lambda p: p.name)
def test_every_shipped_constitution_loads(path):
    c = load_constitution(path)
    assert c.principles
    ids = [p.id for p in c.principles]
    assert len(ids) == len(set(ids))


def test_harmless_constitution_has_at_least_16_principles():
    c = load_constitution(ROOT / "constitutions" / "harmless.yaml")
    assert c.id == "harmless"
    assert len(c.principles) >= 16


# ---- error messages ---------------------------------------------------------------------------------

def test_unknown_top_level_key_names_file_key_and_allowed_keys(tmp_path):
    p = _write(tmp_path, "name: x\nmodelz: {}\n")
    with pytest.raises(ConfigError) as ei:
        load_pipeline_config(p)
    msg = str(ei.value)
    assert str(p) in msg
    assert "modelz" in msg
    assert "unknown key" in msg
    # The allowed top-level keys are listed.
    for allowed in ("models", "prompts", "critique", "budget"):
        assert allowed in msg.split("allowed here:")[1]


def test_unknown_nested_key_names_dotted_path(tmp_path):
    p = _write(tmp_path, "models:\n  policy:\n    foo: 1\n")
    with pytest.raises(ConfigError) as ei:
        load_pipeline_config(p)
    msg = str(ei.value)
    assert "models.policy.foo" in msg
    # Allowed keys listed are those of ModelConfig, not of the top level.
    allowed = msg.split("allowed here:")[1]
    assert "engine" in allowed and "max_model_len" in allowed
    assert "critique" not in allowed


def test_wrong_type_names_the_key(tmp_path):
    p = _write(tmp_path, "critique:\n  rounds: two\n")
    with pytest.raises(ConfigError) as ei:
        load_pipeline_config(p)
    msg = str(ei.value)
    assert str(p) in msg
    assert "critique.rounds" in msg
    assert "'two'" in msg


def test_bad_engine_value_lists_allowed_engines(tmp_path):
    p = _write(tmp_path, "models:\n  policy:\n    engine: tensorrt\n")
    with pytest.raises(ConfigError) as ei:
        load_pipeline_config(p)
    msg = str(ei.value)
    assert "models.policy.engine" in msg
    assert "vllm" in msg and "transformers" in msg
    assert "tensorrt" in msg


def test_malformed_yaml_names_file_and_line(tmp_path):
    # Line 3 has an unclosed flow mapping.
    p = _write(tmp_path, "name: ok\nseed: 1\ncritique: {rounds: 1\nbudget: {}\n")
    with pytest.raises(ConfigError) as ei:
        load_pipeline_config(p)
    msg = str(ei.value)
    assert str(p) in msg
    assert "malformed YAML" in msg
    assert "line " in msg
    # The reported line is a real line in the file (the error is detected at/after the bad line).
    line_no = int(msg.split("line ")[1].split(",")[0])
    assert 3 <= line_no <= 5


def test_malformed_yaml_reports_the_right_line(tmp_path):
    # A tab used for indentation on line 4 is a scanner error whose mark is exactly on line 4.
    p = _write(tmp_path, "name: ok\nseed: 1\ncritique:\n\trounds: 1\n")
    with pytest.raises(ConfigError) as ei:
        load_pipeline_config(p)
    assert "line 4" in str(ei.value)


def test_missing_file_is_config_error(tmp_path):
    p = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="file not found") as ei:
        load_pipeline_config(p)
    assert str(p) in str(ei.value)


def test_top_level_list_is_config_error(tmp_path):
    p = _write(tmp_path, "- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_pipeline_config(p)


# ---- --set overrides --------------------------------------------------------------------------------

def test_overrides_apply_with_yaml_typing(tmp_path):
    p = _write(tmp_path, "critique:\n  rounds: 1\nbudget:\n  max_output_tokens: 500\n")
    base = load_pipeline_config(p)
    assert base.critique.rounds == 1 and base.budget.max_output_tokens == 500
    assert base.models.policy.engine == "vllm"
    cfg = load_pipeline_config(p, ["critique.rounds=3", "models.policy.engine=transformers",
                                   "budget.max_output_tokens=null"])
    assert cfg.critique.rounds == 3 and isinstance(cfg.critique.rounds, int)
    assert cfg.models.policy.engine == "transformers"
    assert cfg.budget.max_output_tokens is None
    # Keys not overridden keep the file's values.
    assert cfg.models.policy.prompt_format == base.models.policy.prompt_format


def test_override_creates_missing_sections(tmp_path):
    p = _write(tmp_path, "name: x\n")
    cfg = load_pipeline_config(p, ["generate.sampling.temperature=0.7", "critique.few_shot=false"])
    assert cfg.generate.sampling.temperature == pytest.approx(0.7)
    assert cfg.critique.few_shot is False


def test_override_with_bad_value_is_config_error_naming_key(tmp_path):
    p = _write(tmp_path, "name: x\n")
    with pytest.raises(ConfigError, match=r"critique\.rounds"):
        load_pipeline_config(p, ["critique.rounds=many"])


@pytest.mark.parametrize("bad", ["critique.rounds", "justtext", ""])
def test_override_without_equals_is_config_error(tmp_path, bad):
    p = _write(tmp_path, "name: x\n")
    with pytest.raises(ConfigError, match="key.path=value"):
        load_pipeline_config(p, [bad])


def test_override_with_empty_key_is_config_error():
    with pytest.raises(ConfigError, match="empty key"):
        parse_override("=3")


def test_override_through_a_scalar_is_config_error(tmp_path):
    p = _write(tmp_path, "name: x\n")
    with pytest.raises(ConfigError, match="not a section"):
        load_pipeline_config(p, ["name.sub=1"])


def test_parse_override_keeps_value_after_first_equals():
    path, value = parse_override("prompts.path=a=b.jsonl")
    assert path == ["prompts", "path"]
    assert value == "a=b.jsonl"


# ---- descriptions ----------------------------------------------------------------------------------

def _nested_models(annotation) -> list[type[BaseModel]]:
    """BaseModel types inside an annotation: ModelConfig, ModelConfig | None, list[Principle] ..."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    out = []
    for arg in typing.get_args(annotation):
        out.extend(_nested_models(arg))
    return out


def _all_models(root: type[BaseModel]) -> list[type[BaseModel]]:
    seen, todo = [], [root]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.append(m)
        for f in m.model_fields.values():
            todo.extend(_nested_models(f.annotation))
    return seen


def test_model_walker_finds_nested_models():
    found = set(_all_models(PipelineConfig))
    # Through a plain field, an Optional field (models.judge) and two levels of nesting.
    # ModelConfig is a discriminated union: the walker reaches each engine's section.
    assert {config_mod.ModelsConfig, config_mod.VLLMModelConfig, config_mod.TransformersModelConfig,
            config_mod.OpenAIModelConfig, config_mod.SamplingConfig, config_mod.BudgetConfig,
            config_mod.PromptsConfig} <= found


def _models_in_config_module() -> list[type[BaseModel]]:
    defined = [v for v in vars(config_mod).values()
               if isinstance(v, type) and issubclass(v, BaseModel) and v.__module__ == config_mod.__name__]
    models = set(_all_models(PipelineConfig)) | set(defined)
    return sorted(models, key=lambda m: m.__name__)


@pytest.mark.parametrize("model", _models_in_config_module(), ids=lambda m: m.__name__)
def test_every_config_field_has_a_description(model):
    for name, field in model.model_fields.items():
        assert field.description and field.description.strip(), f"{model.__name__}.{name} has no description"


TRAIN_CONFIGS = sorted((ROOT / "pipelines" / "train").glob("*.yaml"))


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_training_config_loads(path):
    from factory.config import load_eval_config, load_train_config

    if path.name.startswith("accelerate"):
        import yaml

        assert yaml.safe_load(path.read_text())["distributed_type"]
        return
    cfg = (load_eval_config if path.name == "eval.yaml" else load_train_config)(path)
    assert cfg.name == path.stem


def test_ray_executor_section_validates_and_rejects_unknown_keys(tmp_path):
    cfg = load_pipeline_config(_write(tmp_path, "executor: ray\nray:\n  address: auto\n  replicas: 4\n  num_gpus: 1\n"))
    assert (cfg.executor, cfg.ray.address, cfg.ray.replicas, cfg.ray.num_gpus) == ("ray", "auto", 4, 1.0)
    with pytest.raises(ConfigError, match="ray.gpus"):
        load_pipeline_config(_write(tmp_path, "executor: ray\nray:\n  gpus: 1\n"))
    with pytest.raises(ConfigError, match="executor"):
        load_pipeline_config(_write(tmp_path, "executor: slurm\n"))


# ---- model sections: one per engine ------------------------------------------------------------------

def test_model_section_defaults_to_vllm_and_picks_the_engine_section(tmp_path):
    cfg = load_pipeline_config(_write(tmp_path, "models:\n  policy:\n    path: /m\n"))
    assert isinstance(cfg.models.policy, config_mod.VLLMModelConfig) and cfg.models.policy.engine == "vllm"
    cfg = load_pipeline_config(_write(tmp_path, "models:\n  policy: {engine: transformers, batch_size: 3}\n"))
    assert isinstance(cfg.models.policy, config_mod.TransformersModelConfig) and cfg.models.policy.batch_size == 3
    m = config_mod.make_model_config(engine="openai", base_url="http://h/v1")
    assert isinstance(m, config_mod.OpenAIModelConfig)
    assert config_mod.model_config_from_json(m.model_dump_json()) == m


@pytest.mark.parametrize("engine,key,owner", [("transformers", "kv_cache_gb", "vllm"),
                                              ("vllm", "batch_size", "transformers"),
                                              ("openai", "engine_args", "vllm"),
                                              ("transformers", "base_url", "openai")])
def test_a_setting_of_another_engine_is_an_error_naming_key_and_engine(tmp_path, engine, key, owner):
    p = _write(tmp_path, f"models:\n  policy:\n    engine: {engine}\n    {key}: 1\n")
    with pytest.raises(ConfigError) as ei:
        load_pipeline_config(p)
    msg = str(ei.value)
    assert str(p) in msg
    assert f"models.policy.{key}: unknown key for engine '{engine}'" in msg  # no pydantic union tag in the key
    assert f"a setting of engine {owner}" in msg
    assert "max_model_len" in msg.split("allowed here:")[1]


def test_a_setting_of_another_engine_via_override_is_an_error(tmp_path):
    p = _write(tmp_path, "models:\n  policy:\n    kv_cache_gb: 4\n")
    assert load_pipeline_config(p).models.policy.kv_cache_gb == 4
    with pytest.raises(ConfigError, match=r"models\.policy\.kv_cache_gb: unknown key for engine 'transformers'"):
        load_pipeline_config(p, ["models.policy.engine=transformers"])


def test_unknown_engine_args_name_is_an_error_with_a_suggestion(tmp_path):
    pytest.importorskip("vllm")
    p = _write(tmp_path, "models:\n  policy:\n    engine_args: {max_num_seq: 8}\n")
    with pytest.raises(ConfigError) as ei:
        load_pipeline_config(p)
    msg = str(ei.value)
    assert str(p) in msg and "models.policy.engine_args" in msg
    assert "'max_num_seq' is not a vLLM engine argument" in msg and "did you mean max_num_seqs" in msg


@pytest.mark.parametrize("name,instead", [("dtype", "dtype"), ("seed", "seed"), ("model", "path"),
                                          ("max_model_len", "max_model_len"), ("trust_remote_code", "trust_remote_code")])
def test_engine_args_refuse_what_factory_sets_itself(name, instead):
    # Checked without importing vLLM: these names are factory's own.
    with pytest.raises(ValueError) as ei:
        config_mod.VLLMModelConfig(engine_args={name: 1})
    assert f"{name!r} is set by factory" in str(ei.value) and instead in str(ei.value).split("use ")[1]


def test_valid_engine_args_reach_the_llm_kwargs(tmp_path):
    pytest.importorskip("vllm")
    from factory.engines.vllm_engine import vllm_kwargs

    p = _write(tmp_path, "models:\n  policy:\n    dtype: bfloat16\n    max_model_len: 2048\n"
                         "    engine_args: {max_num_seqs: 8, kv_cache_dtype: fp8, max_num_batched_tokens: 4096}\n")
    mcfg = load_pipeline_config(p).models.policy
    kw = vllm_kwargs(mcfg, "/models/x", seed=7, gpu=True)
    assert kw["max_num_seqs"] == 8 and kw["kv_cache_dtype"] == "fp8" and kw["max_num_batched_tokens"] == 4096
    assert (kw["model"], kw["tokenizer"], kw["dtype"], kw["max_model_len"], kw["seed"]) == (
        "/models/x", "/models/x", "bfloat16", 2048, 7)
    assert kw["gpu_memory_utilization"] == mcfg.gpu_memory_utilization and "enforce_eager" not in kw
    cpu = vllm_kwargs(mcfg, "/models/x", seed=7, gpu=False)
    assert cpu["enforce_eager"] is True and "gpu_memory_utilization" not in cpu
    # Every key is one vLLM knows.
    assert set(kw) <= config_mod.vllm_argument_names()


def test_judge_inherits_the_policy_settings(tmp_path):
    p = _write(tmp_path, "models:\n  policy:\n    engine: transformers\n    dtype: bfloat16\n"
                         "    prompt_format: chat\n    batch_size: 4\n    chat_template_kwargs: {enable_thinking: false}\n")
    assert load_pipeline_config(p).models.judge is None  # no judge section: the policy itself
    cfg = load_pipeline_config(p, ["models.judge.path=/judge"])
    j = cfg.models.judge
    assert isinstance(j, config_mod.TransformersModelConfig)
    assert (j.path, j.dtype, j.prompt_format, j.batch_size, j.chat_template_kwargs) == (
        "/judge", "bfloat16", "chat", 4, {"enable_thinking": False})
    assert cfg.models.policy.path == "default"  # the policy is untouched
    # The judge's own keys win.
    j = load_pipeline_config(p, ["models.judge.batch_size=2", "models.judge.dtype=float32"]).models.judge
    assert (j.batch_size, j.dtype, j.prompt_format) == (2, "float32", "chat")


def test_judge_of_another_engine_inherits_only_the_common_fields(tmp_path):
    p = _write(tmp_path, "models:\n  policy:\n    dtype: bfloat16\n    max_model_len: 4096\n    kv_cache_gb: 8\n"
                         "  judge:\n    engine: openai\n    base_url: http://h/v1\n")
    j = load_pipeline_config(p).models.judge
    assert isinstance(j, config_mod.OpenAIModelConfig)
    assert (j.dtype, j.max_model_len, j.base_url) == ("bfloat16", 4096, "http://h/v1")
    # A judge that only changes other keys keeps the policy's engine, and the engine's own settings.
    j = load_pipeline_config(p, ["models.judge={path: /j}"]).models.judge
    assert isinstance(j, config_mod.VLLMModelConfig) and (j.path, j.kv_cache_gb) == ("/j", 8)


def test_eval_judge_inherits_the_reference(tmp_path):
    cfg = config_mod.EvalConfig.model_validate({
        "policy": {"path": "/p"}, "reference": {"engine": "transformers", "dtype": "bfloat16", "batch_size": 2},
        "judge": {"path": "/j"}})
    assert isinstance(cfg.judge, config_mod.TransformersModelConfig)
    assert (cfg.judge.path, cfg.judge.dtype, cfg.judge.batch_size) == ("/j", "bfloat16", 2)


def test_min_tokens_is_checked_against_max_tokens(tmp_path):
    assert config_mod.SamplingConfig().min_tokens == 0
    with pytest.raises(ConfigError, match=r"generate\.sampling: .*min_tokens \(200\) must not exceed max_tokens"):
        load_pipeline_config(_write(tmp_path, "generate:\n  sampling: {min_tokens: 200, max_tokens: 100}\n"))


def test_openai_request_sends_every_sampling_setting():
    from factory.engines.openai_engine import completion_body

    # All at their "off" defaults: still sent, so the server's generation_config cannot change them.
    s = config_mod.SamplingConfig()
    body = completion_body("served", [2, 5, 7], s, seed=11, stop=["\n\n"])
    assert set(s.model_dump()) <= set(body)  # every field the rows' lineage records
    assert (body["temperature"], body["top_p"], body["top_k"], body["repetition_penalty"], body["min_tokens"],
            body["max_tokens"], body["seed"], body["stop"]) == (0.0, 1.0, 0, 1.0, 0, 128, 11, ["\n\n"])
    assert (body["model"], body["prompt"]) == ("served", [2, 5, 7])
    s = config_mod.SamplingConfig(temperature=0.7, top_p=0.9, top_k=40, repetition_penalty=1.3, min_tokens=4,
                                  max_tokens=32)
    body = completion_body("served", [2], s, seed=3, stop=[])
    assert (body["temperature"], body["top_p"], body["top_k"], body["repetition_penalty"], body["min_tokens"],
            body["max_tokens"], body["seed"], body["stop"]) == (0.7, 0.9, 40, 1.3, 4, 32, 3, None)


def test_chat_template_kwargs_reach_the_chat_template():
    from factory.engines.base import encode_prompt

    class Tok:
        chat_template = "x"
        bos_token_id = 1
        seen: dict = {}

        def apply_chat_template(self, messages, tokenize, add_generation_prompt, **kw):
            Tok.seen = kw
            return "hi"

        def __call__(self, text, add_special_tokens):
            return {"input_ids": [5]}

    assert encode_prompt(Tok(), [{"role": "user", "content": "q"}], {"enable_thinking": False}) == [1, 5]
    assert Tok.seen == {"enable_thinking": False}
    encode_prompt(Tok(), [{"role": "user", "content": "q"}])
    assert Tok.seen == {}


# ---- method sections are TRL's config classes ------------------------------------------------------------

def test_method_sections_take_every_trl_setting_and_pass_it_to_trl(tmp_path):
    from trl import DPOConfig, KTOConfig, RewardConfig, SFTConfig

    from factory.config import load_train_config
    from factory.train.common import trl_args

    cfg = load_train_config(_write(tmp_path, (
        "dpo: {beta: 0.3, lr_scheduler_type: cosine, weight_decay: 0.01, label_smoothing: 0.1}\n"
        "kto: {desirable_weight: 2.0, max_grad_norm: 0.5}\n"
        "reward: {center_rewards_coefficient: 0.01, eval_strategy: steps, eval_steps: 5}\n"
        "sft: {packing: false, model_init_kwargs: {attn_implementation: eager}}\n"), "train.yaml"),
        ["dpo.save_steps=7", "dpo.save_strategy=steps"])
    out = tmp_path / "o"
    dpo = DPOConfig(**trl_args(cfg, "dpo", out))
    assert (dpo.beta, dpo.lr_scheduler_type.value, dpo.weight_decay, dpo.label_smoothing) == (0.3, "cosine", 0.01, 0.1)
    assert (dpo.save_strategy.value, dpo.save_steps) == ("steps", 7)  # the user's setting wins over factory's "no"
    assert (dpo.learning_rate, dpo.max_steps) == (cfg.optim.learning_rate, cfg.optim.max_steps)  # from optim
    kto = KTOConfig(**trl_args(cfg, "kto", out))
    assert (kto.desirable_weight, kto.max_grad_norm) == (2.0, 0.5)
    reward = RewardConfig(**trl_args(cfg, "reward", out))
    assert (reward.center_rewards_coefficient, reward.eval_steps) == (0.01, 5)
    sft = SFTConfig(**trl_args(cfg, "sft", out, model_init_kwargs={"trust_remote_code": False}))
    assert sft.model_init_kwargs == {"attn_implementation": "eager", "trust_remote_code": False}
    assert sft.packing is False


@pytest.mark.parametrize("text, match", [
    ("dpo: {desirable_weight: 2.0}\n", r"dpo: desirable_weight: not a setting of dpo \(TRL's DPOConfig\); it is a "
                                       r"setting of KTOConfig: put it under kto"),
    ("kto: {loss_typo: x}\n", r"kto: loss_typo: not a setting of kto"),
    ("sft: {learning_rate: 0.1}\n", r"sft: learning_rate is set by factory from optim.learning_rate"),
    ("dpo: {max_length: 64}\n", r"optim.max_length"),
    ("dpo: {lr_scheduler_type: sometimes}\n", r"TRL's DPOConfig refuses .*sometimes is not a valid SchedulerType"),
    ("sft: {model_init_kwargs: {trust_remote_code: true}}\n", r"set by factory from trust_remote_code"),
    ("reward: {soft_labels: true, center_rewards_coefficient: 0.1}\n", r"reward.soft_labels replaces"),
    ("dpo: {soft_labels: true, label_smoothing: 0.1}\n", r"dpo.label_smoothing shapes TRL's DPO loss"),
    ("ppo: {lr_scheduler_type: cosine}\n", r"ppo.lr_scheduler_type: unknown key"),  # PPO is ours, not TRL's
])
def test_a_setting_trl_refuses_or_of_another_method_is_an_error(tmp_path, text, match):
    from factory.config import load_train_config

    with pytest.raises(ConfigError, match=match):
        load_train_config(_write(tmp_path, text, "train.yaml"))


def test_grpo_batch_must_hold_whole_groups():
    """GRPO ranks whole groups of one prompt's responses: the completions of a generation round (batch size times
    accumulation steps) must be a multiple of grpo.num_generations, a ConfigError naming both settings."""
    from factory.config import ConfigError, TrainConfig, check_grpo_settings

    ok = TrainConfig.model_validate({"optim": {"batch_size": 2, "gradient_accumulation_steps": 2},
                                     "grpo": {"num_generations": 4}})
    check_grpo_settings(ok)
    with pytest.raises(ConfigError, match=r"optim.batch_size \* optim.gradient_accumulation_steps = 6 .* "
                                          r"grpo.num_generations = 4"):
        check_grpo_settings(TrainConfig.model_validate({"optim": {"batch_size": 6}, "grpo": {"num_generations": 4}}))
    with pytest.raises(ConfigError, match="grpo.max_completion_length"):
        check_grpo_settings(TrainConfig.model_validate({"optim": {"max_length": 64},
                                                        "grpo": {"max_completion_length": 64}}))
