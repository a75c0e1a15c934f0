"""Pydantic schemas for pipeline YAML files. The one schema module: every field is described, unknown
keys are errors, and `load_pipeline_config` turns any problem into a message naming the file and key."""

from __future__ import annotations

import copy
import functools
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError, field_validator,
                      model_validator)


class ConfigError(ValueError):
    """Bad user input in a config or data file; the CLI exits with code 2 on it."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SamplingConfig(Strict):
    temperature: float = Field(0.0, ge=0.0, description="0 means greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    top_k: int = Field(-1, ge=-1, description="Top-k sampling; -1 (or 0) turns it off.")
    max_tokens: int = Field(128, gt=0, description="Maximum new tokens per completion.")
    min_tokens: int = Field(0, ge=0, description="Minimum new tokens before EOS or a stop string may end a completion.")
    stop: list[str] = Field(default_factory=list, description="Extra stop strings, added to the template's own.")
    repetition_penalty: float = Field(1.0, gt=0.0, description="1.0 turns it off.")

    @model_validator(mode="after")
    def _min_within_max(self) -> SamplingConfig:
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        return self


class ModelBase(Strict):
    """The fields every engine's model section has (shared fields only; behaviour lives in the engines)."""

    path: str = Field("default", description="'default' for the shipped Gemma 3 270M, or a local model folder.")
    prompt_format: Literal["plain", "chat"] = Field(
        "plain", description="'plain' few-shot Human/Assistant text for base models; 'chat' uses the tokenizer's chat template.")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field("float32", description="Weights dtype; float32 on CPU.")
    max_model_len: int = Field(1024, gt=16, description="Context length; longer prompts are skipped and recorded.")
    trust_remote_code: bool = Field(False, description="Allow model repos to run their own Python code. Off unless you trust it.")
    chat_template_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra arguments to the tokenizer's chat template (prompt_format 'chat'), "
                                          "e.g. {enable_thinking: false} for Qwen 3.")


# vLLM arguments factory sets from its own settings, and the setting to use instead.
VLLM_OWN_ARGS = {
    "model": "path", "tokenizer": "path (the model folder's tokenizer)", "dtype": "dtype",
    "max_model_len": "max_model_len", "seed": "the pipeline's top-level seed", "trust_remote_code": "trust_remote_code",
    "enable_prefix_caching": "enable_prefix_caching", "tensor_parallel_size": "tensor_parallel_size",
    "gpu_memory_utilization": "gpu_memory_utilization",
}


@functools.lru_cache(maxsize=1)
def vllm_argument_names() -> frozenset[str] | None:
    """vLLM's own engine-argument names (EngineArgs fields and LLM keywords); None when vLLM is not installed."""
    import dataclasses
    import inspect

    try:
        from vllm import LLM
        from vllm.engine.arg_utils import EngineArgs
    except Exception:  # vLLM not installed (or broken): the engine reports it when it starts
        return None
    names = {f.name for f in dataclasses.fields(EngineArgs)}
    names |= {n for n, p in inspect.signature(LLM.__init__).parameters.items()
              if n != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    return frozenset(names)


def _own_arg_hint(name: str) -> str:
    where = VLLM_OWN_ARGS[name]
    return where if where.startswith("the ") else f"the model section's {where}"


def check_vllm_engine_args(args: dict[str, Any]) -> None:
    """Refuse names factory sets itself and names vLLM does not know (with close matches)."""
    import difflib

    problems = [f"{k!r} is set by factory; use {_own_arg_hint(k)} instead"
                for k in args if k in VLLM_OWN_ARGS]
    rest = [k for k in args if k not in VLLM_OWN_ARGS]
    known = vllm_argument_names() if rest else None  # vLLM is imported only when there is a name to check
    if known is not None:
        for k in rest:
            if k not in known:
                close = difflib.get_close_matches(k, sorted(known), n=3, cutoff=0.6)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                problems.append(f"{k!r} is not a vLLM engine argument (vllm.engine.arg_utils.EngineArgs){hint}")
    if problems:
        raise ValueError("; ".join(problems))


class PriceConfig(Strict):
    """What an OpenAI-compatible server charges (the cost ledger, factory/cost.py)."""

    input_per_million: float = Field(0.0, ge=0.0, description="USD per million prompt (input) tokens.")
    output_per_million: float = Field(0.0, ge=0.0, description="USD per million generated (output) tokens.")


class VLLMModelConfig(ModelBase):
    engine: Literal["vllm"] = Field("vllm", description="Inference backend: vllm (offline batched engine).")
    gpu_memory_utilization: float = Field(0.85, gt=0.0, le=1.0, description="vLLM share of GPU memory (GPU only).")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM tensor parallelism (GPUs per replica).")
    kv_cache_gb: float = Field(2.0, gt=0.0, description="vLLM KV-cache size in GiB on CPU (VLLM_CPU_KVCACHE_SPACE).")
    enable_prefix_caching: bool = Field(True, description="vLLM prefix caching: prompts share the few-shot prefix.")
    gpu_hour: float | None = Field(
        None, ge=0.0, description="Cost ledger: USD per GPU-hour, times the GPUs this engine uses (tensor_parallel_size x "
                                  "engine_args.pipeline_parallel_size, x ray.replicas under executor ray) and a stage's "
                                  "seconds; on a CPU read it as the price of one hour of the machine. null: no cost shown.")
    engine_args: dict[str, Any] = Field(
        default_factory=dict, description="More vLLM engine arguments passed to LLM(...), e.g. quantization, "
                                          "max_num_seqs, kv_cache_dtype, max_num_batched_tokens; names are "
                                          "checked against vLLM's EngineArgs when the config loads.")

    @field_validator("engine_args")
    @classmethod
    def _known_engine_args(cls, value: dict[str, Any]) -> dict[str, Any]:
        check_vllm_engine_args(value)
        return value


class TransformersModelConfig(ModelBase):
    engine: Literal["transformers"] = Field("transformers", description="Inference backend: transformers (batched generate()).")
    batch_size: int = Field(16, ge=1, description="Prompts per generate() call.")
    gpu_hour: float | None = Field(
        None, ge=0.0, description="Cost ledger: USD per GPU-hour (one device, x ray.replicas under executor ray) times "
                                  "a stage's seconds; on a CPU read it as the price of one hour of the machine. null: "
                                  "no cost shown.")


class OpenAIModelConfig(ModelBase):
    engine: Literal["openai"] = Field("openai", description="Inference backend: any OpenAI-compatible /v1/completions server.")
    base_url: str | None = Field(None, description="Server URL, e.g. http://127.0.0.1:8000/v1.")
    api_model: str | None = Field(None, description="The model name the server expects (default: path).")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the API key "
                             "(the key itself never goes in a config).")
    concurrency: int = Field(64, ge=1, description="Requests in flight at once (for a vLLM server: its batch).")
    timeout_s: float = Field(120.0, gt=0.0, description="Timeout per request in seconds.")
    max_retries: int = Field(4, ge=0, description="Retries on 429, 5xx and connection errors, with backoff.")
    price: PriceConfig | None = Field(None, description="Cost ledger: the server's price per million input and "
                                      "output tokens (USD). null: no cost shown.")


