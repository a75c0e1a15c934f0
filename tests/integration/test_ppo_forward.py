"""PPO's forward pass (factory.train.ppo.PolicyWithValue): the value head reads the decoder's last hidden state
through a hook, not through output_hidden_states=True (which keeps every layer's hidden states). Its logits and
values equal those of the old output_hidden_states path, for plain and LoRA (peft) policies and the reference
(adapters off), on the tiny Gemma 3 and the families users run (Llama 3, Qwen 2, Mistral, Phi-3); and no forward
of a PPO run asks for every layer's hidden states."""

from __future__ import annotations

import pytest
import torch

from factory.config import TrainConfig

pytestmark = pytest.mark.integration
PROMPTS = ["Explain why the sky is blue.", "What is the boiling point of water?"]


def old_forward(policy, lm, ids, attn, n, temperature):
    """PolicyWithValue.forward as it was: the last hidden state from output_hidden_states=True."""
    from factory.train.ppo import position_ids

    out = lm(input_ids=ids, attention_mask=attn, position_ids=position_ids(attn), logits_to_keep=n + 1,
             output_hidden_states=True, use_cache=False)
    values = policy.value_head(out.hidden_states[-1][:, -n - 1:-1].float()).squeeze(-1)
    return out.logits[:, :-1].float() / temperature, values


@pytest.fixture(scope="module")
def model_dirs(tiny_model_dir, family_models):
    class Dirs:
        def __getitem__(self, name):
            return tiny_model_dir if name == "gemma3" else family_models[name].policy
    return Dirs()


@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
@pytest.mark.parametrize("family", ["gemma3", "llama3", "qwen2", "mistral", "phi3"])
def test_hooked_forward_equals_the_output_hidden_states_path(model_dirs, family, lora):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from factory.train.ppo import PolicyWithValue

    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_pretrained(model_dirs[family], dtype=torch.float32)
    if lora:  # adapters with non-zero B, so that the policy and the reference (adapters off) differ
        lm = get_peft_model(lm, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    policy = PolicyWithValue(lm).eval()
    torch.nn.init.normal_(policy.value_head.weight)  # a value head that reads the hidden state (it starts at 0)
    torch.nn.init.normal_(policy.value_head.bias)
    vocab = lm.config.get_text_config().vocab_size
    ids = torch.randint(10, min(vocab, 30000), (3, 14))
    attn = torch.ones_like(ids)
    attn[0, :4] = 0  # left padding, as in rollouts
    attn[1, :1] = 0
    n = 5
    with torch.no_grad():
        logits, values = policy(ids, attn, n, 0.7)
        want_logits, want_values = old_forward(policy, lm, ids, attn, n, 0.7)
        assert logits.dtype == values.dtype == torch.float32 and values.shape == (3, n)
        assert logits.shape == (3, n, want_logits.shape[-1])
        torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(values, want_values, atol=1e-5, rtol=0)
        assert values.std() > 0.1  # the values depend on the hidden states (not a constant head)
        if lora:  # the reference: the same model with adapters off
            with lm.disable_adapter():
                ref_logits, ref_values = policy(ids, attn, n, 0.7)
                want_ref_logits, want_ref_values = old_forward(policy, lm, ids, attn, n, 0.7)
            torch.testing.assert_close(ref_logits, want_ref_logits, atol=1e-5, rtol=0)
            torch.testing.assert_close(ref_values, want_ref_values, atol=1e-5, rtol=0)
            assert (ref_logits - logits).abs().max() > 1e-3  # adapters off really is another model


def test_no_ppo_forward_asks_for_every_layers_hidden_states(tiny_model_dir, tmp_path, monkeypatch):
    """A spy on every module call of two short PPO runs (a plain policy with its copied reference; a LoRA policy
    whose reference is adapters-off, with the ptx term): no call passes output_hidden_states=True and no model's
    config turns it on. The spy does see such a call when one is made (a control), and it saw the decoder run."""
    from factory.train.ppo import decoder_of, run_ppo

    asked, decoder_calls = [], []
    original = torch.nn.Module.__call__

    def spy(self, *args, **kwargs):
        if kwargs.get("output_hidden_states") or getattr(getattr(self, "config", None), "output_hidden_states", False):
            asked.append(type(self).__name__)
        if type(self).__name__.endswith("TextModel"):  # Gemma3TextModel: the decoder
            decoder_calls.append(kwargs.get("output_hidden_states"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "__call__", spy)
    ptx = tmp_path / "ptx.txt"
    ptx.write_text("The sky is blue.\nWater boils at 100 C.\n")
    small = {"rollout_batch_size": 2, "mini_batch_size": 2, "ppo_epochs": 1, "max_new_tokens": 4}
    for name, extra in (("plain", {}), ("lora", {"lora": {"enabled": True, "r": 4, "alpha": 8},
                                                 "ppo": {**small, "ptx_coef": 0.5}})):
        cfg = TrainConfig.model_validate({"name": name, "output_root": str(tmp_path), "model": str(tiny_model_dir),
                                          "optim": {"max_steps": 1, "learning_rate": 1e-3}, "ppo": small, **extra})
        run_ppo(cfg, PROMPTS, lambda p, c: torch.ones(len(p)), log=lambda m: None,
                ptx_texts=["The sky is blue.", "Water boils at 100 C."] if name == "lora" else None)
    # rollout (generate: one call per token), old log-probs and values, reference, one update (+ ptx): many calls
    assert len(decoder_calls) > 6 and not asked, asked

    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lm(input_ids=torch.tensor([[2, 100, 200]]), output_hidden_states=True)
    assert asked  # the spy catches the old path's request
    assert decoder_of(lm) is lm.model
