"""Hand-made telemetry points (what an agent writes) for tests that need exact figures."""

from __future__ import annotations

from typing import Any

from dcenergy import schema

GB = 10**9


def gpu_point(
    host: str,
    index: int,
    time_ns: int,
    *,
    job: str = "",
    util: float = 0.0,
    power_w: float = 70.0,
    energy_j: float | None = None,
    energy_resets: int | None = None,
    mem_used_gb: float = 1.0,
    mem_total_gb: float = 80.0,
    model: str = "H100",
    uuid: str | None = None,
    **fields: Any,
) -> schema.Point:
    """One ``gpu`` row; ``uuid`` defaults to ``GPU-<host>-<index>``."""
    values: dict[str, Any] = {
        "util_gpu_pct": util,
        "power_w": power_w,
        "mem_used_bytes": int(mem_used_gb * GB),
        "mem_total_bytes": int(mem_total_gb * GB),
        "job_id": job,
        "power_limit_w": 700.0,
        "power_limit_default_w": 700.0,
        "power_limit_min_w": 200.0,
        "power_limit_max_w": 700.0,
        "energy_j": energy_j,
        "energy_resets": energy_resets,
        **fields,
    }
    values = _typed(schema.GPU, values)
    tags = {
        schema.TAG_HOST: host,
        schema.TAG_GPU_INDEX: str(index),
        schema.TAG_GPU_UUID: uuid or f"GPU-{host}-{index}",
        schema.TAG_GPU_MODEL: model,
    }
    return schema.point(schema.GPU, tags, values, time_ns)


def job_point(host: str, job: str, uuids: list[str], time_ns: int, **fields: Any) -> schema.Point:
    """One ``job`` row of ``job`` on ``host`` holding ``uuids``."""
    values: dict[str, Any] = {
        "gpu_uuids": ",".join(uuids),
        "gpu_count": len(uuids),
        "power_limit_w": 700.0,
        "power_w": 400.0 * len(uuids),
        "sm_util_pct": 80.0,
        **fields,
    }
    values = _typed(schema.JOB, values)
    return schema.point(schema.JOB, {schema.TAG_HOST: host, schema.TAG_JOB: job}, values, time_ns)


def _typed(m: schema.Measurement, values: dict[str, Any]) -> dict[str, Any]:
    """Each value as the schema's kind (InfluxDB refuses an int where a float was written)."""
    return {k: None if v is None else m.spec(k).kind(v) for k, v in values.items()}
