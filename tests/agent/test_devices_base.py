"""The device interface: sample fields, the energy counter, ``open_backend``, lazy imports."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agent.devices import open_backend
from agent.devices.base import EnergyCounter, GpuIdentity, GpuSample
from agent.devices.nvml import NvmlBackend
from agent.devices.simulated import SimulatedBackend
from dcenergy.errors import DeviceError
from dcenergy.schema import GPU, point
from tests.agent.fake_pynvml import FakeGpu, FakeNvml

REPO = Path(__file__).resolve().parents[2]
IDENT = GpuIdentity(3, "GPU-x", "NVIDIA H100 80GB HBM3", "00000000:18:00.0", None)


def test_every_sample_field_is_a_schema_field() -> None:
    fields = GpuSample(IDENT, power_w=500.0).fields()
    assert set(fields) <= GPU.field_names
    # everything the schema has about a GPU except the jobs, which the agent adds
    assert GPU.field_names - set(fields) == {"job_id", "job_ids", "job_count"}


def test_absent_fields_are_none_and_dropped_from_points() -> None:
    s = GpuSample(IDENT, power_w=0.0, temp_c=None)
    fields = s.fields()
    assert fields["power_w"] == 0.0  # a real zero stays
    assert fields["temp_c"] is None
    assert fields["mig_mode"] is None  # unknown MIG mode: absent, not False
    p = point(GPU, {"host": "h"}, fields, 1)
    assert "temp_c" not in p.fields
    assert p.fields["power_w"] == 0.0
    assert p.fields["lost"] is False


def test_lost_sample_reports_only_lost() -> None:
    s = GpuSample(IDENT, lost=True, power_w=123.0)
    p = point(GPU, {"host": "h"}, s.fields(), 1)
    assert dict(p.fields) == {"lost": True}


def test_energy_counter_corrects_resets() -> None:
    c = EnergyCounter()
    out = [c.update(x) for x in (10.0, 15.0, 2.0, 4.0, 1.0)]
    assert out == [10.0, 15.0, 17.0, 19.0, 20.0]
    assert c.resets == 2


def test_open_backend_simulated_is_open() -> None:
    t = [0.0]
    backend = open_backend("simulated", simulate=3, seed=5, host="n7", clock=lambda: t[0])
    try:
        assert isinstance(backend, SimulatedBackend)
        assert backend.name == "simulated"
        assert len(backend.devices()) == 3
    finally:
        backend.close()
    with open_backend("simulated") as default:
        assert len(default.devices()) == 8


def test_open_backend_nvml_uses_the_given_module() -> None:
    fake = FakeNvml([FakeGpu(), FakeGpu()])
    with open_backend("nvml", nvml_module=fake) as backend:
        assert isinstance(backend, NvmlBackend)
        assert backend.name == "nvml"
        assert len(backend.devices()) == 2
        assert fake.init_calls == 1
    assert fake.shutdown_calls == 1


def test_open_backend_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="unknown device backend"):
        open_backend("rocm")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="simulate"):
        open_backend("nvml", simulate=2)


def test_unopened_backend_has_no_devices() -> None:
    with pytest.raises(DeviceError):
        SimulatedBackend(1).devices()
    with pytest.raises(DeviceError):
        NvmlBackend(FakeNvml()).devices()


def test_importing_the_backends_does_not_import_pynvml() -> None:
    code = textwrap.dedent(
        """
        import sys
        import agent.devices
        import agent.devices.nvml
        import agent.devices.simulated
        from agent.devices import open_backend
        with open_backend("simulated", simulate=2) as b:
            for d in b.devices():
                d.sample()
        assert "pynvml" not in sys.modules, "pynvml imported eagerly"
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
