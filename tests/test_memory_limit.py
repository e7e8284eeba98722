"""A .pte under a memory limit, as on a board with less memory than this host: the workflow's demo
.pte in a real memory cgroup, once with room for what it cannot give back and once without."""

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
