"""A .pte under a memory limit, as on a board with less memory than this host: the workflow's demo
.pte in a real memory cgroup, once with room for what it cannot give back and once without."""

import subprocess
import sys

from conftest import require
from gemma_edge.measure import memory_limit

PTE = "results/tiny/int4-g128/xnnpack-auto/model.pte"
MIB = 2**20


def test_a_pte_decodes_the_same_tokens_within_a_limit_and_is_stopped_below_it(workflow, capsys):
    require(memory_limit.unavailable())
    pte = workflow["workdir"] / PTE
    starved = memory_limit.check(pte, 64 * MIB, prompt_tokens=8, new_tokens=8)
    assert not starved["fits"]
    assert starved["limited"]["exit"] == -9 and starved["limited"]["oom_kills"] >= 1  # the kernel's OOM killer
    assert starved["limited"]["cgroup_peak_bytes"] <= 64 * MIB
    assert "does not fit in 64 MiB: it was ended by the kernel's OOM killer" in memory_limit.verdict(starved)

    # Room for the anonymous peak (what cannot be reclaimed without swap) and a little more.
    anonymous = starved["unlimited"]["resident"]["anon_peak_bytes"]
    limit = anonymous + 64 * MIB
    roomy = memory_limit.check(pte, limit, prompt_tokens=8, new_tokens=8)
    assert roomy["fits"] and roomy["limited"]["tokens"] == roomy["unlimited"]["tokens"] == starved["unlimited"]["tokens"]
    assert roomy["limited"]["cgroup_peak_bytes"] <= limit and roomy["limited"]["oom_kills"] == 0
    assert len(roomy["limited"]["tokens"]) == 8

    # The command line: one sentence, and its exit status says whether it fits.
    assert memory_limit.main([str(pte), "--limit-mib", "64", "--prompt", "8", "--tokens", "4"]) == 1
    assert capsys.readouterr().out.count("\n") == 1


LOCKED = """
import sys
import executorch.kernels.quantized
from executorch.extension.llm.custom_ops import custom_ops
from executorch.runtime import Runtime
from gemma_edge.device.memory import resident
from gemma_edge.device.runtime import PteDecoder

if sys.argv[2] == "runtime":  # the bindings as they come
    program = Runtime.get().load_program(sys.argv[1])
    method = program.load_method("forward")
else:
    decoder = PteDecoder(sys.argv[1])
print(resident()["locked"])
"""


def test_the_device_runtime_maps_the_program_without_locking_its_pages(workflow):
    """ExecuTorch's bindings mlock every segment they map (root, or within RLIMIT_MEMLOCK: the
    demo's 1 MB fits the default either way); the device's runtime wrapper leaves them unlocked,
    so the 35-layer program's 2.7 GB of embedding tables are read a row at a time and can be
    reclaimed (docs/performance.md)."""
    pte = str(workflow["workdir"] / PTE)
    locked = {
        how: int(subprocess.run([sys.executable, "-c", LOCKED, pte, how], capture_output=True, text=True, check=True).stdout)
        for how in ("runtime", "wrapper")
    }
    assert locked["runtime"] > 0 and locked["wrapper"] == 0


RUN_ONLY = """
import sys
from gemma_edge.device.runtime import PteDecoder, greedy_decode

decoder = PteDecoder(sys.argv[1])
print(len(greedy_decode(decoder.step, [2, 40, 41, 42], 4)))
exporter = (("executorch", "exir"), ("torch", "_dynamo"), ("torch", "_inductor"))
print(sorted(name for name in sys.modules if tuple(name.split(".")[:2]) in exporter))
"""


def test_the_device_runtime_runs_a_program_without_importing_the_exporter(workflow):
    """The runtime's bindings and the kernels the program calls (update_cache, custom_sdpa,
    embedding_byte), and none of what ExecuTorch's own wrappers import with them: it stayed
    resident, 130 MiB at E2B's widths (docs/design.md, "The device runtime without the exporter")."""
    pte = str(workflow["workdir"] / PTE)
    decoded, imported = subprocess.run(
        [sys.executable, "-c", RUN_ONLY, pte], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert decoded == "4"
    assert imported == "[]"
