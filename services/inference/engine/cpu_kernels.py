"""The engine's own CPU kernels (csrc/*.cpp): built on first use, used where they run.

Each source compiles once per source version with the machine's C++ compiler (10-25 s;
`make setup` and the worker image do it ahead, `build_all`) into tokenyard/ in torch's
extensions folder (`TORCH_EXTENSIONS_DIR`, by default ~/.cache/torch_extensions), for the
instruction sets it names. Without those instructions on this CPU, a compiler or the
``ninja`` build tool, an extension is not `available` and quant.py keeps to
PyTorch's kernels: same results, slower.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from services.inference.model_loading import cpu_flags

log = logging.getLogger(__name__)
__all__ = ["CpuExtension", "build_all"]

_CSRC = Path(__file__).parent / "csrc"


@dataclass(frozen=True)
class CpuExtension:
    """One kernel source and the instruction sets it is compiled for."""

    name: str  # the torch extension's name (its build folder)
    source: str  # file name under csrc/
    cflags: tuple[str, ...]  # its instruction sets (-m...) and other compiler flags
    cpu_flags: frozenset[str]  # every flag Linux's /proc/cpuinfo must report to run it

    def runs_on(self, cpuinfo: str | None = None) -> bool:
        """Whether this CPU (or the given /proc/cpuinfo text) has every instruction set."""
        return cpu_flags(cpuinfo) >= self.cpu_flags

    def folder(self) -> Path:
        """The build folder: named after the source's content, the headers beside it and
        the flags."""
        sha = hashlib.sha256((_CSRC / self.source).read_bytes())
        for header in sorted(_CSRC.glob("*.h")):
            sha.update(header.read_bytes())
        sha.update(" ".join(self.cflags).encode())
        return _build_root() / f"{self.name}_{sha.hexdigest()[:12]}"

    def build(self) -> None:
        """Compile (or load the cached build of) the extension; raises if it cannot.

        Compiling needs no particular CPU: an image built anywhere carries every build.
        The build folder is named after the source's content (and the headers
        beside it), so two checkouts or versions on one machine each keep their own
        build instead of rebuilding over each other's in the shared extensions folder.
        """
        from torch.utils.cpp_extension import load

        folder = self.folder()
        name = folder.name
        folder.mkdir(parents=True, exist_ok=True)
        # PyTorch marks a build in progress with a `lock` file that its other callers
        # wait on until it is gone: a builder killed mid-build (a worker stopped
        # during its first start) left it behind, and every later start hung there.
        # Our builders take an flock first, which the kernel drops when a process
        # dies: whoever holds it is the only live builder, so a `lock` it finds is
        # stale.
        with (folder.parent / f"{name}.flock").open("w") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            (folder / "lock").unlink(missing_ok=True)
            load(
                name=name,
                sources=[str(_CSRC / self.source)],
                extra_cflags=["-O3", "-fopenmp", *self.cflags],
                extra_ldflags=["-fopenmp"],
                build_directory=str(folder),
                is_python_module=False,
                verbose=False,
            )

    def available(self) -> bool:
        """Whether the kernels run here (checked, and built if needed, once)."""
        return _loaded(self)


def _build_root() -> Path:
    """Where the extensions are built: tokenyard/ in torch's extensions folder."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    return Path(root) / "tokenyard"


@functools.cache
def _loaded(extension: CpuExtension) -> bool:
    if not extension.runs_on():
        return False
    try:
        extension.build()
    except Exception as exc:  # no compiler, no ninja, a failed build: PyTorch's kernels
        log.warning("%s kernels unavailable, PyTorch's are used: %s", extension.name, exc)
        return False
    return True


# The decode step's small ops fused (RMSNorm), for any CPU: no ISA flags (the source
# clones its loops for AVX2 and AVX-512 itself), and no fused multiply-adds the source
# did not ask for, so that every clone rounds alike.
OPS = CpuExtension(
    name="tokenyard_cpu_ops",
    source="cpu_ops.cpp",
    cflags=("-ffp-contract=off",),
    cpu_flags=frozenset(),
)


def build_all() -> dict[str, str]:
    """Build every extension, whatever this CPU runs (`make setup`, the worker image).

    Returns each extension's name -> "runs here", "built, not for this CPU" or why it
    was not built; a failed build is reported, not raised: PyTorch's kernels remain.
    """
    from services.inference.engine import amx, avx2, avx512

    built = {}
    for extension, runs in (
        (amx.EXTENSION, amx.available),
        (avx2.EXTENSION, avx2.available),
        (avx512.EXTENSION, avx512.available),
        (OPS, OPS.available),
    ):
        try:
            extension.build()
        except Exception as exc:
            built[extension.name] = f"not built: {exc}"
            continue
        built[extension.name] = "runs here" if runs() else "built, not for this CPU"
    return built
