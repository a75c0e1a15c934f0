"""vLLM offline engine: one `LLM` with prefix caching on; every call's prompts are in flight in vLLM at once, and
finished completions come back as they finish (`generate_stream`), so no row waits for the slowest of its batch.

vLLM starts its engine core in a spawned process, so code that builds this engine must run under
`if __name__ == "__main__":` or from an installed entry point (the `factory` command is one).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from factory.config import SamplingConfig, VLLMModelConfig
from factory.model_info import control_strings
from factory.engines.base import Completion, encode_batch, encode_prompt, free_memory, in_order
from factory.engines.segments import encode_segments


def _on_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def vllm_kwargs(cfg: VLLMModelConfig, model_dir: str, seed: int, gpu: bool) -> dict:
    """The keyword arguments of `vllm.LLM`: factory's own settings, then the section's `engine_args` (whose
    names were checked when the config loaded; they may override enforce_eager, never factory's own)."""
    kwargs = dict(
        model=model_dir, tokenizer=model_dir, dtype=cfg.dtype, max_model_len=cfg.max_model_len,
        seed=seed, trust_remote_code=cfg.trust_remote_code, enable_prefix_caching=cfg.enable_prefix_caching,
        tensor_parallel_size=cfg.tensor_parallel_size,
    )
    if gpu:
        kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
    else:
        kwargs["enforce_eager"] = True  # CUDA graphs do not exist on CPU; compilation only costs start-up
    kwargs.update(cfg.engine_args)
    return kwargs


class VLLMEngine:
    name = "vllm"

    def __init__(self, cfg: VLLMModelConfig, model_dir: str, seed: int = 0):
        # vLLM logs to stdout at INFO; keep the CLI's output readable unless the user asked for more.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        gpu = _on_gpu()
        if not gpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(cfg.kv_cache_gb))))
        from vllm import LLM

        from factory.lifetime import engine_core_dies_with_parent

        with engine_core_dies_with_parent():  # a killed run leaves no engine-core process behind
            self.llm = LLM(**vllm_kwargs(cfg, model_dir, seed, gpu))
        self.tokenizer = self.llm.get_tokenizer()
        self.model_id = model_dir
        self.max_model_len = cfg.max_model_len
        self.chat_template_kwargs = dict(cfg.chat_template_kwargs)
        self.special_tokens = control_strings(self.tokenizer)
        self._streams = 0  # generate_stream calls so far: a prefix that keeps request ids unique across calls
        self._open_stream = False

    def encode(self, prompt) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, self.chat_template_kwargs)

    def encode_batch(self, prompts) -> list[list[int]]:
        return encode_batch(self.tokenizer, prompts, self.chat_template_kwargs)

    def encode_segments(self, prompts) -> list[list[int]]:
        return encode_segments(self.tokenizer, prompts, self.chat_template_kwargs)

    def sampling_params(self, sampling: SamplingConfig, seed: int, stop: list[str]):
        from vllm import SamplingParams

        return SamplingParams(
            temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
            max_tokens=sampling.max_tokens, min_tokens=sampling.min_tokens, stop=stop or None,
            repetition_penalty=sampling.repetition_penalty,
            seed=seed if sampling.temperature > 0 else None, skip_special_tokens=True,
        )

    def score_next_token(self, prompts, token_ids) -> list[list[float]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._check_no_open_stream()
        params = SamplingParams(temperature=0.0, max_tokens=1, logprob_token_ids=list(token_ids), detokenize=False)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], params, use_tqdm=False)
        result = []
        for out in outs:
            step = out.outputs[0].logprobs[0]
            result.append([float(step[t].logprob) for t in token_ids])
        return result

    def generate(self, prompts, sampling, seeds, stop) -> list[Completion]:
        return in_order(self.generate_stream(prompts, sampling, seeds, stop), len(prompts))

    def generate_stream(self, prompts, sampling, seeds, stop) -> Iterator[tuple[int, Completion]]:
        """Every prompt into vLLM's engine at once, then `(index, completion)` for each request as it finishes.

        This is `LLM.generate` taken apart (vLLM 0.32, V1 engine): the prompts are rendered by the LLM's own
        `_preprocess_cmpl` (what `generate` does with them), added with `llm_engine.add_request` under request ids
        of our own (`LLM.enqueue` returns vLLM's internal ids, while outputs carry the external ones), each with
        `output_kind=FINAL_ONLY` as `generate` sets it, and `llm_engine.step()` is called until all are finished;
        each finished output is yielded at once instead of being held until the last one. vLLM's scheduler
        keeps its running batch full from the waiting requests, so a slow row holds up nothing but itself.

        When the generator is closed before the end (or raises), the requests not yet yielded are aborted
        (`llm_engine.abort_request`), so the next call starts on an idle engine; outputs of aborted requests
        still in transit are dropped by vLLM's output processor. Only one stream may be open at a time: `step`
        advances every request in the engine, so a second caller would receive (and lose) the first's rows.
        """
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        self._check_no_open_stream()
        self._open_stream, self._streams = True, self._streams + 1
        engine, pending = self.llm.llm_engine, {}
        try:
            rendered = self.llm._preprocess_cmpl([TokensPrompt(prompt_token_ids=ids) for ids in prompts])
            for i, (engine_input, seed) in enumerate(zip(rendered, seeds, strict=True)):
                params = self.sampling_params(sampling, seed, stop)
                params.output_kind = RequestOutputKind.FINAL_ONLY
                request_id = f"factory-{self._streams}-{i}"
                engine.add_request(request_id, engine_input, params)
                pending[request_id] = i
            while pending:
                if not engine.has_unfinished_requests():
                    raise RuntimeError(f"vLLM has no unfinished requests but {len(pending)} never finished")
                for out in engine.step():
                    if out.finished and out.request_id in pending:
                        i = pending.pop(out.request_id)
                        yield i, self._completion(prompts[i], out)
        finally:
            if pending:
                engine.abort_request(list(pending))
            self._open_stream = False

    @staticmethod
    def _completion(prompt_ids: list[int], out) -> Completion:
        c = out.outputs[0]
        return Completion(text=c.text, prompt_tokens=len(prompt_ids), output_tokens=len(c.token_ids),
                          finish_reason="length" if c.finish_reason == "length" else "stop")

    def _check_no_open_stream(self) -> None:
        if self._open_stream:
            raise RuntimeError("a generate_stream is still open on this vLLM engine: finish or close it first")

    def close(self) -> None:
        """Shut the engine down and return its memory; the engine cannot be used afterwards. Idempotent.

        vLLM 0.32's `LLM` has no public shutdown: its engine core client has one
        (`llm.llm_engine.engine_core.shutdown()`: MPClient stops the engine-core process, which holds the
        weights and the KV cache, and closes its sockets; InprocClient shuts the in-process core down).
        Then the `LLM` is dropped and collected. An in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0) also
        set up vLLM's distributed state in this process, which the next engine would trip over:
        `cleanup_dist_env_and_memory` (what vLLM's own tests call between engines) tears that down. Last,
        on GPU, the CUDA caching allocator gives its free blocks back (`torch.cuda.empty_cache()`).
        """
        import contextlib
        import gc

        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        in_process = core is not None and type(core).__name__ == "InprocClient"
        manager = getattr(getattr(core, "resources", None), "engine_manager", None)
        procs = list(getattr(manager, "processes", None) or [])
        if core is not None:
            with contextlib.suppress(Exception):  # a core that already died has nothing left to stop
                core.shutdown()
        for proc in procs:  # vLLM SIGKILLs a core that outlives its grace period and does not wait for it:
            with contextlib.suppress(Exception):  # reap it here, or it lingers as a zombie until the next engine
                proc.join(timeout=30)
        del llm, core, manager, procs
        gc.collect()
        if in_process:
            with contextlib.suppress(Exception):
                from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

                cleanup_dist_env_and_memory()
        free_memory()

