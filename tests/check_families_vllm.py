"""By-hand check: every family's tiny policy (tests/families.py) loads in vLLM and generates a forced length.

    python tests/check_families_vllm.py [FAMILY ...]

One engine at a time, each in its own process (a fresh engine per family, so RSS is per family), with a 1 GiB
KV cache. Prints start-up seconds, the peak RSS of the engine's process tree, and the output lengths of
`SamplingParams(min_tokens=8, max_tokens=16)`. Not a pytest test: five vLLM start-ups are too slow for the
suite (vLLM spawns its engine, hence the `__main__` guard).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _tree_rss_mb(pid: int) -> float:
    """RSS of a process and its descendants (MiB), from /proc."""
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(p.name))
    total, todo = 0, [pid]
    while todo:
        q = todo.pop()
        todo += children.get(q, [])
        try:
            for line in Path(f"/proc/{q}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def run_one(model_dir: str) -> dict:
    """In a child process: start an engine, generate, report."""
    from vllm import LLM, SamplingParams

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Name a colour."}], tokenize=False,
                                     add_generation_prompt=True)
    t = time.time()
    llm = LLM(model=model_dir, dtype="float32", max_model_len=1024, enforce_eager=True, seed=0)
    startup = time.time() - t
    outs = llm.generate([prompt] * 4, SamplingParams(min_tokens=8, max_tokens=16, temperature=1.0, seed=0))
    lens = [len(o.outputs[0].token_ids) for o in outs]
    unforced = llm.generate([prompt] * 4, SamplingParams(max_tokens=16, temperature=1.0, seed=0))
    # A model that wants to end at once (every eos id of generation_config pushed up): min_tokens must hold
    # back all of them (vLLM stops on generation_config's eos list, not only the tokenizer's eos).
    from transformers import GenerationConfig

    eos_ids = GenerationConfig.from_pretrained(model_dir).eos_token_id
    eos_ids = eos_ids if isinstance(eos_ids, list) else [eos_ids]
    bias = {i: 100.0 for i in eos_ids}
    eager = llm.generate([prompt] * 2, SamplingParams(max_tokens=16, logit_bias=bias))
    held = llm.generate([prompt] * 2, SamplingParams(min_tokens=8, max_tokens=16, logit_bias=bias))
    eos_forced = {"eos_ids": eos_ids, "eos_biased_lens": [len(o.outputs[0].token_ids) for o in eager],
                  "eos_biased_min8_lens": [len(o.outputs[0].token_ids) for o in held]}
    # The label tokens the log-prob judge reads: top log-probs after the cue.
    lp = llm.generate(["The answer is ("], SamplingParams(max_tokens=1, logprobs=5))[0].outputs[0].logprobs[0]
    return {"startup_s": round(startup, 1), "forced_lens": lens,
            "unforced_lens": [len(o.outputs[0].token_ids) for o in unforced],
            "finish": [o.outputs[0].finish_reason for o in outs], "logprobs_n": len(lp), **eos_forced}


def main(families: list[str]) -> None:
    from families import SPECS, LazyFamilies

    fams = families or list(SPECS)
    shipped = None
    if "gemma3" in fams:
        from factory.models import prepare_default_model

        shipped = prepare_default_model()
    out = Path(tempfile.mkdtemp(prefix="families-vllm-"))
    built = LazyFamilies(out, shipped, fams)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
           "VLLM_LOGGING_LEVEL": "ERROR", "TOKENIZERS_PARALLELISM": "false"}
    for name in fams:
        fam = built[name]
        proc = subprocess.Popen([sys.executable, __file__, "--child", str(fam.policy)], env=env,
                                stdout=subprocess.PIPE, text=True)
        peak = [0.0]

        def watch():
            while proc.poll() is None:
                peak[0] = max(peak[0], _tree_rss_mb(proc.pid))
                time.sleep(0.5)

        w = threading.Thread(target=watch, daemon=True)
        w.start()
        stdout, _ = proc.communicate()
        w.join()
        line = stdout.strip().splitlines()[-1] if stdout.strip() else "{}"
        result = json.loads(line) if proc.returncode == 0 else {"error": f"exit {proc.returncode}"}
        print(json.dumps({"family": name, "model_type": SPECS[name].model_type, **result,
                          "peak_rss_mb": round(peak[0])}), flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(run_one(sys.argv[2])), flush=True)
    else:
        main(sys.argv[1:])
