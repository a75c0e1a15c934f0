"""vLLM offline engine: one `LLM`, every batch in one `generate` call, prefix caching on.

vLLM starts its engine core in a spawned process, so code that builds this engine must run under
`if __name__ == "__main__":` or from an installed entry point (the `factory` command is one).
"""

from __future__ import annotations

import os

from factory.config import ModelConfig, SamplingConfig
from factory.engines.base import Completion, encode_prompt, special_token_strings


def _on_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


class VLLMEngine:
    name = "vllm"

    def __init__(self, cfg: ModelConfig, model_dir: str, seed: int = 0):
        # vLLM logs to stdout at INFO; keep the CLI's output readable unless the user asked for more.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        gpu = _on_gpu()
        if not gpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(cfg.kv_cache_gb))))
        from vllm import LLM

        kwargs = dict(
            model=model_dir, tokenizer=model_dir, dtype=cfg.dtype, max_model_len=cfg.max_model_len,
            seed=seed, trust_remote_code=cfg.trust_remote_code, enable_prefix_caching=cfg.enable_prefix_caching,
            tensor_parallel_size=cfg.tensor_parallel_size,
        )
        if gpu:
            kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        else:
            kwargs["enforce_eager"] = True  # CUDA graphs do not exist on CPU; compilation only costs start-up
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.model_id = model_dir
        self.max_model_len = cfg.max_model_len
        self.special_tokens = special_token_strings(self.tokenizer)

    def encode(self, prompt) -> list[int]:
        return encode_prompt(self.tokenizer, prompt)

    def sampling_params(self, sampling: SamplingConfig, seed: int, stop: list[str]):
        from vllm import SamplingParams

        return SamplingParams(
            temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
            max_tokens=sampling.max_tokens, stop=stop or None, repetition_penalty=sampling.repetition_penalty,
            seed=seed if sampling.temperature > 0 else None, skip_special_tokens=True,
        )

    def score_next_token(self, prompts, token_ids) -> list[list[float]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(temperature=0.0, max_tokens=1, logprob_token_ids=list(token_ids), detokenize=False)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], params, use_tqdm=False)
        result = []
        for out in outs:
            step = out.outputs[0].logprobs[0]
            result.append([float(step[t].logprob) for t in token_ids])
        return result

    def generate(self, prompts, sampling, seeds, stop) -> list[Completion]:
        from vllm.inputs import TokensPrompt

        inputs = [TokensPrompt(prompt_token_ids=ids) for ids in prompts]
        params = [self.sampling_params(sampling, s, stop) for s in seeds]
        outs = self.llm.generate(inputs, params, use_tqdm=False)
        result = []
        for ids, out in zip(prompts, outs):
            c = out.outputs[0]
            result.append(Completion(text=c.text, prompt_tokens=len(ids), output_tokens=len(c.token_ids),
                                     finish_reason="length" if c.finish_reason == "length" else "stop"))
        return result