ENGINE_CONFIGS: dict[str, type[ModelBase]] = {
    "vllm": VLLMModelConfig, "transformers": TransformersModelConfig, "openai": OpenAIModelConfig}
DEFAULT_ENGINE = "vllm"


def _default_engine(value: Any) -> Any:
    """A model section without an `engine` key is a vLLM section."""
    if isinstance(value, dict) and "engine" not in value:
        return {"engine": DEFAULT_ENGINE, **value}
    return value


# A model section: one of the engine-specific sections, chosen by its `engine` key (default vllm), so a
# setting of another engine is an error instead of being ignored.
ModelConfig = Annotated[
    Union[VLLMModelConfig, TransformersModelConfig, OpenAIModelConfig],  # noqa: UP007 (a discriminated union)
    Field(discriminator="engine"),
    BeforeValidator(_default_engine),
]
_MODEL_ADAPTER: TypeAdapter = TypeAdapter(ModelConfig)


def make_model_config(data: dict[str, Any] | None = None, /, **fields: Any) -> ModelConfig:
    """A model section from a mapping and/or keywords, e.g. make_model_config(path=d, engine="transformers")."""
    return _MODEL_ADAPTER.validate_python({**(data or {}), **fields})


def model_config_from_json(text: str | bytes) -> ModelConfig:
    return _MODEL_ADAPTER.validate_json(text)


def inherit_model_section(base: Any, override: Any) -> Any:
    """A section given as a mapping, merged over `base` (a mapping or a model section): its own keys win; when it
    names another engine than `base`, only the fields every engine has (ModelBase) are inherited."""
    if not isinstance(override, dict):
        return override
    if isinstance(base, BaseModel):
        base = base.model_dump()
    if not isinstance(base, dict):
        return override
    base = copy.deepcopy(_default_engine(base))
    engine = override.get("engine", base["engine"])
    schema = ENGINE_CONFIGS.get(engine) if engine == base["engine"] else ModelBase
    keep = set((schema or ModelBase).model_fields)  # never inherit keys the target engine refuses
    return {**{k: v for k, v in base.items() if k in keep}, **override, "engine": engine}


class ModelsConfig(Strict):
    policy: ModelConfig = Field(default_factory=VLLMModelConfig, description="Writes the initial responses.")
    judge: ModelConfig | None = Field(
        None, description="Writes critiques, revisions and AI-feedback labels; the policy model when omitted. A judge "
                          "section is merged over the policy's: keys it gives win, the rest are the policy's (only "
                          "path, prompt_format, dtype, max_model_len, trust_remote_code and chat_template_kwargs "
                          "when it names another engine).")

    @model_validator(mode="before")
    @classmethod
    def _judge_inherits_policy(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("judge"), dict):
            data = {**data, "judge": inherit_model_section(data.get("policy") or {}, data["judge"])}
        return data


class PromptsConfig(Strict):
    path: str = Field("data/quickstart_prompts.jsonl", description="JSONL, CSV, Parquet file or a local `datasets` folder.")
    format: Literal["auto", "jsonl", "csv", "parquet", "datasets"] = Field("auto", description="'auto' uses the extension.")
    column: str = Field("prompt", description="Column holding the prompt: a text, a `messages` list or an HH transcript "
                        "(see `style`).")
    style: Literal["auto", "text", "messages", "hh"] = Field(
        "auto", description="How the column reads: 'text' (one user turn), 'messages' (a list of {role, content}, or "
                            "its JSON, ending with a user turn), 'hh' (an HH-RLHF transcript '\\n\\nHuman: ... "
                            "\\n\\nAssistant: ...' ending with a Human turn), 'auto' (a list is messages, text is text).")
    id_column: str | None = Field(None, description="Optional column with your own prompt ids, kept as source_id.")
    split: str = Field("train", description="Split to read from a `datasets` folder saved as a DatasetDict.")
    limit: int | None = Field(None, ge=1, description="Use only the first N prompts.")


class GenerateConfig(Strict):
    samples_per_prompt: int = Field(1, ge=1, description="Responses sampled per prompt.")
    system_prompt: str | None = Field(
        None, description="A system prompt for the policy's conversations (and the critique and revision turns that "
                          "continue them); a conversation that brings its own system message keeps it.")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="Sampling for initial responses.")


class CritiqueConfig(Strict):
    rounds: int = Field(1, ge=0, description="Critique-and-revision rounds (the CAI paper used up to 4).")
    principles_per_round: int = Field(1, ge=1, description="Principles sampled per round; each is its own branch.")
    few_shot: bool = Field(True, description="Put the constitution's examples in front of critique/revision prompts.")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="Sampling for critiques.")


class ReviseConfig(Strict):
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="Sampling for revisions.")


class PairsConfig(Strict):
    include_intermediate: bool = Field(False, description="Also pair round k over round k-1, not only final over initial.")


