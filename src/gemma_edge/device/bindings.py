"""ExecuTorch's runtime bindings with the kernels a lowered Gemma calls, and nothing of the exporter.

`executorch.runtime` and `executorch.extension.pybindings.portable_lib` import `executorch.exir`
for a warning class, and with it torch._dynamo and the export machinery; the LLM ops' Python
module (`custom_ops`) imports torch's inductor besides. A process that only runs a `.pte` paid
for them in memory that stays resident, 130 MiB of anonymous pages, and in 3 s more to start
(`e2b-4l` on an AMD EPYC VM, 2026-12-07; docs/design.md, "The device runtime without the
exporter"). The runtime itself is the `_C` extension those modules wrap, and the quantized and LLM
kernels register themselves with it when their libraries load, so both are loaded here directly.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

# The packages whose shared libraries hold the kernels our programs call besides XNNPACK's:
# embedding_byte (INT8 embedding tables), update_cache and custom_sdpa.
KERNEL_LIBRARIES = (
    ("executorch.kernels.quantized", "libquantized_ops_aot_lib.so"),
    ("executorch.extension.llm.custom_ops", "libcustom_ops_aot_lib.so"),
)


@functools.cache
def runtime():
    """The `_C` extension, its kernel libraries loaded (once per process)."""
    import torch  # the extension links libtorch: torch's own import loads it first
    from executorch.extension.pybindings import _C

    for package, library in KERNEL_LIBRARIES:
        torch.ops.load_library(package_folder(package) / library)
    return _C


def package_folder(name: str) -> Path:
    """Where a package's files are, without running its `__init__` (custom_ops' imports the exporter)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"{name} is not installed: the ExecuTorch wheel is incomplete")
    return Path(next(iter(spec.submodule_search_locations)))


def load_program(path: Path, etdump: bool = False):
    """A `.pte` as the runtime's program object: `load_method(name)` gives a callable method."""
    bindings = runtime()
    return bindings._load_program(
        str(path),
        enable_etdump=etdump,
        debug_buffer_size=0,
        program_verification=bindings.Verification.InternalConsistency,
        data_path=None,
    )


def method_names(program) -> list[str]:
    return [program.get_method_name(index) for index in range(program.num_methods())]


def set_threads(threads: int | None = None) -> int:
    """Restart the runtime's thread pool with `threads` threads (None: as many as it has); return them."""
    bindings = runtime()
    threads = int(threads or bindings._threadpool_get_thread_count())
    bindings._unsafe_reset_threadpool(threads)
    return threads
