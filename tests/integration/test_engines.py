"""Both engines on the tiny random model: BOS handling, token counts, finish reasons, and greedy parity."""

import pytest

from factory.config import SamplingConfig

pytestmark = pytest.mark.integration

PROMPTS = ["Human: Hello there\n\nAssistant:", "The capital of France is", "One two three four"]


@pytest.mark.parametrize("which", ["tiny_vllm", "tiny_hf"])
def test_encode_starts_with_exactly_one_bos(request, which):
    eng = request.getfixturevalue(which)
    bos = eng.tokenizer.bos_token_id
    ids = eng.encode("Hello")
    assert ids[0] == bos and ids[1] != bos
    assert eng.encode("<bos>Hello".replace("<bos>", "")) == ids


@pytest.mark.parametrize("which", ["tiny_vllm", "tiny_hf"])
def test_completion_reports_tokens_and_length_finish(request, which):
    eng = request.getfixturevalue(which)
    ids = [eng.encode(p) for p in PROMPTS]
    outs = eng.generate(ids, SamplingConfig(max_tokens=5), [0] * len(ids), stop=[])
    assert len(outs) == len(PROMPTS)
    for prompt_ids, out in zip(ids, outs):
        assert out.prompt_tokens == len(prompt_ids)
        assert 1 <= out.output_tokens <= 5
        assert out.finish_reason in ("stop", "length")
    assert any(o.finish_reason == "length" and o.output_tokens == 5 for o in outs)


def test_greedy_outputs_match_between_engines(tiny_vllm, tiny_hf):
    sampling = SamplingConfig(max_tokens=8)
    v = tiny_vllm.generate([tiny_vllm.encode(p) for p in PROMPTS], sampling, [0] * 3, stop=[])
    h = tiny_hf.generate([tiny_hf.encode(p) for p in PROMPTS], sampling, [0] * 3, stop=[])
    assert [o.text for o in v] == [o.text for o in h]
    assert [o.output_tokens for o in v] == [o.output_tokens for o in h]
    assert any(o.text.strip() for o in v)


def test_stop_strings_cut_output_on_both_engines(tiny_vllm, tiny_hf):
    sampling = SamplingConfig(max_tokens=12)
    free = tiny_vllm.generate([tiny_vllm.encode(PROMPTS[1])], sampling, [0], stop=[])[0].text
    words = free.split()
    if len(words) < 3:
        pytest.skip("the random model produced too little text to pick a stop string from")
    stop = words[1]
    for eng in (tiny_vllm, tiny_hf):
        out = eng.generate([eng.encode(PROMPTS[1])], sampling, [0], stop=[stop])[0]
        assert stop not in out.text
        assert out.finish_reason == "stop"
        assert free.startswith(out.text)


def test_seeded_sampling_is_reproducible_per_request(tiny_vllm):
    sampling = SamplingConfig(max_tokens=10, temperature=1.0)
    ids = [tiny_vllm.encode(PROMPTS[0])] * 2
    a = tiny_vllm.generate(ids, sampling, [1, 2], stop=[])
    b = tiny_vllm.generate(ids, sampling, [1, 2], stop=[])
    assert [o.text for o in a] == [o.text for o in b]
    assert a[0].text != a[1].text
