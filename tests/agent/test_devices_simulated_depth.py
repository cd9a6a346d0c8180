"""The simulated GPU's telemetry depth: GPM activity, shared and MIG workloads, health."""

from __future__ import annotations

import itertools

import pytest

from agent.devices.simulated import SimulatedBackend, SimulatedGpu, SimWork
from dcenergy.schema import GPU_HEALTH


def _gpu(model: str = "H100-SXM") -> SimulatedGpu:
    t = itertools.count(1000.0, 1.0)
    backend = SimulatedBackend(1, models=model, seed=3, clock=lambda: next(t))
    backend.open()
    return backend.gpus()[0]


def test_gpm_activity_follows_the_work_and_the_clock() -> None:
    gpu = _gpu()
    idle = gpu.sample()
    assert idle.sm_active_pct == idle.dram_active_pct == 0.0
    gpu.set_workload(1.0, "compute")
    full = gpu.sample()
    assert full.sm_active_pct == pytest.approx(95.0)
    assert full.tensor_active_pct == pytest.approx(70.0)
    assert 0 < full.dram_active_pct < full.sm_active_pct  # compute-bound  # type: ignore[operator]
    gpu.set_power_limit_w(300.0)
    capped = gpu.sample()
    # the SMs stay busy (each kernel takes longer); DRAM traffic falls with the work done
    assert capped.sm_active_pct == pytest.approx(95.0)
    assert capped.dram_active_pct < full.dram_active_pct  # type: ignore[operator]
    assert capped.pcie_rx_bytes_per_s < full.pcie_rx_bytes_per_s  # type: ignore[operator]
    gpu.set_workload(1.0, "memory")
    mem = gpu.sample()
    assert mem.dram_active_pct > mem.sm_active_pct * 0.9  # type: ignore[operator]


def test_gpm_only_on_hopper_and_nvlink_only_on_sxm() -> None:
    a100 = _gpu("A100-SXM")
    a100.set_workload(1.0)
    s = a100.sample()
    assert s.sm_active_pct is None and s.power_w is not None
    l40s = _gpu("L40S")
    l40s.set_workload(1.0)
    assert l40s.sample().nvlink_tx_bytes_per_s is None
    assert l40s.health().nvlink_replay_errors_total is None  # type: ignore[union-attr]


def test_shared_workloads_add_up_like_one() -> None:
    one, two = _gpu(), _gpu()
    one.set_workload(0.8, "compute", pids=[1])
    two.set_shared_workloads(
        [SimWork(0.8, "compute", "a", [1], share=0.5), SimWork(0.8, "compute", "b", [2], share=0.5)]
    )
    s1, s2 = one.sample(), two.sample()
    assert s2.power_w == pytest.approx(s1.power_w)
    assert s2.util_gpu_pct == pytest.approx(s1.util_gpu_pct)
    assert two.process_utilization() == pytest.approx({1: 0.5 * 80.0, 2: 0.5 * 80.0})
    assert two.compute_pids() == [1, 2]
    assert two.throughput_fraction("b") == pytest.approx(1.0)
    with pytest.raises(ValueError):
        two.set_shared_workloads([SimWork(1.0, share=0.7), SimWork(1.0, share=0.7)])


def test_mig_instances_their_work_and_power() -> None:
    gpu = _gpu()
    gpu.enable_mig(["3g.40gb", "2g.20gb", "1g.10gb"])
    assert gpu.identity.mig_mode is True
    idle_w = gpu.sample().power_w
    gpu.set_instance_workload(0, 1.0, "compute", "train", pids=[10, 11])
    gpu.set_instance_workload(2, 0.5, "memory", "infer", pids=[12])
    s = gpu.sample()
    assert s.util_gpu_pct is None  # NVML has none for a MIG-enabled GPU
    assert s.power_w > idle_w  # type: ignore[operator]
    a, b, c = gpu.mig_instances()
    assert [i.profile for i in (a, b, c)] == ["3g.40gb", "2g.20gb", "1g.10gb"]
    assert [i.sm_count for i in (a, b, c)] == [48, 32, 16]
    assert a.uuid.startswith("MIG-") and a.parent_uuid == gpu.identity.uuid
    assert a.pids == (10, 11) and b.pids == () and c.pids == (12,)
    assert a.sm_active_pct == pytest.approx(95.0)  # of its own SMs
    assert b.sm_active_pct == 0.0
    assert c.sm_active_pct == pytest.approx(30.0)
    assert a.mem_total_bytes == 40 * 1000**3
    assert gpu.compute_pids() == [10, 11, 12]
    assert gpu.process_utilization() == {}
    with pytest.raises(ValueError):
        gpu.set_workload(1.0)
    with pytest.raises(ValueError):
        _gpu().enable_mig(["4g.40gb", "4g.40gb"])  # 8 slices of 7
    with pytest.raises(ValueError):
        _gpu("L40S").enable_mig(["1g.6gb"])


def test_health_is_clean_until_errors_are_injected() -> None:
    gpu = _gpu()
    h = gpu.health()
    assert h is not None and h.reasons() == []
    assert set(h.fields()) <= GPU_HEALTH.field_names
    assert h.fan_speed_pct is None and h.retired_pages_sbe is None  # SXM, row remapping
    gpu.inject_ecc(corrected=5, uncorrected=1)
    gpu.inject_xid(13)
    gpu.inject_xid(48)
    h = gpu.health()
    assert h is not None
    assert (h.ecc_corrected_volatile, h.ecc_uncorrected_aggregate) == (5, 1)
    assert (h.remap_uncorrected_rows, h.remap_pending) == (1, 1)
    assert (h.xid_events, h.xid_critical_events, h.xid_last_critical) == (2, 1, 48)
    assert h.reasons() == ["1 uncorrected ECC errors", "row remap pending", "XID 48"]
    h = gpu.health()
    assert h is not None and h.xid_events == 0 and h.remap_pending == 1
    gpu.mark_lost()
    assert gpu.health() is None and gpu.mig_instances() == []
