"""Run records in the store: starting and finishing a run, the rows it wants (`run_rows`), the family of runs it
resumed, which run 'latest' names and the rows a set of runs makes up, and what `factory status` shows (counts per
table and run, live or interrupted runs, per-stage progress and ETA).

`RunRecords` is a mixin of `factory.store.Store`: its methods use the store's connection (`con`, `run_sql`, `query`,
`release`, `count`, `_has`).
"""

from __future__ import annotations

import json
import uuid

import pyarrow as pa

from factory.store_schema import TABLES


class RunRecords:
    """The runs table and what hangs off it; mixed into `Store`."""

    def start_run(self, name: str, kind: str, config: dict, config_path: str | None) -> str:
        """Record a run. Its scope hash (`scope_hash`) ignores settings that do not change what rows it makes
        (SCOPE_IGNORED and the engine knobs beside it), so a resumed run belongs to the same family as the run it
        resumes."""
        from factory import __version__
        from factory.lifetime import process_identity
        from factory.run_scope import scope_hash
        from factory.store import now, row_id  # here, not at the top: factory.store imports this module

        run_id = f"{now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
        cfg_json = json.dumps(config, sort_keys=True)
        me = process_identity()
        self.run_sql(
            "INSERT INTO runs (run_id, name, kind, config_path, config, config_hash, scope_hash, status, "
            "factory_version, started_at, pid, hostname, process_started) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, 'running', ?, ?, ?, ?, ?)",
            [run_id, name, kind, config_path, cfg_json, row_id(cfg_json), scope_hash(kind, config), __version__, now(),
             me["pid"], me["hostname"], me["process_started"]])
        self.release()
        return run_id

    def run_family(self, run_id: str) -> list[str]:
        """This run and the earlier runs of the same pipeline it resumed or repeated: together they wrote
        every row of its pipeline (a resumed run writes only what was missing)."""
        return [r[0] for r in self.run_sql(
            """SELECT r.run_id FROM runs r, runs me WHERE me.run_id = ? AND r.scope_hash = me.scope_hash
               AND r.started_at <= me.started_at ORDER BY r.started_at""", [run_id])]

    def finish_run(self, run_id: str, status: str, message: str = "", stats: dict | None = None):
        from factory.store import now  # here, not at the top: factory.store imports this module

        self.run_sql("UPDATE runs SET status=?, message=?, stats=?, finished_at=? WHERE run_id=?",
                         [status, message, json.dumps(stats or {}), now(), run_id])
        self.release()

    def add_members(self, run_id: str, table: str, ids) -> None:
        """Record that run `run_id` wants these rows of `table` (a list or an Arrow array of ids)."""
        if len(ids) == 0:
            return
        self.con.register("_members", pa.table({"id": ids}))
        try:
            self.run_sql("INSERT INTO run_rows SELECT ?, ?, id FROM _members", [run_id, table])
        finally:
            self.con.unregister("_members")

    def resolve_run(self, run: str, kind: str | None = None) -> str:
        """A run id from a run id or 'latest': the latest run of `kind` (e.g. 'pipeline': export, publish and
        training data want the latest pipeline run, not a later train or eval run), or of any kind."""
        if run == "latest":
            rows = self.run_sql("SELECT run_id FROM runs WHERE ? IS NULL OR kind = ? ORDER BY started_at DESC LIMIT 1",
                                [kind, kind])
            if not rows:
                if kind == "pipeline":
                    raise ValueError(f"store {self.path} has no pipeline runs yet: run a pipeline first (factory run "
                                     "pipelines/quickstart.yaml), or name a run with --run (factory status lists them)")
                raise ValueError(f"store {self.path} has no {kind + ' ' if kind else ''}runs yet")
            return rows[0][0]
        if not self.run_sql("SELECT 1 FROM runs WHERE run_id=?", [run]):
            raise ValueError(f"run {run!r} not found in {self.path}; `factory status` lists the runs")
        return run

    def has_members(self, run_id: str) -> bool:
        """Whether the run's membership is recorded in run_rows (stores written before run_rows have none)."""
        return self._has("run_rows") and bool(self.run_sql("SELECT 1 FROM run_rows WHERE run_id = ? LIMIT 1", [run_id]))

    def run_scope(self, runs: list[str], kind: str | None = "pipeline"):
        """The rows of `runs` (run ids or 'latest', the latest run of `kind`); see factory.run_scope.RunScope. No
        runs: every row."""
        from factory.run_scope import RunScope

        resolved = list(dict.fromkeys(self.resolve_run(r, kind) for r in runs))
        members = [r for r in resolved if self.has_members(r)]
        families = list(dict.fromkeys(f for r in resolved if r not in members for f in self.run_family(r)))
        return RunScope(resolved, members, families)

    def status(self) -> dict:
        """Counts per table and per run (rows written by that run), the runs themselves (a `running` run whose
        process is gone shows as `interrupted`), and per-stage progress of the latest run (or the running ones)."""
        from factory.lifetime import process_alive

        counts = {t: self.count(t) for t in TABLES}
        per_run = {}
        for t in TABLES:
            status_col = "NULL" if t in ("prompts", "preference_pairs", "comparisons") else "status"
            for run_id, status, n in self.run_sql(f"SELECT run_id, {status_col}, count(*) FROM {t} GROUP BY ALL"):
                per_run.setdefault(run_id, {}).setdefault(t, {})[status or "ok"] = n
        who = "pid, hostname, process_started" if self._has("runs", "pid") else \
            "NULL AS pid, NULL AS hostname, NULL AS process_started"
        runs = self.query(f"SELECT run_id, name, kind, status, message, started_at, finished_at, {who} FROM runs "
                          "ORDER BY started_at")
        for r in runs:
            if r["status"] == "running":
                alive = process_alive(r["pid"], r["hostname"], r["process_started"])
                if alive is False:
                    r["status"] = "interrupted"
                    r["message"] = f"its process ({r['pid']} on {r['hostname']}) is gone; run again to resume"
        watched = [r for r in runs if r["status"] == "running"] or runs[-1:]
        progress = {r["run_id"]: self.run_progress(r["run_id"], r["status"] == "running") for r in watched}
        return {"path": str(self.path), "counts": counts, "per_run": per_run, "runs": runs, "progress": progress}

    def run_progress(self, run_id: str, running: bool = False) -> list[dict]:
        """Per stage of a run, in the order they started: done, pending, rows/s (rows done over the stage's wall
        seconds so far) and, for a running run, an ETA in seconds at that rate."""
        if not self._has("run_progress"):
            return []
        out = []
        for p in self.query("SELECT * FROM run_progress WHERE run_id = ? ORDER BY started_at, stage", [run_id]):
            pending = max(0, (p["wanted"] or 0) - (p["done"] or 0))
            rate = p["done"] / p["seconds"] if p["seconds"] and p["done"] else None
            eta = (pending / rate if rate else None) if running else None
            out.append({"stage": p["stage"], "model": p["model_id"], "done": p["done"], "pending": pending,
                        "wanted": p["wanted"], "stored_before": p["stored_before"], "seconds": p["seconds"],
                        "rows_per_s": rate, "eta_s": 0.0 if running and pending == 0 else eta,
                        "updated_at": p["updated_at"]})
        return out
