"""Tiny random chat models of the major model families, with their real tokenizers and chat templates.

Each family gets a real tokenizer (llama.cpp's vocab GGUFs, see tests/vocabs.py, or the shipped Gemma 3
tokenizer), the family's real instruct chat template, the instruct model's end-of-turn token(s) as eos, a pad
token, and two random models saved beside it: a `policy` (2 layers) and a different, bigger `judge`
(3 layers, another seed). `AutoTokenizer.from_pretrained(dir)`, transformers and vLLM load each folder.

The session fixture `family_models` (made global in tests/conftest.py) builds all of them once, under pytest's
tmp dir; nothing is cached outside it except the vocab files.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# ---- The families' chat templates, copied from their published tokenizer_config.json ----

# meta-llama/Meta-Llama-3-8B-Instruct
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' "
    "+ message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 "
    "== 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt "
    "%}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Qwen/Qwen2.5-*-Instruct (the JSON string as published; Python's escapes read it the same way)
QWEN25_TEMPLATE = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n        "
    "{{- messages[0]['content'] }}\n    {%- else %}\n        {{- 'You are Qwen, created by Alibaba Cloud. You are "
    "a helpful assistant.' }}\n    {%- endif %}\n    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to "
    "assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:"
    "\\n<tools>\" }}\n    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    "
    "{%- endfor %}\n    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, "
    "\\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n{%- else %}\n    {%- if messages[0]"
    "['role'] == 'system' %}\n        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n{%- for message in messages %}\n    {%- if "
    "(message.role == \"user\") or (message.role == \"system\" and not loop.first) or (message.role == "
    "\"assistant\" and not message.tool_calls) %}\n        {{- '<|im_start|>' + message.role + '\\n' + "
    "message.content + '<|im_end|>' + '\\n' }}\n    {%- elif message.role == \"assistant\" %}\n        {{- "
    "'<|im_start|>' + message.role }}\n        {%- if message.content %}\n            {{- '\\n' + message.content "
    "}}\n        {%- endif %}\n        {%- for tool_call in message.tool_calls %}\n            {%- if "
    "tool_call.function is defined %}\n                {%- set tool_call = tool_call.function %}\n            "
    "{%- endif %}\n            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n            {{- tool_call.name }}\n      "
    "      {{- '\", \"arguments\": ' }}\n            {{- tool_call.arguments | tojson }}\n            {{- '}\\n"
    "</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == "
    "\"tool\" %}\n        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n        "
    "    {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n        {{- "
    "message.content }}\n        {{- '\\n</tool_response>' }}\n        {%- if loop.last or (messages[loop.index0 "
    "+ 1].role != \"tool\") %}\n            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n"
    "{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"
)

# mistralai/Mistral-7B-Instruct-v0.1 (the Llama 2 [INST] format; refuses a system role)
MISTRAL_V01_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}"
    "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

# google/gemma-3-*-it (folds a system message into the first user turn)
GEMMA3_TEMPLATE = (
    "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n    {%- else -%}\n        "
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n    {%- endif -%}\n    "
    "{%- set loop_messages = messages[1:] -%}\n{%- else -%}\n    {%- set first_user_prefix = \"\" -%}\n    "
    "{%- set loop_messages = messages -%}\n{%- endif -%}\n{%- for message in loop_messages -%}\n    {%- if "
    "(message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n        {{ raise_exception(\"Conversation roles "
    "must alternate user/assistant/user/assistant/...\") }}\n    {%- endif -%}\n    {%- if (message['role'] == "
    "'assistant') -%}\n        {%- set role = \"model\" -%}\n    {%- else -%}\n        {%- set role = "
    "message['role'] -%}\n    {%- endif -%}\n    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if "
    "loop.first else \"\") }}\n    {%- if message['content'] is string -%}\n        {{ message['content'] | trim "
    "}}\n    {%- elif message['content'] is iterable -%}\n        {%- for item in message['content'] -%}\n       "
    "     {%- if item['type'] == 'image' -%}\n                {{ '<start_of_image>' }}\n            {%- elif "
    "item['type'] == 'text' -%}\n                {{ item['text'] | trim }}\n            {%- endif -%}\n        "
    "{%- endfor -%}\n    {%- else -%}\n        {{ raise_exception(\"Invalid content type\") }}\n    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n{%- endfor -%}\n{%- if add_generation_prompt -%}\n    "
    "{{'<start_of_turn>model\\n'}}\n{%- endif -%}\n"
)


@dataclass(frozen=True)
class FamilySpec:
    name: str
    source: str  # a vocab GGUF file name, or "shipped" (the shipped Gemma 3 tokenizer)
    model_type: str
    template: str | None  # None: the template in the vocab file
    template_source: str
    eos_token: str  # the tokenizer's eos (the instruct model's)
    eos_tokens: tuple[str, ...]  # generation_config's eos_token_id list (what ends a turn)
    pad_token: str
    bos_token: str | None = "keep"  # "keep": the vocab's; None: no bos (Qwen)
    add_bos: bool = False  # the published tokenizer prepends bos when encoding
    extra_markers: tuple[str, ...] = ()  # template markers that are plain text, not tokens
    system_role: str = "native"  # native | folded (into the first user turn) | refused | dropped (silently)


SPECS: dict[str, FamilySpec] = {s.name: s for s in [
    FamilySpec("llama3", "ggml-vocab-llama-bpe.gguf", "llama", LLAMA3_TEMPLATE,
               "meta-llama/Meta-Llama-3-8B-Instruct tokenizer_config.json",
               eos_token="<|eot_id|>", eos_tokens=("<|end_of_text|>", "<|eot_id|>"),
               # Llama 3 has no pad token; id 128004 is the reserved token Llama 3.1 names <|finetune_right_pad_id|>
               pad_token="<|reserved_special_token_2|>", add_bos=True),
    FamilySpec("qwen2", "ggml-vocab-qwen2.gguf", "qwen2", QWEN25_TEMPLATE,
               "Qwen/Qwen2.5-Instruct tokenizer_config.json (the vocab file's own is a generic ChatML)",
               eos_token="<|im_end|>", eos_tokens=("<|im_end|>", "<|endoftext|>"), pad_token="<|endoftext|>",
               bos_token=None),
    FamilySpec("mistral", "ggml-vocab-llama-spm.gguf", "mistral", MISTRAL_V01_TEMPLATE,
               "mistralai/Mistral-7B-Instruct-v0.1 tokenizer_config.json",
               eos_token="</s>", eos_tokens=("</s>",), pad_token="<unk>", add_bos=True,
               extra_markers=("[INST]", "[/INST]"), system_role="refused"),
    FamilySpec("phi3", "ggml-vocab-phi-3.gguf", "phi3", None, "the vocab file (Phi-3's own, older revision)",
               # Phi-3-mini-instruct: tokenizer eos <|endoftext|>, generation_config eos [32000, 32001, 32007]
               eos_token="<|endoftext|>", eos_tokens=("<|endoftext|>", "<|assistant|>", "<|end|>"),
               pad_token="<|endoftext|>", add_bos=True, extra_markers=("<|system|>",), system_role="dropped"),
    FamilySpec("gemma3", "shipped", "gemma3_text", GEMMA3_TEMPLATE, "google/gemma-3-it tokenizer_config.json",
               # gemma-3-it: tokenizer eos <eos>, generation_config eos [1, 106]
               eos_token="<eos>", eos_tokens=("<eos>", "<end_of_turn>"), pad_token="<pad>", system_role="folded"),
]}

POLICY = dict(layers=2, seed=0)
JUDGE = dict(layers=3, seed=1)  # a different model, "a judge bigger than the policy"


@dataclass(frozen=True)
class FamilyModels:
    family: str
    policy: Path
    judge: Path
    tokenizer_name: str
    control_strings: list[str] = field(default_factory=list)
    eos_token_ids: list[int] = field(default_factory=list)
    system_role: str = "native"


def load_tokenizer(spec: FamilySpec, shipped_model_dir: Path | None = None):
    """The family's chat tokenizer: real vocab, real template, instruct eos, a pad token."""
    from transformers import AutoTokenizer

    if spec.source == "shipped":
        if shipped_model_dir is None:
            raise ValueError("gemma3 needs the shipped model's folder")
        tok = AutoTokenizer.from_pretrained(shipped_model_dir)
    else:
        from vocabs import vocab_dir

        tok = AutoTokenizer.from_pretrained(vocab_dir(), gguf_file=spec.source, add_bos_token=spec.add_bos)
    if spec.template is not None:
        tok.chat_template = spec.template
    if not tok.chat_template:
        raise RuntimeError(f"{spec.name}: no chat template")
    tok.eos_token = spec.eos_token
    tok.pad_token = spec.pad_token
    if spec.bos_token is None:
        tok.bos_token = None
    return tok