class GuardConfig(Strict):
    enabled: bool = Field(
        True, description="Flag responses and revisions that address the judge instead of the user (factory/guard.py: "
                          "verdict JSON or tables, 'the answer is (A)', option letters, evaluator claims, in 11 "
                          "languages) and store each flag with its span in `guard_flags`. A candidate pair with a "
                          "flagged side becomes an AI pair with dropped_reason 'addresses_judge', and a revision pair "
                          "whose chosen revision is flagged is dropped the same way (pairs stage, also without "
                          "label.enabled); such revisions are left out of SFT exports. false: no checks, no flags.")
    judge_flagged: bool = Field(
        False, description="Still ask the judge about candidate pairs with a flagged side (their judgments and label "
                           "are stored, the pair stays dropped as 'addresses_judge'); false spends no judge calls on them.")
class GateConfig(Strict):
    """The label stage's calibration gate (factory/calibrate.py): before judging, the judge is calibrated on a
    gold set exactly as the label stage judges (stored per judge fingerprint, settings and gold file hash, and reused);
    a judge that misses a threshold still writes its judgments and comparisons, but its kept AI pairs get
    dropped_reason 'judge_failed_gate' (export and training skip them) unless `enforce` is false."""

    gold: str = Field("data/judge_gold.jsonl", description="The gold set: JSONL of clear-cut pairs with the trusted "
                      "preference (see data/README.md).")
    min_accuracy: float | None = Field(None, ge=0.0, le=1.0, description="Least share of gold pairs whose label "
                                       "favours the preferred response (label > 0.5); null: not checked.")
    max_order_disagreement: float | None = Field(
        None, ge=0.0, le=1.0, description="Most mean |P(x|xy) - P(x|yx)| over the gold comparisons (how much the two "
                                          "answer orders disagree); null: not checked.")
    max_length_bias: float | None = Field(
        None, ge=0.0, le=1.0, description="Most |length bias|: the share of gold pairs where the longer response wins "
                                          "minus the share where the longer one is the preferred one (0 for a judge "
                                          "that agrees with the gold set; > 0 favours longer answers); null: not "
                                          "checked.")
    enforce: bool = Field(True, description="true: a judge that fails the gate has its AI pairs excluded "
                                            "(dropped_reason 'judge_failed_gate'); false: they are kept and the run "
                                            "only warns.")
    self_preference: bool = Field(False, description="Also measure self-preference when the judge is the policy (the "
                                                     "judge answers every gold prompt itself: one generation pass); "
                                                     "reported, not checked.")


class LabelConfig(Strict):
    enabled: bool = Field(False, description="Run the AI-feedback label stage after the pairs stage.")
    compare: list[Literal["revisions", "samples"]] = Field(
        default_factory=lambda: ["revisions"],
        description="'revisions': the initial response vs each revision; 'samples': every two policy samples "
                    "of a prompt (needs generate.samples_per_prompt >= 2).")
    principles_per_comparison: int = Field(1, ge=1, description="Principles sampled per comparison (an ensemble).")
    mode: Literal["logprob", "cot", "rubric"] = Field(
        "logprob", description="'logprob': P(A) from answer-token log-probabilities; 'cot': reasoning first, "
                               "then the log-probabilities, clamped; 'rubric': scores in text, for judges without log-probabilities.")
    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(max_tokens=96),
                                     description="Sampling for chain-of-thought reasoning and rubric replies.")
    cot_clamp: tuple[float, float] = Field((0.4, 0.6), description="Chain-of-thought labels are clamped to this range.")
    rubric_retries: int = Field(2, ge=0, description="Extra attempts for rubric replies that do not parse.")
    tie_threshold: float = Field(0.05, ge=0.0, lt=0.5, description="Labels within this of 0.5 are ties and dropped.")
    guard: GuardConfig = Field(default_factory=GuardConfig,
                               description="The guard against responses that address the judge (factory/guard.py).")
    gate: GateConfig | None = Field(
        None, description="Calibrate the judge on a gold set before labelling and gate its pairs on the figures "
                          "(min_accuracy, max_order_disagreement, max_length_bias, gold, enforce); null: no gate.")


class RayConfig(Strict):
    address: str | None = Field(
        None, description="Ray cluster to join: 'auto' (the cluster this machine belongs to), 'ray://host:10001', "
                          "or null to start a private Ray instance on this machine.")
    replicas: int = Field(2, ge=1, description="Engine replicas (Ray actors) per model; each holds one copy of it.")
    num_cpus: float = Field(1.0, ge=0.0, description="CPUs reserved per replica.")
    num_gpus: float = Field(0.0, ge=0.0, description="GPUs reserved per replica (set to the model's tensor_parallel_size on GPUs).")
    startup_timeout_s: float = Field(900.0, gt=0.0, description="How long replicas may take to load their model.")


class BudgetConfig(Strict):
    max_output_tokens: int | None = Field(None, ge=1, description="Stop the run cleanly after this many output tokens.")


class BenchmarkConfig(Strict):
    """One benchmark to keep out of the data (factory/decontam.py)."""

    name: str = Field(..., min_length=1, description="The benchmark's name, as counted in the run summary and on the "
                      "dataset card (e.g. mt-bench).")
    path: str = Field(..., min_length=1, description="A local JSONL or Parquet file, or a `datasets` folder saved with "
                      "save_to_disk (every split of a DatasetDict is read).")
    columns: list[str] | None = Field(None, description="Fields holding the benchmark's text (strings, or lists of "
                                      "them such as MT-Bench's `turns`); null: every field holding text.")


