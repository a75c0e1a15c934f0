"""`executor: ray`: every model stage runs across Ray actors, each owning one engine replica.

The stages do not change: they see one object with the Engine Protocol. `RayReplicas` keeps a tokenizer
on the driver, so prompts are encoded and fitted to the context there exactly as with the local executor,
and splits each call's token ids into contiguous shares, one per replica, which run at the same time: each
replica gets its whole share at once (its engine keeps all of it in flight), and `generate_stream` yields
rows as any replica finishes them (each replica streams its rows back through a Ray generator); `generate`
puts them back in the order of the call. The driver stays the only DuckDB writer, so a killed run
resumes like a local one (a batch in flight is lost, nothing stored is touched). Contiguous chunks keep
prompts that share a prefix (the judge's fixed text, a prompt's samples) on one replica, where prefix
caching pays. Seeds travel per request, so sampled rows do not depend on which replica made them.

Each actor resolves the model path itself: `default` is the shipped model in that node's FACTORY_CACHE
(prepared on first use), and a folder path must exist on every node (a shared filesystem, or the same
copy on each). factory itself must be installed in the same environment on every node.

Models served by `engine: openai` are already remote and stay on the driver.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from factory.config import ModelConfig, RayConfig, SamplingConfig, model_config_from_json
from factory.engines.base import Completion, encode_batch, encode_prompt, in_order, stream_generate
from factory.engines.segments import encode_segments


def connect(cfg: RayConfig, log=lambda m: None) -> None:
    """Join the configured cluster, or start a private Ray instance on this machine (address null)."""
    import ray

    if ray.is_initialized():
        return
    if cfg.address:
        log(f"joining the Ray cluster at {cfg.address}")
        ray.init(address=cfg.address, log_to_driver=False)
    else:  # Ray counts this machine's CPUs and GPUs itself; replicas of every model share them
        log("starting a local Ray instance on this machine")
        ray.init(include_dashboard=False, log_to_driver=False)


class _Replica:
    """One engine in one Ray actor (wrapped with ray.remote in RayReplicas, so ray imports stay lazy)."""

    def __init__(self, cfg_json: str, seed: int, num_cpus: float):
        import os

        from factory.engines.base import create_engine
        from factory.engines.vllm_engine import _on_gpu
        from factory.models import resolve_model

        if not _on_gpu() and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            # vLLM on CPU pins its threads to every core of the node by default, so replicas sharing a node
            # would fight over the same cores; each uses only the CPUs Ray reserved for it instead.
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
            os.environ["OMP_NUM_THREADS"] = str(max(1, int(num_cpus)))
        cfg = model_config_from_json(cfg_json)
        self.engine = create_engine(cfg, str(resolve_model(cfg.path)), seed)

    def describe(self) -> dict:
        return {"name": self.engine.name, "model_id": self.engine.model_id, "tokenizer": self.engine.tokenizer,
                "special_tokens": self.engine.special_tokens}

    def generate_stream(self, prompts, sampling_json: str, seeds, stop) -> Iterator[tuple[int, Completion]]:
        """The engine's stream, as a Ray generator (each row reaches the driver as soon as it is done). A
        `ray.cancel` from the driver only sets a flag on a sync actor's running task: it is checked after each
        row, and stopping closes the engine's stream, which aborts the requests still in flight."""
        import ray

        context = ray.get_runtime_context()
        stream = stream_generate(self.engine, prompts, SamplingConfig.model_validate_json(sampling_json), seeds, stop)
        try:
            for row in stream:
                yield row
                if context.is_canceled():
                    return
        finally:
            stream.close()

    def score_next_token(self, prompts, token_ids) -> list[list[float]]:
        return self.engine.score_next_token(prompts, token_ids)


