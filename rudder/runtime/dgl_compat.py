"""DGL 2.1.0 on a newer torch: make ``import dgl`` work, and do nothing where DGL matches torch.

The newest DGL wheel for Linux (2.1.0) ships its GraphBolt extension only for torch 2.0.0-2.2.1, and
``import dgl`` raises ``FileNotFoundError`` for ``dgl/graphbolt/libgraphbolt_pytorch_<torch>.so`` on any other
torch. rudder does not use GraphBolt (nor ``dgl.sparse``); core DGL, its samplers, ``partition_graph`` and
``dgl.distributed`` work on torch 2.13 CPU. Any loadable shared library at that path lets the import pass, so
:func:`ensure_graphbolt_stub` puts an empty one there, once:

- built from an empty C file with the system C compiler when there is one, otherwise
- a copy of a C extension module of the running Python (any loadable ELF will do).

It is a no-op when the library for the running torch exists (DGL built for this torch, or the stub already made).
Run it explicitly with ``python -m rudder.runtime.dgl_compat``; every rudder module imports DGL through
:func:`import_dgl`, which calls it first, so a plain ``pip install`` also works.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile

STUB_MARKER = "rudder graphbolt stand-in"


def _graphbolt_path() -> str | None:
    spec = importlib.util.find_spec("dgl")
    if spec is None or not spec.submodule_search_locations:
        return None
    import torch

    version = torch.__version__.split("+", maxsplit=1)[0]
    return os.path.join(spec.submodule_search_locations[0], "graphbolt", f"libgraphbolt_pytorch_{version}.so")


def _build_stub(dest: str) -> str:
    """Write a loadable, empty shared library to ``dest``; return how it was made."""
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler:
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "stub.c")
            with open(src, "w") as f:
                f.write(
                    f"/* {STUB_MARKER}: DGL GraphBolt is not available for this torch. */\n"
                    "int rudder_graphbolt_stub(void) { return 0; }\n"
                )
            out = os.path.join(tmp, "stub.so")
            proc = subprocess.run([compiler, "-shared", "-fPIC", "-o", out, src], capture_output=True, text=True)
            if proc.returncode == 0:
                shutil.move(out, dest)
                return f"compiled with {compiler}"
    # No compiler: a C extension of the standard library is a loadable ELF with no torch symbols.
    ext = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    candidates = sorted(glob.glob(os.path.join(sysconfig.get_paths()["platstdlib"], "lib-dynload", f"_struct{ext}")))
    if not candidates:
        raise RuntimeError(f"cannot make a stand-in for {dest}: no C compiler and no stdlib extension to copy")
    shutil.copyfile(candidates[0], dest)
    return f"copied {candidates[0]}"


def ensure_graphbolt_stub(verbose: bool = False) -> str | None:
    """Make sure DGL's GraphBolt library for the running torch exists. Returns the path created, or None."""
    path = _graphbolt_path()
    if path is None or os.path.exists(path):
        return None
    if not os.path.isdir(os.path.dirname(path)):
        return None  # a DGL without GraphBolt: nothing to stand in for
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        how = _build_stub(tmp)
        os.replace(tmp, path)  # atomic: concurrent ranks may race here
    except PermissionError as exc:
        raise RuntimeError(
            f"DGL cannot be imported on this torch: {path} is missing and its folder is not writable ({exc}). "
            "Run `python -m rudder.runtime.dgl_compat` once as the user that installed DGL."
        ) from exc
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    if verbose:
        print(f"rudder: DGL GraphBolt stand-in {how} -> {path}", file=sys.stderr)
    return path


def import_dgl():
    """``import dgl`` after :func:`ensure_graphbolt_stub`; returns the module."""
    if "dgl" not in sys.modules:
        ensure_graphbolt_stub()
        os.environ.setdefault("DGLBACKEND", "pytorch")
        import warnings

        with warnings.catch_warnings():  # torchdata 0.9 warns on import that datapipes are deprecated
            warnings.filterwarnings("ignore", category=UserWarning, module="torchdata")
            import dgl
            import dgl.distributed  # noqa: F401  (pulls in torchdata)
    import dgl

    return dgl


if __name__ == "__main__":
    created = ensure_graphbolt_stub(verbose=True)
    dgl = import_dgl()
    import torch

    print(
        f"dgl {dgl.__version__} imports on torch {torch.__version__}"
        + (" (stand-in created)" if created else " (nothing to do)")
    )