class DecontaminationConfig(Strict):
    """Word n-gram overlap of the run's texts with benchmark files (factory/stages/decontaminate.py). Texts are
    normalised (Unicode NFKC, case-folded, punctuation removed, whitespace collapsed) and cut into word n-grams; a
    text sharing one n-gram with a benchmark item is flagged (a `contamination` row with the n-gram), and pairs whose
    prompt, chosen or rejected text is flagged are left out of export and training. A benchmark item shorter than
    `ngram` words but of at least `min_words` words flags every text whose normalised words contain the item's whole
    word sequence (a `contamination` row of kind 'short_item'); shorter items are ignored."""

    benchmarks: list[BenchmarkConfig] = Field(default_factory=list, description="Benchmark files to check against; "
                                              "empty: the stage does not run.")
    ngram: int = Field(13, ge=1, description="Words per n-gram (13, as in GPT-3's contamination study).")
    min_words: int = Field(6, ge=1, description="A benchmark item shorter than `ngram` words is checked whole when it "
                           "has at least this many words: a text containing its normalised word sequence (on word "
                           "boundaries) is flagged. Items with fewer words are ignored: 3- to 5-word items of common "
                           "words ('tell me a joke') flag ordinary text.")
    check: list[Literal["prompts", "responses", "revisions"]] = Field(
        default_factory=lambda: ["prompts", "responses", "revisions"], min_length=1,
        description="Which of the run's texts to check: prompts, responses, revisions.")

    @model_validator(mode="after")
    def _distinct_names(self) -> DecontaminationConfig:
        names = [b.name for b in self.benchmarks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"benchmark names must be distinct; {dup[0]!r} is given twice")
        if self.min_words > self.ngram:
            raise ValueError(f"min_words ({self.min_words}) must not exceed ngram ({self.ngram})")
        return self


class PipelineConfig(Strict):
    name: str = Field("pipeline", description="A name for runs of this pipeline.")
    seed: int = Field(0, description="Seeds principle sampling and stochastic decoding.")
    store: str = Field("outputs/factory.duckdb", description="DuckDB file that holds everything.")
    executor: Literal["local", "ray"] = Field(
        "local", description="Where model stages run: 'local' (one engine per model in this process) or 'ray' "
                             "(replicas of each model as Ray actors; see the `ray` section).")
    ray: RayConfig = Field(default_factory=RayConfig, description="Ray executor settings (used when executor is 'ray').")
    keep_engines_loaded: bool = Field(
        False, description="Keep every model's engine loaded for the whole run; only where all of them fit in memory "
                           "together. By default one model's engine is resident at a time: starting the judge releases "
                           "the policy's engine (or Ray replicas) first; 'openai' engines hold no memory and stay.")
    write_batch_size: int = Field(4096, ge=1, description="Finished rows per store transaction (the engine keeps a whole "
                                  "page of `chunk_size` rows in flight; a killed run loses at most that page).")
    chunk_size: int = Field(4096, ge=1, description="Input rows read from the store, rendered and sent to the engine "
                            "at a time: memory stays flat in the number of prompts.")
    constitution: str = Field("constitutions/harmless.yaml", description="Constitution YAML file.")
    prompts: PromptsConfig = Field(default_factory=PromptsConfig, description="Where the prompts come from.")
    models: ModelsConfig = Field(default_factory=ModelsConfig, description="Policy and judge models.")
    generate: GenerateConfig = Field(default_factory=GenerateConfig, description="Initial responses.")
    critique: CritiqueConfig = Field(default_factory=CritiqueConfig, description="Critiques against principles.")
    revise: ReviseConfig = Field(default_factory=ReviseConfig, description="Revisions of critiqued responses.")
    pairs: PairsConfig = Field(default_factory=PairsConfig, description="Preference pairs from revisions.")
    label: LabelConfig = Field(default_factory=LabelConfig, description="AI-feedback labels and pairs from them.")
    budget: BudgetConfig = Field(default_factory=BudgetConfig, description="Optional spending limits.")
    decontamination: DecontaminationConfig = Field(
        default_factory=DecontaminationConfig, description="Benchmark n-gram overlap checks after the label stage; "
                                                           "flagged pairs are kept out of export and training.")

    @property
    def judge(self) -> ModelConfig:
        return self.models.judge or self.models.policy


# ---- training ------------------------------------------------------------------------------------------

class TrainDataConfig(Strict):
    store: str = Field("outputs/factory.duckdb", description="The store to read preference pairs from.")
    runs: list[str] = Field(default_factory=list, description="Only the pairs of these pipeline runs (written or reused "
                                 "by them; 'latest': the latest pipeline run); empty = all.")
    sources: list[str] = Field(default_factory=lambda: ["ai_feedback", "final_vs_initial", "round_vs_previous"],
                               description="Pair sources to use: ai_feedback (judge labels) and/or revision pairs.")
    constitution_id: str | None = Field(None, description="Only pairs made under this constitution.")
    min_margin: float = Field(0.0, ge=0.0, le=1.0, description="Drop AI-labelled pairs whose margin is below this; "
                              "revision pairs count as margin 1.")
    eval_fraction: float = Field(0.2, ge=0.0, lt=1.0, description="Share of prompts held out for evaluation (split by prompt id).")
    max_pairs: int | None = Field(None, ge=1, description="Use at most this many training pairs.")
    conflicts: Literal["judge_wins", "revision_wins", "drop_both"] = Field(
        "judge_wins", description="Pairs of one prompt over the same two texts that disagree (the judge prefers the "
        "response, the revision pair the revision): keep the judge's pair, the revision pair, or neither. Pairs that "
        "agree are always kept once (the judge's, with its soft label, unless revision_wins). Counts in metrics.json.")


class LoraSettings(Strict):
    enabled: bool = Field(False, description="Train LoRA adapters (peft) instead of all weights.")
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA alpha.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="LoRA dropout.")
    target_modules: str | list[str] = Field("all-linear", description="Modules to adapt.")


class OptimSettings(Strict):
    max_steps: int = Field(50, ge=1, description="Optimizer steps.")
    learning_rate: float = Field(5e-6, gt=0.0, description="Peak learning rate.")
    batch_size: int = Field(4, ge=1, description="Per-device batch size (pairs).")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    max_length: int = Field(512, ge=16, description="Maximum tokens of prompt + completion.")
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="Share of steps spent warming up the learning rate.")
    bf16: bool = Field(False, description="bfloat16 mixed precision (GPU).")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory (GPU, large models).")
    logging_steps: int = Field(5, ge=1, description="Log every N steps.")
    report_to: Literal["none", "tensorboard"] = Field("none", description="Where trainers log metrics.")