def split_even(n: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) slices of n items over at most `parts` workers, sizes differing by at most one."""
    parts = max(1, min(parts, n))
    size, extra = divmod(n, parts)
    bounds, start = [], 0
    for i in range(parts):
        end = start + size + (i < extra)
        bounds.append((start, end))
        start = end
    return bounds


class ReplicaError(RuntimeError):
    """A replica died or failed mid-batch; the batch in flight is not stored and a re-run resumes."""


def _replica_error(e: Exception) -> ReplicaError:
    return ReplicaError(f"a Ray engine replica failed ({type(e).__name__}: {str(e).splitlines()[0][:300]}). "
                        "Rows finished so far are stored; run the same command again to resume. If Ray's "
                        "memory monitor killed it, lower ray.replicas or the model's kv_cache_gb.")


def _ray_failures() -> tuple[type[Exception], ...]:
    import ray

    return ray.exceptions.RayActorError, ray.exceptions.RayTaskError, ray.exceptions.ObjectLostError


def _gather(refs) -> list:
    import ray

    try:
        return [x for chunk in ray.get(refs) for x in chunk]
    except _ray_failures() as e:
        raise _replica_error(e) from e


class RayReplicas:
    """The Engine Protocol over `cfg.replicas` actors that each hold the model."""

    def __init__(self, model_cfg: ModelConfig, ray_cfg: RayConfig, seed: int = 0, log=lambda m: None):
        import ray

        connect(ray_cfg, log)
        actor = ray.remote(_Replica).options(num_cpus=ray_cfg.num_cpus, num_gpus=ray_cfg.num_gpus)
        t0 = time.perf_counter()
        self.actors = [actor.remote(model_cfg.model_dump_json(), seed, ray_cfg.num_cpus) for _ in range(ray_cfg.replicas)]
        try:
            # Every replica must load before work is split; a replica that cannot start fails the stage here.
            info = ray.get([a.describe.remote() for a in self.actors], timeout=ray_cfg.startup_timeout_s)[0]
        except ray.exceptions.GetTimeoutError as e:
            self.close()
            raise RuntimeError(
                f"{ray_cfg.replicas} Ray replicas of {model_cfg.path} did not start within {ray_cfg.startup_timeout_s:.0f} s; "
                f"check that the cluster has {ray_cfg.num_cpus} CPUs and {ray_cfg.num_gpus} GPUs free per replica "
                "(`ray status`)") from e
        log(f"{ray_cfg.replicas} Ray replicas ready in {time.perf_counter() - t0:.0f} s")
        self.name = info["name"]  # rows record the engine that made them (vllm, transformers), as locally
        self.model_id = info["model_id"]
        self.tokenizer = info["tokenizer"]
        self.special_tokens = info["special_tokens"]
        self.max_model_len = model_cfg.max_model_len
        self.chat_template_kwargs = dict(model_cfg.chat_template_kwargs)

    def encode(self, prompt) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, self.chat_template_kwargs)

    def encode_batch(self, prompts) -> list[list[int]]:
        return encode_batch(self.tokenizer, prompts, self.chat_template_kwargs)

    def encode_segments(self, prompts) -> list[list[int]]:
        return encode_segments(self.tokenizer, prompts, self.chat_template_kwargs)

    def generate(self, prompts, sampling: SamplingConfig, seeds, stop) -> list[Completion]:
        return in_order(self.generate_stream(prompts, sampling, seeds, stop), len(prompts))

    def generate_stream(self, prompts, sampling: SamplingConfig, seeds, stop) -> Iterator[tuple[int, Completion]]:
        """Each replica streams its contiguous share (`split_even`); rows are yielded from whichever replica has
        one ready (`ray.wait` over the replicas' generators), with their index in `prompts`. Closing the stream
        early cancels the replicas' generators (see `_Replica.generate_stream`)."""
        import ray

        shares = split_even(len(prompts), len(self.actors)) if prompts else []
        streams = [(actor.generate_stream.remote(prompts[a:b], sampling.model_dump_json(), seeds[a:b], stop), a)
                   for actor, (a, b) in zip(self.actors, shares)]
        offset = {id(gen): a for gen, a in streams}
        pending = [gen for gen, _ in streams]
        try:
            while pending:
                ready, _ = ray.wait(pending, num_returns=1)
                for gen in ready:
                    try:
                        i, completion = ray.get(next(gen))
                    except StopIteration:
                        pending.remove(gen)
                        continue
                    except _ray_failures() as e:
                        pending.remove(gen)  # a failed replica's task has nothing left to cancel
                        raise _replica_error(e) from e
                    yield offset[id(gen)] + i, completion
        finally:
            for gen in pending:
                ray.cancel(gen)

    def score_next_token(self, prompts, token_ids) -> list[list[float]]:
        if not prompts:
            return []
        refs = [actor.score_next_token.remote(prompts[a:b], list(token_ids))
                for actor, (a, b) in zip(self.actors, split_even(len(prompts), len(self.actors)))]
        return _gather(refs)

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []
