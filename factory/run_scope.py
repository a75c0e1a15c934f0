"""Which rows make up a run: the scope hash that groups the runs of one pipeline into a family, and `RunScope`, the
one SQL predicate per table that export, publish and training data use for "run X's rows"."""

from __future__ import annotations

from dataclasses import dataclass

from factory.store import ID_COLUMN, row_id

# ---- scope hash: which settings make two runs the same pipeline ----------------------------------------------
# A run's scope hash (`start_run`) groups the runs of one pipeline into a family (`run_family`), which is how a
# store written before `run_rows` existed finds a run's rows. Settings that change how fast, where or with how
# much memory a run makes its rows, but not which rows it makes (row ids hash the model fingerprint, sampling,
# template, seed, never these), are left out, so a run resumed with more GPUs, another batch size or a budget is
# the same family. Anything not listed here counts (max_model_len does: it decides which prompts are skipped).
SCOPE_IGNORED = frozenset({
    "name",                 # a label
    "store",                # the file this very run is recorded in
    "budget",               # when the run stops, not what a finished row is
    "write_batch_size",     # finished rows per store transaction
    "chunk_size",           # input rows read and kept in flight at a time
    "executor", "ray",      # local or Ray replicas (replicas, CPUs/GPUs per replica, address, startup timeout)
    "keep_engines_loaded",  # engine residency between stages: memory only
    "decontamination",      # checks the rows after they are made; its stage records its own definition
})
# Keys of a model section (a mapping with an `engine` key: pipeline models.policy / models.judge, eval's
# policy / reference / judge) that are memory, parallelism or throughput knobs (factory/config.py).
SCOPE_IGNORED_MODEL_KEYS = {
    "vllm": frozenset({"gpu_memory_utilization", "kv_cache_gb", "tensor_parallel_size", "enable_prefix_caching",
                       "gpu_hour"}),  # gpu_hour / price: the cost ledger's prices, not what a row is
    "transformers": frozenset({"batch_size", "gpu_hour"}),
    "openai": frozenset({"concurrency", "timeout_s", "max_retries", "api_key_env", "price"}),
}
# vLLM `engine_args` that only schedule, place or size things. Others (quantization, kv_cache_dtype, ...) change
# the outputs and stay in the scope.
SCOPE_IGNORED_ENGINE_ARGS = frozenset({
    "swap_space", "cpu_offload_gb", "kv_cache_memory_bytes", "num_gpu_blocks_override", "block_size",  # memory
    "pipeline_parallel_size", "data_parallel_size", "distributed_executor_backend",  # parallelism
    "disable_custom_all_reduce", "max_parallel_loading_workers",
    "max_num_seqs", "max_num_batched_tokens", "enable_chunked_prefill", "enforce_eager",  # scheduling, compilation
    "max_seq_len_to_capture", "cuda_graph_sizes", "compilation_config", "disable_log_stats",
})
SCOPE_RULE = "2"  # bump when the rule above changes: stores opened for writing rehash their runs (`migrate`)


def _scope_of(value):
    """A config (or part of one) without the settings above; nested model sections are stripped too."""
    if isinstance(value, dict):
        ignored = SCOPE_IGNORED_MODEL_KEYS.get(value.get("engine"), frozenset()) if isinstance(
            value.get("engine"), str) else frozenset()
        out = {}
        for k, v in value.items():
            if k in ignored:
                continue
            if k == "engine_args" and isinstance(v, dict) and ignored:
                v = {a: x for a, x in v.items() if a not in SCOPE_IGNORED_ENGINE_ARGS}
            out[k] = _scope_of(v)
        return out
    if isinstance(value, list):
        return [_scope_of(v) for v in value]
    return value


def scope_hash(kind: str, config: dict) -> str:
    """The scope hash of a run of `kind` with `config`: equal for runs that make the same rows."""
    return row_id(kind, _scope_of({k: v for k, v in config.items() if k not in SCOPE_IGNORED}))


@dataclass
class RunScope:
    """The rows that make up some runs, as one SQL predicate per table (`sql`): the one place that says what
    "run X's rows" means, for export, publish and training data.

    A run whose membership is recorded (`run_rows`, written by its stages) has exactly the ids it recorded, whoever
    wrote them. A run from a store written before `run_rows` existed has none recorded; it falls back to the rows
    written by its family (itself and the earlier runs of the same scope hash it resumed or repeated)."""

    runs: list[str]      # the resolved runs asked for; empty: no filter (every row)
    members: list[str]   # those whose membership is in run_rows
    families: list[str]  # the others, with their families (`Store.run_family`)

    @staticmethod
    def _list(ids: list[str]) -> str:
        return "[" + ", ".join("'" + i.replace("'", "''") + "'" for i in ids) + "]::VARCHAR[]"

    def sql(self, table: str, alias: str) -> str:
        """A predicate on `table AS alias`: the row belongs to one of the runs (TRUE when no run is named)."""
        if not self.runs:
            return "TRUE"
        parts = []
        if self.members:
            parts.append(f"{alias}.{ID_COLUMN[table]} IN (SELECT id FROM run_rows WHERE tbl = '{table}' "
                         f"AND list_contains({self._list(self.members)}, run_id))")
        if self.families:
            parts.append(self.family_sql(alias))
        return "(" + " OR ".join(parts) + ")"

    def family_sql(self, alias: str) -> str:
        """The fallback part alone: the row was written by a family run (FALSE when every run has membership)."""
        return f"list_contains({self._list(self.families)}, {alias}.run_id)" if self.families else "FALSE"
