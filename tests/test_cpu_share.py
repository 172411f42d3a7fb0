"""How many CPU threads a distributed train stage's gloo workers get: the pod's CPU limit (its cgroup's quota, v1
or v2) split between them, so two workers in a one-CPU pod do not each start as many threads as the host has."""

from __future__ import annotations

from pathlib import Path

from tunectl_jobs.distributed import _cgroup_cpu_limit


def test_the_cgroup_cpu_limit_is_read_from_v2_and_v1(tmp_path: Path):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")
    assert _cgroup_cpu_limit(v2) == 1.5
    (v2 / "cpu.max").write_text("max 100000\n")
    assert _cgroup_cpu_limit(v2) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert _cgroup_cpu_limit(v1) == 1.0
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert _cgroup_cpu_limit(v1) is None
    assert _cgroup_cpu_limit(tmp_path / "none") is None