# ---- method sections: TRL's own config classes ---------------------------------------------------------------
# A method section (sft, reward, dpo, kto) holds factory's own settings of that method plus any setting of the
# method's TRL config class (lr_scheduler_type, weight_decay, eval_steps, save_steps, deepspeed, fsdp, ...).
# Its fields whose names are TRL's (dpo.beta, kto.desirable_weight) go to TRL too. The section is checked by
# constructing the TRL class, so a misspelt setting, a bad value or another method's setting is an error, never
# dropped. Settings factory derives from its own config are refused with the key to set instead.
TRL_CONFIG_CLASSES = {"sft": "SFTConfig", "reward": "RewardConfig", "dpo": "DPOConfig", "kto": "KTOConfig",
                      "grpo": "GRPOConfig"}
SET_BY_FACTORY = {
    "output_dir": "output_root and name", "max_steps": "optim.max_steps", "learning_rate": "optim.learning_rate",
    "per_device_train_batch_size": "optim.batch_size", "per_device_eval_batch_size": "optim.batch_size",
    "gradient_accumulation_steps": "optim.gradient_accumulation_steps", "warmup_steps": "optim.warmup_ratio",
    "warmup_ratio": "optim.warmup_ratio", "logging_steps": "optim.logging_steps", "report_to": "optim.report_to",
    "seed": "seed", "data_seed": "seed", "bf16": "optim.bf16", "fp16": "optim.bf16",
    "gradient_checkpointing": "optim.gradient_checkpointing", "max_length": "optim.max_length",
    "use_cpu": "nothing (factory uses the GPU when there is one)", "trust_remote_code": "trust_remote_code",
    "remove_unused_columns": "nothing (factory's datasets need their columns)",
    "completion_only_loss": "nothing (SL-CAI trains on the revision only)",
}


@functools.cache
def trl_field_names(method: str) -> frozenset[str]:
    import dataclasses

    import trl

    return frozenset(f.name for f in dataclasses.fields(getattr(trl, TRL_CONFIG_CLASSES[method])))


def trl_settings(method: str, section: BaseModel) -> dict[str, Any]:
    """The settings of `section` that go to TRL's config class: its fields with TRL's names and its extra keys."""
    return {**{k: getattr(section, k) for k in _TRL_NAMED.get(method, ())}, **(section.model_extra or {})}


# Our fields that carry TRL's names (passed to TRL as they are); the rest are factory's own.
_TRL_NAMED = {"dpo": ("beta", "loss_type"), "kto": ("beta", "desirable_weight", "undesirable_weight"),
              "grpo": ("num_generations", "max_completion_length", "beta", "temperature")}


def check_trl_section(method: str, section: BaseModel) -> None:
    """Construct TRL's config class with the section's settings: unknown keys, another method's keys and values
    TRL refuses are errors naming the key."""
    extra = section.model_extra or {}
    if not extra:
        return
    for key in extra:
        if key in SET_BY_FACTORY:
            raise ValueError(f"{key} is set by factory from {SET_BY_FACTORY[key]}; set that instead")
    if "trust_remote_code" in (extra.get("model_init_kwargs") or {}):
        raise ValueError("model_init_kwargs.trust_remote_code is set by factory from trust_remote_code; set that instead")
    import tempfile

    import trl

    cls_name = TRL_CONFIG_CLASSES[method]
    for key in extra:
        if key not in trl_field_names(method):
            owners = [m for m in TRL_CONFIG_CLASSES if m != method and key in trl_field_names(m)]
            hint = (f"; it is a setting of {', '.join(TRL_CONFIG_CLASSES[m] for m in owners)}: put it under "
                    f"{' or '.join(owners)}" if owners else f"; see the fields of trl.{cls_name}")
            raise ValueError(f"{key}: not a setting of {method} (TRL's {cls_name}){hint}")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            getattr(trl, cls_name)(output_dir=tmp, use_cpu=True, report_to="none", **trl_settings(method, section))
        except (TypeError, ValueError) as e:
            raise ValueError(f"TRL's {cls_name} refuses {extra}: {e}") from None


def _trl_section(method: str):
    """The validator of a method section: its extra keys are TRL settings, checked by TRL's own class."""

    @model_validator(mode="after")
    def check(self):
        check_trl_section(method, self)
        return self

    return check


TRL_SECTION = ConfigDict(extra="allow", validate_assignment=True)


class RewardSettings(Strict):
    model_config = TRL_SECTION
    _trl = _trl_section("reward")
    soft_labels: bool = Field(False, description="Use the stored P(chosen) as the target (BCE) instead of TRL's hard labels.")

    @model_validator(mode="after")
    def _soft_loss_is_not_reward_trainer(self):
        # soft labels train with transformers' Trainer and our loss: RewardTrainer's own settings would be ignored
        if self.soft_labels and self.model_extra:
            import dataclasses

            from transformers import TrainingArguments

            base = {f.name for f in dataclasses.fields(TrainingArguments)}
            own = sorted(k for k in self.model_extra if k not in base)
            if own:
                raise ValueError(f"{own[0]} is a setting of TRL's RewardTrainer, which reward.soft_labels replaces "
                                 "with factory's soft-label loss; remove it or set reward.soft_labels: false")
        return self


# DPOConfig settings of the loss itself, which the soft-label loss replaces (factory/train/soft_dpo.py)
SOFT_DPO_REPLACES = frozenset({"label_smoothing", "loss_weights", "use_weighting", "f_divergence_type",
                               "f_alpha_divergence_coef", "discopop_tau", "ld_alpha"})


