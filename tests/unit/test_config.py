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
    cfg = load_pipeline_config(path)
    assert isinstance(cfg, PipelineConfig)
    # The file's own name key is applied (not just the defaults).
    import yaml

    raw = yaml.safe_load(path.read_text())
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
    assert {config_mod.ModelsConfig, config_mod.ModelConfig, config_mod.SamplingConfig,
            config_mod.BudgetConfig, config_mod.PromptsConfig} <= found


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