def control_strings(tok, spec: FamilySpec) -> list[str]:
    """The family's chat-control strings: the tokenizer's named special tokens, its added tokens that the
    template writes, and the template's plain-text markers (e.g. Mistral's [INST])."""
    template = tok.chat_template
    out = [t for t in (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token, *spec.eos_tokens) if t]
    out += [t.content for t in tok.added_tokens_decoder.values()
            if t.content in template and t.content.strip() and (t.special or t.content.startswith("<"))]
    out += list(spec.extra_markers)
    return list(dict.fromkeys(out))


def _drop_phantom_tokens(folder: Path, vocab_size: int) -> None:
    """transformers' GGUF reader adds an `<|endoftext|>` beyond Llama 3's 128256 ids; the real tokenizer has
    no such token, so drop added tokens past the vocab from the saved files."""
    tj = folder / "tokenizer.json"
    data = json.loads(tj.read_text())
    kept = [t for t in data.get("added_tokens", []) if t["id"] < vocab_size]
    if len(kept) == len(data.get("added_tokens", [])):
        return
    data["added_tokens"] = kept
    tj.write_text(json.dumps(data, ensure_ascii=False))
    tc = folder / "tokenizer_config.json"
    cfg = json.loads(tc.read_text())
    if "added_tokens_decoder" in cfg:
        cfg["added_tokens_decoder"] = {k: v for k, v in cfg["added_tokens_decoder"].items() if int(k) < vocab_size}
        tc.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))