class DPOSettings(Strict):
    model_config = TRL_SECTION
    _trl = _trl_section("dpo")
    beta: float = Field(0.1, gt=0.0, description="DPO temperature: strength of the KL constraint.")
    loss_type: str = Field("sigmoid", description="TRL DPO loss type, e.g. sigmoid, ipo, hinge.")
    soft_labels: bool = Field(False, description="Train towards each pair's stored P(chosen) (the judge's soft "
                              "label; 1 for revision pairs): cross-entropy with sigmoid(beta * margin), DPO's sigmoid "
                              "loss at label 1 (factory/train/soft_dpo.py). Needs loss_type sigmoid.")

    @model_validator(mode="after")
    def _soft_labels_need_sigmoid(self):
        if self.soft_labels and self.loss_type != "sigmoid":
            raise ValueError(f"dpo.soft_labels replaces the sigmoid loss; it cannot be combined with loss_type "
                             f"{self.loss_type!r} (set dpo.loss_type: sigmoid or dpo.soft_labels: false)")
        loss_settings = sorted(set(self.model_extra or {}) & SOFT_DPO_REPLACES)
        if self.soft_labels and loss_settings:
            raise ValueError(f"dpo.{loss_settings[0]} shapes TRL's DPO loss, which dpo.soft_labels replaces (the "
                             "stored label is the target); remove it or set dpo.soft_labels: false")
        return self


class KTOSettings(Strict):
    model_config = TRL_SECTION
    _trl = _trl_section("kto")
    beta: float = Field(0.1, gt=0.0, description="KTO temperature.")
    desirable_weight: float = Field(1.0, gt=0.0, description="Weight of desirable (chosen) examples.")
    undesirable_weight: float = Field(1.0, gt=0.0, description="Weight of undesirable (rejected) examples.")


class SFTSettings(Strict):
    model_config = TRL_SECTION
    _trl = _trl_section("sft")
    mix_dataset: str | None = Field(None, description="A user's SFT data mixed into the revisions: a JSONL file or a "
                                    "`datasets` folder, records with `messages` (ending with the assistant's answer) or "
                                    "`prompt` and `completion`.")
    mix_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="Share of the training rows taken from mix_dataset "
                             "(sampled with `seed`; all of it when it has fewer rows).")

    @model_validator(mode="after")
    def _ratio_needs_data(self):
        if self.mix_ratio > 0 and not self.mix_dataset:
            raise ValueError("sft.mix_ratio is set but sft.mix_dataset is not: name the JSONL file or datasets folder")
        if self.mix_dataset and self.mix_ratio == 0:
            raise ValueError("sft.mix_dataset is set but sft.mix_ratio is 0: give the share of rows it should make up")
        return self


class PPOSettings(Strict):
    reward_model: str = Field("outputs/reward", description="Folder of a reward model trained with `factory train reward`.")
    rollout_batch_size: int = Field(8, ge=1, description="Prompts per rollout.")
    ppo_epochs: int = Field(2, ge=1, description="Optimisation epochs over each rollout batch.")
    mini_batch_size: int = Field(4, ge=1, description="Rollouts per PPO mini-batch.")
    max_new_tokens: int = Field(32, ge=1, description="Tokens generated per rollout.")
    temperature: float = Field(1.0, gt=0.0, description="Sampling temperature of rollouts.")
    kl_coef: float = Field(0.05, ge=0.0, description="Initial coefficient beta of the per-token KL penalty.")
    adaptive_kl: bool = Field(False, description="Adapt beta towards target_kl (Ziegler et al. 2019).")
    target_kl: float = Field(6.0, gt=0.0, description="KL target for the adaptive controller.")
    kl_horizon: int = Field(10000, ge=1, description="Horizon of the adaptive KL controller.")
    gamma: float = Field(1.0, ge=0.0, le=1.0, description="Discount of GAE.")
    lam: float = Field(0.95, ge=0.0, le=1.0, description="Lambda of GAE.")
    cliprange: float = Field(0.2, gt=0.0, description="Clip range of the policy ratio.")
    cliprange_value: float = Field(0.2, gt=0.0, description="Clip range of the value function.")
    vf_coef: float = Field(0.1, ge=0.0, description="Weight of the value loss.")
    ptx_coef: float = Field(0.0, ge=0.0, description="Weight of the pretraining-mix (ptx) language-model loss.")
    ptx_texts: str | None = Field(None, description="JSONL/text file of pretraining texts for the ptx term.")


class GRPOSettings(Strict):
    """`factory train grpo` (d-RLAIF, Lee et al. 2023): TRL's GRPOTrainer with the judge as the reward. Any other
    GRPOConfig setting (loss_type, epsilon, scale_rewards, top_p, ...) may be given here too."""

    model_config = TRL_SECTION
    _trl = _trl_section("grpo")
    judge: ModelConfig = Field(
        default_factory=lambda: TransformersModelConfig(path="default"),
        description="The judge that scores every sampled response (a model section as in a pipeline; default: the "
                    "shipped Gemma 3 270M through the transformers engine). It is loaded next to the policy.")
    constitution: str = Field("constitutions/harmless.yaml", description="Principles whose comparison questions the "
                              "judge asks; one principle per prompt, sampled with `seed`.")
    reward_mode: Literal["pairwise", "rubric"] = Field(
        "pairwise", description="'pairwise': the reward is P(sampled response better than the prompt's reference "
                                "response) from the judge's answer log-probabilities, both orders averaged; 'rubric': "
                                "the judge scores both 1-10 in text, 0.5 + (sample - reference) / 18, both orders "
                                "averaged (for judges without log-probabilities).")
    rubric_sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(max_tokens=24),
                                            description="Decoding of the judge's rubric replies (reward_mode rubric).")
    num_generations: int = Field(4, ge=2, description="Responses sampled per prompt; GRPO's advantage is each one's "
                                 "reward against its group's mean. optim.batch_size * gradient_accumulation_steps "
                                 "(completions per generation round) must be a multiple of it.")
    max_completion_length: int = Field(64, ge=1, description="Maximum new tokens per sampled response.")
    beta: float = Field(0.05, gt=0.0, description="KL coefficient against the initial model (> 0, so the KL is "
                        "computed, penalised and logged).")
    temperature: float = Field(1.0, gt=0.0, description="Sampling temperature of the policy's responses.")


