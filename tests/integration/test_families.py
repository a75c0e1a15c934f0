"""The tiny random chat models of other families (tests/families.py) are real enough to test factory on:
their real tokenizers load with the family's chat template, eos and pad; the models generate; the judge is a
different model; and the log-prob judge's answer tokens can be derived from the cue. (vLLM loading of every
family was checked by hand: `python tests/check_families_vllm.py`, one engine at a time.)"""

from __future__ import annotations

import json

import pytest

from families import SPECS

pytestmark = pytest.mark.integration

FAMILIES = list(SPECS)
CONVERSATION = [
    {"role": "system", "content": "SYSTEM-SENTINEL be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Name a colour."},
]


def _tok(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_has_the_family_chat_format(family_models, family):
    fam = family_models[family]
    spec = SPECS[family]
    tok = _tok(fam.policy)
    assert tok.chat_template
    assert tok.pad_token is not None and tok.pad_token_id is not None
    assert tok.eos_token == spec.eos_token
    gen = json.loads((fam.policy / "generation_config.json").read_text())
    assert gen["eos_token_id"] == fam.eos_token_ids == [tok.convert_tokens_to_ids(t) for t in spec.eos_tokens]
    assert tok.eos_token_id in fam.eos_token_ids
    # Every control string that is one of the tokenizer's tokens encodes to exactly that one token.
    added = {t.content for t in tok.added_tokens_decoder.values()}
    for s in fam.control_strings:
        if s in added:
            assert len(tok(s, add_special_tokens=False)["input_ids"]) == 1, s
    # The real chat format: system role handling as the family's template does it.
    user_only = CONVERSATION[1:]
    text = tok.apply_chat_template(user_only, tokenize=False, add_generation_prompt=True)
    assert "Hi there" in text and "Name a colour." in text
    if spec.system_role == "refused":
        with pytest.raises(Exception, match="roles"):
            tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    else:
        text = tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
        assert ("SYSTEM-SENTINEL" in text) == (spec.system_role != "dropped")
    ids = tok.apply_chat_template(user_only, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert len(ids) > 4
    # The chat markers of each family are in the rendered text.
    marker = {"llama3": "<|start_header_id|>", "qwen2": "<|im_start|>", "mistral": "[INST]", "phi3": "<|user|>",
              "gemma3": "<start_of_turn>"}[family]
    assert marker in text and marker in fam.control_strings


@pytest.mark.parametrize("family", FAMILIES)
def test_policy_and_judge_load_and_generate(family_models, family):
    import torch
    from transformers import AutoModelForCausalLM

    fam = family_models[family]
    tok = _tok(fam.policy)
    policy = AutoModelForCausalLM.from_pretrained(fam.policy, dtype=torch.float32)
    judge = AutoModelForCausalLM.from_pretrained(fam.judge, dtype=torch.float32)
    assert (policy.config.num_hidden_layers, judge.config.num_hidden_layers) == (2, 3)
    assert policy.config.max_position_embeddings >= 2048
    assert policy.get_input_embeddings().weight.shape[0] >= len(tok)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Name a colour."}], tokenize=False,
                                     add_generation_prompt=True)
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    torch.manual_seed(0)
    out = policy.generate(**enc, min_new_tokens=8, max_new_tokens=16, do_sample=True,
                          pad_token_id=tok.pad_token_id)
    new = out[0, enc["input_ids"].shape[1]:]
    assert 8 <= len(new) <= 16
    with torch.no_grad():  # a different model, not the policy with more layers of the same weights
        a = policy(**enc).logits[0, -1]
        b = judge(**enc).logits[0, -1]
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("family", FAMILIES)
def test_answer_tokens_follow_the_cue(family_models, family):
    """The log-prob judge's derivation: the ids of the cue are a prefix of the ids of cue + label, and the
    label adds exactly one token, different for A and B."""
    tok = _tok(family_models[family].policy)
    cue = "The answer is ("
    base = tok(cue, add_special_tokens=False)["input_ids"]
    cont = {}
    for label in "AB":
        full = tok(cue + label, add_special_tokens=False)["input_ids"]
        assert full[:len(base)] == base, (family, label)
        cont[label] = full[len(base):]
        assert len(cont[label]) == 1, (family, label, cont[label])
    assert cont["A"] != cont["B"]
    assert tok.decode(cont["A"]).strip() == "A"