def _base_vocab_size(tok) -> int:
    """Ids the vocab file itself defines (its model vocab includes its control tokens; anything past it was
    added by transformers' GGUF reader)."""
    return tok.backend_tokenizer.get_vocab_size(with_added_tokens=False)


def model_config(spec: FamilySpec, tok, layers: int, shipped_model_dir: Path | None = None):
    from transformers import AutoConfig

    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    shape = dict(num_hidden_layers=layers, hidden_size=64, intermediate_size=128, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=32)
    if spec.source == "shipped":
        cfg = AutoConfig.from_pretrained(shipped_model_dir)
        for k, v in {**ids, **shape}.items():
            setattr(cfg, k, v)
        cfg.layer_types = (cfg.layer_types * layers)[:layers]
        cfg.max_position_embeddings = 2048
    else:
        cfg = AutoConfig.for_model(spec.model_type, vocab_size=len(tok), tie_word_embeddings=True,
                                   max_position_embeddings=4096, **ids, **shape)
    if hasattr(cfg, "original_max_position_embeddings"):  # Phi-3
        cfg.original_max_position_embeddings = cfg.max_position_embeddings
    return cfg


def build_family(spec: FamilySpec, out: Path, shipped_model_dir: Path | None = None) -> FamilyModels:
    """Save the family's tokenizer beside a random policy and a random judge under `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok = load_tokenizer(spec, shipped_model_dir)
    eos_ids = [tok.convert_tokens_to_ids(t) for t in spec.eos_tokens]
    dirs = {role: out / f"{spec.name}-{role}" for role in ("policy", "judge")}
    tok_files = []
    for role, shape in (("policy", POLICY), ("judge", JUDGE)):
        d = dirs[role]
        d.mkdir(parents=True, exist_ok=True)
        if not tok_files:
            before = set(d.iterdir())
            tok.save_pretrained(d)
            if spec.source != "shipped":
                _drop_phantom_tokens(d, _base_vocab_size(tok))
            tok_files = sorted(set(d.iterdir()) - before)
            saved = AutoTokenizer.from_pretrained(d)
        else:
            for f in tok_files:
                shutil.copy(f, d / f.name)
        cfg = model_config(spec, saved, shape["layers"], shipped_model_dir)
        torch.manual_seed(shape["seed"])
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        model.save_pretrained(d)
        GenerationConfig(bos_token_id=saved.bos_token_id, eos_token_id=eos_ids,
                         pad_token_id=saved.pad_token_id).save_pretrained(d)
    return FamilyModels(spec.name, dirs["policy"], dirs["judge"],
                        tokenizer_name=spec.source if spec.source != "shipped" else "gemma-3-270m (shipped)",
                        control_strings=control_strings(tok, spec), eos_token_ids=eos_ids,
                        system_role=spec.system_role)


class LazyFamilies(Mapping):
    """family -> FamilyModels, each family built on first access (a test of one family pays for one)."""

    def __init__(self, out: Path, shipped_model_dir: Path | None, families=None):
        self._out, self._shipped, self._names = Path(out), shipped_model_dir, list(families or SPECS)
        self._built: dict[str, FamilyModels] = {}

    def __getitem__(self, name: str) -> FamilyModels:
        if name not in self._names:
            raise KeyError(name)
        if name not in self._built:
            shipped = self._shipped() if callable(self._shipped) and SPECS[name].source == "shipped" else self._shipped
            self._built[name] = build_family(SPECS[name], self._out, None if callable(shipped) else shipped)
        return self._built[name]

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def build_all(out: Path, shipped_model_dir: Path | None, families=None) -> dict[str, FamilyModels]:
    return dict(LazyFamilies(out, shipped_model_dir, families))


@pytest.fixture(scope="session")
def family_models(tmp_path_factory, request) -> Mapping[str, FamilyModels]:
    """family -> FamilyModels (policy and judge folders with the family's real tokenizer and chat template),
    each built once per session on first access. Families: llama3, qwen2, mistral, phi3, gemma3."""
    # The shipped model (gemma3's tokenizer) is prepared only when gemma3 is used.
    return LazyFamilies(tmp_path_factory.mktemp("families"), lambda: request.getfixturevalue("shipped_model_dir"))