class TrainConfig(Strict):
    name: str = Field("train", description="Training run name; outputs go to <output_root>/<name>/.")
    output_root: str = Field("outputs", description="Folder for training outputs.")
    model: str = Field("default", description="Initial model: 'default' (shipped Gemma 3 270M) or a local folder.")
    prompt_format: Literal["plain", "chat"] = Field("plain", description="How prompts are rendered (as in the pipeline).")
    trust_remote_code: bool = Field(False, description="Allow model repos to run their own code.")
    seed: int = Field(0, description="Seed for data order, initialisation and sampling.")
    data: TrainDataConfig = Field(default_factory=TrainDataConfig, description="Which pairs to train on.")
    optim: OptimSettings = Field(default_factory=OptimSettings, description="Optimisation settings.")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA adapters (peft).")
    sft: SFTSettings = Field(default_factory=SFTSettings, description="SL-CAI settings (`factory train sft`).")
    reward: RewardSettings = Field(default_factory=RewardSettings, description="Reward-model settings.")
    dpo: DPOSettings = Field(default_factory=DPOSettings, description="DPO settings.")
    kto: KTOSettings = Field(default_factory=KTOSettings, description="KTO settings.")
    ppo: PPOSettings = Field(default_factory=PPOSettings, description="PPO settings.")
    grpo: GRPOSettings = Field(default_factory=GRPOSettings, description="GRPO settings (the judge as the reward).")


def check_grpo_settings(cfg: TrainConfig) -> None:
    """`factory train grpo`'s settings that span sections (TRL would refuse them only after loading the model), as a
    ConfigError naming the settings; the recipe checks them before its pipeline runs."""
    g, o = cfg.grpo, cfg.optim
    per_round = o.batch_size * o.gradient_accumulation_steps
    if per_round % g.num_generations:
        raise ConfigError(f"optim.batch_size * optim.gradient_accumulation_steps = {per_round} completions per "
                          f"generation round is not a multiple of grpo.num_generations = {g.num_generations}: GRPO "
                          f"ranks whole groups of one prompt's responses; set optim.batch_size to a multiple of "
                          f"{g.num_generations} (e.g. {g.num_generations}) or change grpo.num_generations")
    if g.max_completion_length >= o.max_length:
        raise ConfigError(f"grpo.max_completion_length ({g.max_completion_length}) must be below optim.max_length "
                          f"({o.max_length}), which also holds the prompt")


class EvalConfig(Strict):
    name: str = Field("eval", description="Evaluation name; results go to <output_root>/<name>/metrics.json.")
    output_root: str = Field("outputs", description="Folder for evaluation outputs.")
    policy: ModelConfig | None = Field(None, description="The trained policy to evaluate (the one-policy form of "
                                       "`policies`, reported under the name 'policy').")
    policies: dict[str, ModelConfig] | None = Field(
        None, description="Several policies side by side, name -> model section (as `policy`), each evaluated against "
                          "the same reference completions, one model in memory at a time; one table row each. Give "
                          "either this or `policy`.")
    reference: ModelConfig = Field(default_factory=VLLMModelConfig, description="What the policy is compared with "
                                   "(usually the SFT model or the model DPO started from).")
    judge: ModelConfig | None = Field(
        None, description="The AI-feedback judge; the reference model when omitted. A judge section is merged over "
                          "the reference's (as models.judge is over models.policy in a pipeline).")
    constitution: str = Field("constitutions/harmless.yaml", description="Principles whose comparison questions the "
                              "judge asks for the harmlessness win rate.")
    helpful_constitution: str = Field("constitutions/helpful_honest.yaml", description="Principles whose comparison "
                                      "questions the judge asks for the helpfulness win rate.")
    redteam_set: str | None = Field("data/eval_redteam.jsonl", description="JSONL of {id, prompt} requests for "
                                    "harmful help: the harmless rate (the shipped set by default; null skips it).")
    ordinary_set: str | None = Field("data/eval_ordinary.jsonl", description="JSONL of {id, prompt} benign requests "
                                     "that read like risky ones: the over-refusal rate (null skips it).")
    max_set_prompts: int = Field(40, ge=1, description="Use at most this many prompts of each shipped set.")
    logprob_batch_size: int = Field(8, ge=1, description="Sequences per forward pass for pair accuracy and KL.")
    reward_model: str | None = Field(None, description="Optional reward-model folder: mean scores and held-out accuracy.")
    data: TrainDataConfig = Field(default_factory=TrainDataConfig, description="Held-out prompts and pairs (eval side of the split).")
    max_prompts: int = Field(32, ge=1, description="Evaluate on at most this many held-out prompts.")
    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(max_tokens=64, stop=["\n\n"]),
                                     description="Decoding for policy and reference completions (greedy by default).")
    seed: int = Field(0, description="Seed for principle sampling and the data split.")

    @model_validator(mode="before")
    @classmethod
    def _judge_inherits_reference(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("judge"), dict):
            data = {**data, "judge": inherit_model_section(data.get("reference") or {}, data["judge"])}
        return data

    @model_validator(mode="after")
    def _one_policy_form(self) -> EvalConfig:
        if (self.policy is None) == (self.policies is None):
            raise ValueError("give exactly one of `policy` (one model section) and `policies` (name -> model section), "
                             f"not {'both' if self.policy is not None else 'neither'}")
        if self.policies is not None and not self.policies:
            raise ValueError("`policies` is empty: name at least one policy, e.g. policies: {dpo: {path: outputs/dpo}}")
        return self

    def named_policies(self) -> dict[str, ModelConfig]:
        """name -> model section; the one-policy form is named 'policy'."""
        return dict(self.policies) if self.policies is not None else {"policy": self.policy}


RECIPE_METHODS = ("dpo", "kto", "ppo", "grpo")
RECIPE_STEPS = ("sft", "reward") + RECIPE_METHODS


