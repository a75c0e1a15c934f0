"""Run a pipeline config end to end: prompts -> generate -> (critique -> revise) x rounds -> pairs.

The store is the only hand-off between stages; this module only wires them together, creates engines
lazily (a finished pipeline starts no engine and makes no model calls) and records the run.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from factory import calibrate
from factory.config import ConfigError, ModelConfig, PipelineConfig, RayConfig
from factory.constitution import load_constitution
from factory.engines.base import Engine, create_engine
from factory.judge import ANSWER_CUE
from factory.model_info import ModelInfo, check_chat_template, check_judge_answers, load_model_info
from factory.models import resolve_model
from factory.prompts import stage_prompts
from factory.report import build_report, save_report
from factory.stages import critique as critique_stage, decontaminate as decontaminate_stage, \
    generate as generate_stage, label as label_stage, pairs as pairs_stage, reuse, revise as revise_stage
from factory.stages.common import BudgetExhausted, Context, model_label
from factory.store import ID_COLUMN, Store


@dataclass
class RunResult:
    run_id: str
    status: str  # completed | budget_exhausted | failed
    message: str
    store_path: str
    stats: dict = field(default_factory=dict)
    scope_counts: dict = field(default_factory=dict)
    pair_counts: dict = field(default_factory=dict)
    example_pair: dict | None = None
    judge_report: dict | None = None
    seconds: float = 0.0
    gate: dict | None = None  # label.gate's verdict: {"line", "failed", "calibration"} (factory/calibrate.py)
    calibration: dict | None = None  # the latest calibration of the run's judge, if one is stored
    cost: dict | None = None  # factory.cost.run_cost: per stage and per kept pair (also in runs.stats['cost'])
    contamination: dict = field(default_factory=dict)  # factory.decontam.counts: per benchmark


class Engines:
    """Creates each model's engine on first use and shares one engine when policy and judge are the same.
    With a Ray config, vllm and transformers models run as Ray replicas (factory/engines/ray_replicas.py).

    One engine at a time (DESIGN.md, "Models: identity and lifecycle"): asking for a model that is not resident
    closes the resident engine first, so a 7B policy and a 70B judge run on GPUs that hold the 70B alone. The
    pipeline's order (generate with the policy, then critique / revise / label with the judge) starts each model
    once. A Ray pool counts as one engine. An `openai` engine (an HTTP client) holds no memory: it neither
    releases others nor is released. `keep_loaded=True` (pipeline `keep_engines_loaded`, or a caller sharing
    engines across runs, as the test session does) keeps every engine until `close()`."""

    def __init__(self, seed: int, log, ray: RayConfig | None = None, keep_loaded: bool = False):
        self.seed, self.log, self.ray, self.keep_loaded, self._made = seed, log, ray, keep_loaded, {}
        self.started: dict[str, int] = {}  # engines started per model config (a normal run starts each once)
        self._labels: dict[str, str] = {}  # model config key -> the model's name, for the log
        self._pools: set[str] = set()  # model config keys whose engine is a pool of Ray replicas

    @staticmethod
    def _holds_memory(engine) -> bool:
        return getattr(engine, "name", None) != "openai"

    def _release_resident(self, keep: str) -> None:
        for key, engine in list(self._made.items()):
            if key != keep and self._holds_memory(engine):
                del self._made[key]
                if hasattr(engine, "close"):
                    engine.close()
                pool = f" ({self.ray.replicas} Ray replicas)" if key in self._pools else ""
                self.log(f"released the {getattr(engine, 'name', 'model')} engine for "
                         f"{self._labels.get(key, 'a model')}{pool}")

    def getter(self, cfg: ModelConfig):
        def get() -> Engine:
            key = cfg.model_dump_json()
            if key not in self._made:
                if not self.keep_loaded and cfg.engine != "openai":
                    self._release_resident(key)
                again = " again (it was released earlier in this run)" if self.started.get(key) else ""
                if self.ray is not None and cfg.engine != "openai":
                    from factory.engines.ray_replicas import RayReplicas

                    self.log(f"starting {self.ray.replicas} Ray replicas of the {cfg.engine} engine for "
                             f"{model_label(cfg)}{again}")
                    self._made[key] = RayReplicas(cfg, self.ray, self.seed, self.log)
                    self._pools.add(key)
                else:
                    path = resolve_model(cfg.path)
                    self.log(f"starting {cfg.engine} engine for {model_label(cfg)} ({path}){again}")
                    self._made[key] = create_engine(cfg, str(path), self.seed)
                self.started[key] = self.started.get(key, 0) + 1
                self._labels[key] = model_label(cfg)
            return self._made[key]
        return get

    def close(self) -> None:
        """Release every engine: Ray actors, engine-core processes, model memory, HTTP clients."""
        made, self._made = list(self._made.values()), {}
        for engine in made:
            if hasattr(engine, "close"):
                engine.close()


def check_inputs(cfg: PipelineConfig) -> None:
    """Fail before touching the store when a model path is wrong (bad input exits 2)."""
    for role, m in (("policy", cfg.models.policy), ("judge", cfg.judge)):
        if m.engine == "openai" and not m.base_url:
            raise ConfigError(f"models.{role}.base_url is required for engine 'openai' (e.g. http://127.0.0.1:8000/v1)")
        if m.path not in ("default", "gemma-3-270m"):
            p = Path(m.path).expanduser()
            if not (p / "config.json").is_file():
                raise ConfigError(f"models.{role}.path: {m.path!r} is not a local model folder with config.json "
                                  "(use 'default' for the shipped model; factory never downloads at run time)")


def check_models(cfg: PipelineConfig) -> dict[str, ModelInfo]:
    """Load each model's tokenizer and fingerprint and check what the run will ask of it, before the store is
    touched or an engine starts: a chat template for prompt_format 'chat', answer tokens the log-prob judge
    can score. Bad input is a ConfigError (exit 2) naming the model and the fix."""
    check_inputs(cfg)
    calibrate.check_config(cfg)  # the gate's gold file loads, before any model does
    infos = {"policy": load_model_info(cfg.models.policy, "policy")}
    infos["judge"] = infos["policy"] if cfg.judge == cfg.models.policy else load_model_info(cfg.judge, "judge")
    for role, m in (("policy", cfg.models.policy), ("judge", cfg.judge)):
        check_chat_template(infos[role], m.prompt_format)
    if cfg.label.enabled and cfg.label.mode in ("logprob", "cot"):
        check_judge_answers(infos["judge"], ANSWER_CUE, f"label.mode {cfg.label.mode}")
    return infos


def run_pipeline(cfg: PipelineConfig, config_path: str | None = None, progress=None, log=lambda m: None,
                 engines: Engines | None = None) -> RunResult:
    """Run every stage; `engines` lets a caller (tests, notebooks) share started engines across runs."""
    from factory.decontam import check_benchmarks

    check_benchmarks(cfg.decontamination)  # a missing benchmark file or column fails before any model loads
    infos = check_models(cfg)
    constitution = load_constitution(cfg.constitution)
    staged = tempfile.TemporaryDirectory(prefix="factory-prompts-")
    try:
        prompts = Path(staged.name) / "prompts.parquet"
        stage_prompts(cfg.prompts, prompts)  # bad input fails here, before the store is touched
        return _run(cfg, config_path, engines, progress, log, infos, constitution, prompts)
    finally:
        staged.cleanup()


def _run(cfg, config_path, engines, progress, log, infos, constitution, prompts: Path,
         kind: str = "pipeline") -> RunResult:
    """Every stage over the staged prompts, recorded as a run of `kind` (`pipeline`, or `estimate` for the sample of
    `factory run --estimate`, which `latest` in export, publish and training never picks)."""
    from factory import decontam
    from factory.cost import run_cost

    t0 = time.perf_counter()
    with Store.open(cfg.store) as store:
        run_id = store.start_run(cfg.name, kind, cfg.model_dump(mode="json"), config_path)
        ctx = Context(store=store, run_id=run_id, seed=cfg.seed, write_batch_size=cfg.write_batch_size,
                      chunk_size=cfg.chunk_size, max_output_tokens=cfg.budget.max_output_tokens, progress=progress, log=log)
        own_engines = engines is None  # ours to release at the end: Ray actors would keep their CPUs/GPUs
        engines = engines or Engines(cfg.seed, log, cfg.ray if cfg.executor == "ray" else None,
                                      keep_loaded=cfg.keep_engines_loaded)
        status, message = "completed", ""
        pair_counts: dict[str, int] = {}
        judge_report: dict | None = None
        gate_verdict = calibration = None
        try:
            add_prompts(store, run_id, prompts)  # the stages read them page by page from the store
            policy, judge = engines.getter(cfg.models.policy), engines.getter(cfg.judge)

            def stage(module, fn, define: dict | None = None, **params):
                """Run a stage, or adopt the rows of an earlier run that finished it on the same inputs. `define`:
                more of the stage's definition that the config does not hold (the gate's gold file content)."""
                spec = module.SPEC
                reuse.run_stage(ctx, spec, reuse.definition(cfg, infos, constitution, spec.name, **params,
                                                            **(define or {})), params, fn)

            stage(generate_stage, lambda: generate_stage.generate(ctx, cfg, policy, infos["policy"]))
            for r in range(1, cfg.critique.rounds + 1):
                stage(critique_stage, lambda: critique_stage.critique(ctx, cfg, constitution, r, judge, infos["judge"]),
                      round=r)
                stage(revise_stage, lambda: revise_stage.revise(ctx, cfg, constitution, r, judge, infos["judge"]),
                      round=r)
            stage(pairs_stage, lambda: pairs_stage.build_pairs(ctx, cfg))
            pair_counts = pair_counts_of(store, run_id, ai=False)
            if cfg.label.enabled:
                gate = cfg.label.gate
                stage(label_stage, lambda: label_stage.label(ctx, cfg, constitution, judge, infos["judge"]),
                      define={"gate_gold": calibration_gold_hash(gate.gold)} if gate else None)
                ai_counts = pair_counts_of(store, run_id, ai=True)
                judge_report = build_report(store, run_id, ai_counts)
                gate_verdict = calibrate.gate_summary(store, cfg, constitution, infos["judge"], ai_counts)
                if gate_verdict:
                    judge_report["gate"] = {"line": gate_verdict["line"], "failed": gate_verdict["failed"],
                                            "calibration_id": gate_verdict["calibration"]["calibration_id"]}
                calibration = (gate_verdict or {}).get("calibration") or calibrate.latest(store, infos["judge"].label)
                save_report(store, run_id, judge_report)
            if cfg.decontamination.benchmarks:  # after the label stage: every text a pair can hold is stored
                decontaminate_stage.decontaminate(ctx, cfg.decontamination)
        except BudgetExhausted as e:
            status = "budget_exhausted"
            message = (f"{e}. Everything finished so far is stored; run the same command again to resume "
                       f"(raise or remove budget.max_output_tokens, e.g. --set budget.max_output_tokens=null).")
        except KeyboardInterrupt:
            store.finish_run(run_id, "interrupted", "stopped by the user; run again to resume", _stats(ctx))
            raise
        except Exception as e:
            store.finish_run(run_id, "failed", f"{type(e).__name__}: {e}", _stats(ctx))
            raise
        finally:
            if own_engines:
                engines.close()
        stats = _stats(ctx)
        cost = run_cost(store, run_id)
        store.finish_run(run_id, status, message, {**stats, "cost": cost})
        return RunResult(run_id=run_id, status=status, message=message, store_path=str(cfg.store), stats=stats,
                         scope_counts=_scope_counts(store, run_id), pair_counts=pair_counts,
                         example_pair=_example_pair(store, run_id), judge_report=judge_report,
                         seconds=time.perf_counter() - t0, gate=gate_verdict, calibration=calibration, cost=cost,
                         contamination=decontam.counts(store, run_id))


def calibration_gold_hash(path: str) -> str:
    """The gate's gold file content, part of the label stage's definition: an edited gold set re-runs the stage."""
    from factory.calibration import gold_sha256

    return gold_sha256(path)


def _stats(ctx: Context) -> dict:
    return {f"{stage}|{model}": vars(s) for (stage, model), s in ctx.stats.items()}


def add_prompts(store: Store, run_id: str, staged: Path) -> None:
    """Store the run's prompts from `staged` (the Parquet file `factory.prompts.stage_prompts` wrote; a prompt
    stored before is kept as it is) and record them as the run's, in SQL: DuckDB sorts them (spilling to disk if
    it must), and they are inserted in prompt-id order, the order every stage reads them in (`store.within`)."""
    src = "read_parquet('" + str(staged).replace("'", "''") + "')"
    store.run_sql("BEGIN")
    try:
        store.run_sql(f"INSERT INTO run_rows SELECT ?, 'prompts', prompt_id FROM {src} ORDER BY prompt_id", [run_id])
        store.run_sql(f"INSERT OR IGNORE INTO prompts BY NAME SELECT *, ? AS run_id FROM {src} ORDER BY prompt_id",
                      [run_id])
        store.run_sql("COMMIT")
    except Exception:
        store.run_sql("ROLLBACK")
        raise
    store.release()


def pair_counts_of(store: Store, run_id: str, ai: bool) -> dict[str, int]:
    """The run's pairs (AI-feedback ones, or the revision pairs): kept, and each drop reason (SQL; the same counts
    the stage returns, also when its rows were adopted from an earlier run)."""
    rows = store.run_sql(f"""SELECT coalesce(p.dropped_reason, 'kept'), count(*) FROM preference_pairs p SEMI JOIN
                             (SELECT id FROM run_rows WHERE run_id = ? AND tbl = 'preference_pairs') m ON m.id = p.pair_id
                             WHERE p.source {'=' if ai else '<>'} 'ai_feedback' GROUP BY ALL ORDER BY ALL""", [run_id])
    return {"kept": 0, **dict(rows)}


def _scope_counts(store: Store, run_id: str) -> dict:
    """The run's rows per table and status (all of them, finished in this run or before), counted in SQL."""
    out = {}
    for table in ("prompts", "responses", "critiques", "revisions"):
        status = "'ok'" if table == "prompts" else "t.status"
        rows = store.run_sql(f"""SELECT {status}, count(*) FROM {table} t SEMI JOIN
                                 (SELECT id FROM run_rows WHERE run_id = ? AND tbl = ?) m ON m.id = t.{ID_COLUMN[table]}
                                 GROUP BY ALL ORDER BY ALL""", [run_id, table])
        out[table] = dict(rows)
    return out


def _example_pair(store: Store, run_id: str) -> dict | None:
    # The pair first, then its prompt: a join of every pair with `prompts` (texts and all) would hold a hash table
    # of a million prompts for one row.
    rows = store.query("""WITH pick AS MATERIALIZED (
                              SELECT pp.prompt_id, pp.chosen_text, pp.rejected_text, pp.principle_id
                              FROM preference_pairs pp SEMI JOIN (SELECT id FROM run_rows WHERE run_id = ?
                              AND tbl = 'preference_pairs') m ON m.id = pp.pair_id
                              WHERE pp.dropped_reason IS NULL AND pp.source <> 'ai_feedback'
                              ORDER BY pp.pair_id LIMIT 1)
                          SELECT p.text AS prompt, pick.chosen_text, pick.rejected_text, pick.principle_id
                          FROM pick JOIN prompts p USING (prompt_id)""", [run_id])
    return rows[0] if rows else None
