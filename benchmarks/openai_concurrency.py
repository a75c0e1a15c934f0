"""Throughput of the OpenAI-compatible engine against a real local `vllm serve`, at several concurrencies (issue 11).

factory's `OpenAIEngine` (factory/engines/openai_engine.py) tokenizes prompts locally, sends them as token ids to
/v1/completions, one request per prompt, with `concurrency` requests in flight (default 64; it was 8). Against
`vllm serve` the requests in flight are the server's running batch, so this measures what the setting buys. One run:
  * starts `python -m vllm.entrypoints.openai.api_server` on 127.0.0.1 with the shipped Gemma 3 270M (or --model),
    local files only, the same command and environment as tests/integration/test_openai_engine.py, plus
    VLLM_SERVER_DEV_MODE=1 for its /reset_prefix_cache endpoint; the server runs in its own process group and the
    whole group (API server and EngineCore) is killed at the end, also on an error or Ctrl-C;
  * builds N prompts as the generate stage renders them (templates.plain_generate over benchmarks/scale.py's
    `synthetic_prompts`: 10-60 words, one in five a conversation) and tokenizes them with the engine's encode_batch;
  * sends a few untimed warm-up requests (other prompts), then times `OpenAIEngine.generate_stream` over all N
    prompts once per concurrency (default 1, 8, 64; one engine, i.e. one HTTP connection pool, per concurrency),
    greedy, max_tokens 32, the stage's stop strings (templates.PLAIN_STOPS); with --repeats the order of the
    concurrencies rotates from pass to pass, so slow drift in machine load does not favour one of them;
  * with --offline, after the server is stopped, the same prompts through factory's offline VLLMEngine (one `LLM`
    in this process, all prompts at once through `generate_stream`) for reference.

Prefix caching stays on (vLLM's default for `vllm serve`, and factory's): every prompt shares the few-shot preamble,
which a real run reuses too. The server's prefix cache is emptied (POST /reset_prefix_cache, untimed) before every
timed pass, so each pass starts as cold as the first and the order of the passes does not matter; --no-prefix-caching
starts the server with caching off instead.

Printed per concurrency: wall seconds, rows/s, output tokens/s (the server's usage.completion_tokens), rows/s as a
ratio to concurrency 8 (the old default; --baseline), CPU seconds per wall second used by the server's processes
(API server + EngineCore) and by this client process (tokenizer, HTTP threads, JSON) during the pass, and how many
texts differ from the baseline's at temperature 0. A few differing texts are a numerics note, not a bug: a different
batch composition changes the order of floating-point sums, which can flip a greedy choice between near-tied tokens.
On a CPU server the rows/s ceiling is the cores: once the server's CPU use is at the number of cores, more requests
in flight cannot add throughput (on a GPU server, more in flight is what fills the batch).

Run from the repository root:
    PYTHONPATH=. .venv/bin/python benchmarks/openai_concurrency.py [--prompts 256] [--max-tokens 32]
        [--concurrency 1 8 64] [--repeats 1] [--offline] [--kv-cache-gb 1] [--no-prefix-caching] [--model DIR]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`vllm serve` on 127.0.0.1 in its own process group (see tests/integration/test_openai_engine.py)."""

    def __init__(self, model_dir: Path, port: int, kv_cache_gb: int, prefix_caching: bool, log_path: Path):
        self.model_dir, self.port, self.kv_cache_gb = model_dir, port, kv_cache_gb
        self.prefix_caching, self.log_path, self.proc = prefix_caching, log_path, None

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 600) -> Server:
        import httpx

        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gb), "VLLM_LOGGING_LEVEL": "WARNING",
               "VLLM_SERVER_DEV_MODE": "1"}  # dev mode: POST /reset_prefix_cache
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir),
               "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32", "--max-model-len", "1024",
               "--enforce-eager", "--seed", "0"]
        if not self.prefix_caching:
            cmd.append("--no-enable-prefix-caching")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)  # its own group: stop() also ends the EngineCore
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited during start-up; its log:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.root}/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(1)
        raise RuntimeError(f"vllm serve did not become ready in {timeout_s:.0f} s; its log:\n{self.log_tail()}")

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def reset_prefix_cache(self) -> None:
        import httpx

        for _ in range(50):  # refused while blocks are still held by requests finishing
            r = httpx.post(f"{self.root}/reset_prefix_cache", timeout=30)
            r.raise_for_status()
            if r.json().get("success"):
                return
            time.sleep(0.1)
        raise SystemExit("vllm serve would not reset its prefix cache; rerun with --no-prefix-caching")

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the server and every process under it (EngineCore included)."""
        import psutil

        total = 0.0
        try:
            root = psutil.Process(self.proc.pid)
            for p in [root, *root.children(recursive=True)]:
                try:
                    t = p.cpu_times()
                    total += t.user + t.system
                except psutil.NoSuchProcess:
                    pass
        except psutil.NoSuchProcess:
            pass
        return total

    def stop(self) -> None:
        """Kill the server's whole process group (a killed server alone leaves its EngineCore orphaned)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=60)
        self.proc = None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="local model folder (default: the shipped Gemma 3 270M)")
    ap.add_argument("--prompts", type=int, default=256, help="prompts per timed pass (default 256)")
    ap.add_argument("--max-tokens", type=int, default=32, help="max new tokens per prompt (default 32)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64],
                    help="requests in flight, one timed pass each (default 1 8 64)")
    ap.add_argument("--baseline", type=int, default=8, help="the concurrency the ratios are against (default 8, the "
                    "old default; it is added to --concurrency if missing)")
    ap.add_argument("--repeats", type=int, default=1, help="timed passes per concurrency (default 1)")
    ap.add_argument("--warmup", type=int, default=16, help="untimed warm-up requests (other prompts; default 16)")
    ap.add_argument("--offline", action="store_true", help="also time the offline VLLMEngine on the same prompts "
                    "(after the server is stopped; another engine start, ~7 GB)")
    ap.add_argument("--kv-cache-gb", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE of the server and the "
                    "offline engine (default 1, as the tests)")
    ap.add_argument("--no-prefix-caching", action="store_true", help="start the server with prefix caching off")
    args = ap.parse_args()
    if args.prompts < 1 or args.max_tokens < 1 or args.repeats < 1 or args.warmup < 0:
        ap.error("--prompts, --max-tokens and --repeats must be >= 1, --warmup >= 0")
    if min(args.concurrency) < 1:
        ap.error("--concurrency values must be >= 1")
    levels = sorted(set(args.concurrency) | {args.baseline})

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    def on_term(signum, frame):  # a `kill` of this script still runs the finally that stops the server
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)

    from scale import synthetic_prompts

    from factory import templates
    from factory.config import SamplingConfig, make_model_config
    from factory.engines.openai_engine import OpenAIEngine
    from factory.models import resolve_model

    model_dir = resolve_model(args.model or "default")
    sampling = SamplingConfig(temperature=0.0, max_tokens=args.max_tokens)
    stop = templates.PLAIN_STOPS + sampling.stop  # what the generate stage passes for prompt_format "plain"

    def render(records):
        return [templates.plain_generate(r["prompt"], templates.COMMON_SPECIAL_TOKENS) for r in records]

    tmp = tempfile.TemporaryDirectory(prefix="factory-bench-oai-")
    server = Server(model_dir, _free_port(), args.kv_cache_gb, not args.no_prefix_caching,
                    Path(tmp.name) / "vllm-serve.log")

    def engine_for(c: int) -> OpenAIEngine:
        # timeout: a request waits behind the others in flight; max_retries 0: a failure is loud, not a slow pass.
        cfg = make_model_config({"base_url": f"{server.root}/v1", "concurrency": c, "timeout_s": 1800.0,
                                 "max_retries": 0, "max_model_len": 1024}, path=str(model_dir), engine="openai")
        return OpenAIEngine(cfg, str(model_dir), seed=0)

    engines = {c: engine_for(c) for c in levels}  # no server needed yet: a client is made lazily per request
    first = engines[levels[0]]
    ids = first.encode_batch(render(synthetic_prompts(args.prompts, seed=0)))
    warm_ids = first.encode_batch(render(synthetic_prompts(args.warmup, seed=1))) if args.warmup else []
    too_long = sum(len(x) + args.max_tokens > first.max_model_len for x in ids)
    if too_long:
        raise SystemExit(f"{too_long} prompts do not fit max_model_len {first.max_model_len}; lower --max-tokens")
    prompt_tokens = sum(len(x) for x in ids)
    seeds = list(range(len(ids)))

    results: dict[int, list[dict]] = {c: [] for c in levels}
    offline = None
    try:
        print(f"starting vllm serve on {model_dir} (port {server.port}, log {server.log_path}) ...", flush=True)
        t0 = time.perf_counter()
        server.start()
        print(f"vllm serve ready in {time.perf_counter() - t0:.1f} s", flush=True)

        if warm_ids:
            t = time.perf_counter()
            engines[max(levels)].generate(warm_ids, sampling, list(range(len(warm_ids))), stop)
            print(f"warm-up (untimed): {len(warm_ids)} requests in {time.perf_counter() - t:.1f} s", flush=True)

        for rep in range(args.repeats):
            k = rep % len(levels)
            for c in levels[k:] + levels[:k]:  # rotate the order from pass to pass
                if not args.no_prefix_caching:
                    server.reset_prefix_cache()
                eng = engines[c]
                cpu_srv, cpu_cli = server.cpu_seconds(), time.process_time()
                t = time.perf_counter()
                outs = [None] * len(ids)
                for i, comp in eng.generate_stream(ids, sampling, seeds, stop):
                    outs[i] = comp
                secs = time.perf_counter() - t
                cpu_srv, cpu_cli = server.cpu_seconds() - cpu_srv, time.process_time() - cpu_cli
                run = {"secs": secs, "texts": [o.text for o in outs], "tokens": sum(o.output_tokens for o in outs),
                       "server_cpu": cpu_srv, "client_cpu": cpu_cli}
                results[c].append(run)
                print(f"  pass {rep + 1}: concurrency {c:>4}  {secs:8.2f} s  {run['tokens']:6d} output tokens  "
                      f"{len(ids) / secs:6.2f} rows/s  server CPU {cpu_srv / secs:4.2f}/s, client "
                      f"{cpu_cli / secs:5.3f}/s", flush=True)
    finally:
        server.stop()
        for eng in engines.values():
            eng.close()

    if args.offline:
        from factory.config import VLLMModelConfig
        from factory.engines.vllm_engine import VLLMEngine

        print("starting the offline VLLMEngine (the server is stopped) ...", flush=True)
        t0 = time.perf_counter()
        mcfg = VLLMModelConfig(path=str(model_dir), max_model_len=1024, kv_cache_gb=args.kv_cache_gb,
                               enable_prefix_caching=not args.no_prefix_caching)
        vl = VLLMEngine(mcfg, str(model_dir), seed=0)
        try:
            print(f"offline engine started in {time.perf_counter() - t0:.1f} s", flush=True)
            assert vl.encode_batch(render(synthetic_prompts(4, seed=0))) == ids[:4], "the engines tokenize differently"
            if warm_ids:
                vl.generate(warm_ids, sampling, list(range(len(warm_ids))), stop)
            offline = []
            for rep in range(args.repeats):
                if not args.no_prefix_caching and not vl.llm.reset_prefix_cache():
                    raise SystemExit("vLLM could not reset its prefix cache; rerun with --no-prefix-caching")
                cpu = time.process_time()  # the EngineCore is a child process: count this process only as "client"
                t = time.perf_counter()
                outs = [None] * len(ids)
                for i, comp in vl.generate_stream(ids, sampling, seeds, stop):
                    outs[i] = comp
                secs = time.perf_counter() - t
                offline.append({"secs": secs, "texts": [o.text for o in outs],
                                "tokens": sum(o.output_tokens for o in outs), "client_cpu": time.process_time() - cpu})
                print(f"  pass {rep + 1}: offline VLLMEngine  {secs:8.2f} s  {offline[-1]['tokens']:6d} output "
                      f"tokens  {len(ids) / secs:6.2f} rows/s", flush=True)
        finally:
            vl.close()

    # Summary.
    def total(runs, key):
        return sum(r[key] for r in runs)

    base_runs = results[args.baseline]
    base_rate = len(ids) * len(base_runs) / total(base_runs, "secs")
    ref = base_runs[0]["texts"]
    print()
    print(f"model {model_dir} | {len(ids)} prompts ({prompt_tokens} prompt tokens, {prompt_tokens / len(ids):.0f} "
          f"per prompt) | max_tokens {args.max_tokens} | greedy | repeats {args.repeats} | prefix caching "
          f"{'off' if args.no_prefix_caching else 'on (reset before every pass)'} | {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'path':<22}{'seconds':>9}{'rows/s':>9}{'out tok/s':>11}{f'vs c={args.baseline}':>9}"
          f"{'server CPU/s':>14}{'client CPU/s':>14}{'texts != c=' + str(args.baseline):>16}")
    warnings = 0
    rows = [(f"openai c={c}", results[c]) for c in levels]
    if offline:
        rows.append(("offline VLLMEngine", offline))
    for name, runs in rows:
        secs, n = total(runs, "secs"), len(ids) * len(runs)
        differ = sum(sum(a != b for a, b in zip(r["texts"], ref)) for r in runs)
        warnings += differ if name.startswith("openai") else 0
        srv = f"{total(runs, 'server_cpu') / secs:.2f}" if "server_cpu" in runs[0] else "-"
        print(f"{name:<22}{secs:>9.2f}{n / secs:>9.2f}{total(runs, 'tokens') / secs:>11.1f}"
              f"{n / secs / base_rate:>9.2f}{srv:>14}{total(runs, 'client_cpu') / secs:>14.3f}"
              f"{f'{differ}/{n}':>16}")
    if args.repeats > 1:
        print("median seconds per pass: " + ", ".join(f"{name} {statistics.median(r['secs'] for r in runs):.2f}"
                                                      for name, runs in rows))
    if max(levels) > 128:
        print("note: vllm serve on CPU runs at most 128 sequences at once (max_num_seqs); the rest wait on the server")
    if warnings:
        print(f"WARNING: {warnings} texts from the server differ from concurrency {args.baseline}'s at temperature 0 "
              "(batch composition changes floating-point sums; a near-tie can flip a greedy token)")
    else:
        print(f"texts identical across concurrencies at temperature 0: yes ({len(levels)} concurrencies, "
              f"{args.repeats} pass(es) each)")
    tmp.cleanup()


if __name__ == "__main__":
    main()