class RecipeConfig(Strict):
    """`factory recipe cai`: the pipeline, then SL-CAI, a reward model, the RL-CAI policies and one evaluation.
    The step sections are `factory train` / `factory eval` configs, validated as such before anything runs
    (factory/recipe.py); the recipe sets what links the steps (names, models, the store and run, the judge)."""

    name: str = Field("cai", description="Recipe name (a label).")
    output_root: str = Field("outputs/cai", description="Every step's output goes to <output_root>/<step>/.")
    pipeline: PipelineConfig = Field(..., description="The data pipeline, as in pipelines/quickstart.yaml: "
                                     "generate, critique, revise, pairs and AI labels (label.enabled).")
    methods: list[Literal["dpo", "kto", "ppo", "grpo"]] = Field(
        default_factory=lambda: ["dpo", "ppo"], min_length=1,
        description="RL-CAI policies trained from the SFT model: dpo, kto, ppo (against the reward model) and/or "
                    "grpo (the judge as the reward).")
    train: dict[str, Any] = Field(default_factory=dict, description="`factory train` settings shared by every step "
                                  "(optim, lora, data filters, method sections ...). The recipe sets name, "
                                  "output_root, model, prompt_format, data.store and data.runs.")
    steps: dict[Literal["sft", "reward", "dpo", "kto", "ppo", "grpo"], dict[str, Any]] = Field(
        default_factory=dict, description="Per-step settings merged over `train`, e.g. {sft: {optim: {max_steps: 40}}}.")
    eval: dict[str, Any] = Field(default_factory=dict, description="`factory eval` settings (max_prompts, sampling, "
                                 "seed, helpful_constitution ...). The recipe sets the policies, the reference (the "
                                 "SFT model), the judge (the pipeline's), the reward model, the constitution and data.")

    @model_validator(mode="after")
    def _label_needed(self):
        if not self.pipeline.label.enabled:
            raise ValueError("pipeline.label.enabled is false: the reward model, DPO/KTO and the evaluation need AI "
                             "labels; set pipeline.label.enabled: true")
        unused = sorted(set(self.steps) - {"sft", "reward", *self.methods})
        if unused:
            raise ValueError(f"steps.{unused[0]} is set but {unused[0]!r} is not in methods {self.methods}; add it "
                             f"to methods or remove the section")
        return self


def load_recipe_config(path: str | Path, overrides: list[str] | None = None) -> RecipeConfig:
    return load_config(path, RecipeConfig, overrides)


def load_eval_config(path: str | Path, overrides: list[str] | None = None) -> EvalConfig:
    return load_config(path, EvalConfig, overrides)


def load_train_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    return load_config(path, TrainConfig, overrides)


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The BaseModel classes inside an annotation (through Optional, Union and Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _engine_of(model: type[BaseModel]) -> str | None:
    field = model.model_fields.get("engine")
    args = typing.get_args(field.annotation) if field is not None else ()
    return args[0] if len(args) == 1 else None


def _walk(schema: type[BaseModel], loc: tuple) -> tuple[list[str], type[BaseModel] | None, str | None]:
    """Follow an error location through the schema: (the user's key path without pydantic's union tags, the model
    holding the last key, the engine of the model section it is in, if any)."""
    model: Any = schema
    keys: list[str] = []
    engine = None
    parts = list(loc)
    i = 0
    while i < len(parts):
        part = parts[i]
        keys.append(str(part))
        if i == len(parts) - 1:
            break
        if isinstance(part, int):  # an index into a list field: its items are the model already found
            i += 1
            continue
        field = model.model_fields.get(part) if model is not None and isinstance(part, str) else None
        found = _models_in(field.annotation) if field is not None else []
        if len(found) > 1:  # a discriminated union: pydantic puts the member's tag after the field name
            tagged = {_engine_of(m): m for m in found}
            if i + 1 < len(parts) and parts[i + 1] in tagged:
                engine = parts[i + 1]
                model = tagged[engine]
                i += 2
                continue
        model = found[0] if found else None
        i += 1
    return keys, model, engine


def _allowed(schema: type[BaseModel], loc: tuple) -> str:
    """The field names allowed at a location, for error messages."""
    _, model, _ = _walk(schema, loc)
    return ", ".join(model.model_fields) if model is not None else ""


def _allowed_here(model: type[BaseModel] | None) -> str:
    """'; allowed here: a, b, c' for an unknown-key message, or nothing when the keys are not known."""
    return f"; allowed here: {', '.join(model.model_fields)}" if model is not None and model.model_fields else ""


def format_validation_error(err: ValidationError, source: str, schema: type[BaseModel]) -> str:
    lines = [f"{source}: invalid config"]
    for e in err.errors():
        parts, model, engine = _walk(schema, e["loc"])
        key = ".".join(parts)
        if e["type"] == "extra_forbidden":
            if engine is not None:
                owners = [name for name, m in ENGINE_CONFIGS.items() if parts[-1] in m.model_fields]
                where = f" (a setting of engine {', '.join(owners)})" if owners else ""
                lines.append(f"  {key}: unknown key for engine '{engine}'{where}{_allowed_here(model)}")
            else:
                lines.append(f"  {key}: unknown key{_allowed_here(model)}")
        elif e["type"] == "union_tag_invalid":
            ctx = e.get("ctx") or {}
            lines.append(f"  {key}.{ctx.get('discriminator', 'engine').strip(chr(39))}: unknown value "
                         f"{ctx.get('tag')!r}; allowed: {ctx.get('expected_tags', '').replace(chr(39), '')}")
        elif not e["loc"]:  # a whole-document check: its input is the whole file, not worth echoing
            lines.append(f"  {e['msg']}")
        else:
            got = repr(e.get("input"))
            msg = e["msg"].removeprefix("Value error, ")  # our validators' messages are whole sentences
            lines.append(f"  {key}: {msg} (got {got[:80] + '...' if len(got) > 80 else got})")
    return "\n".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """'a.b.c=value' -> (['a','b','c'], yaml-parsed value)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key.path=value")
    key, raw = item.split("=", 1)
    if not key.strip():
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e})") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} malformed YAML: {getattr(e, 'problem', e)}") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    return data


def load_config(path: str | Path, schema: type[BaseModel], overrides: list[str] | None = None):
    data = apply_overrides(read_yaml(path), overrides or [])
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, str(path), schema)) from e


def load_pipeline_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Load a pipeline YAML; relative paths inside it stay relative to the working directory."""
    return load_config(path, PipelineConfig, overrides)

