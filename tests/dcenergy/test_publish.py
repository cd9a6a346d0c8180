"""Publishing: plan validation, per-host split, plan_part points, newest-part lookup."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dcenergy import schema
from dcenergy.errors import EX_DATAERR, InputError
from dcenergy.plan import verify_part
from dcenergy.publish import fetch_latest_part, publish, split_plan
from dcenergy.store.embedded import EmbeddedStore

NOW = 1_700_000_000_000_000_000
S = 1_000_000_000
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))


def plan(**kw: Any) -> dict[str, Any]:
    p: dict[str, Any] = {
        "plan_id": "p1",
        "created_ns": NOW,
        "expires_ns": NOW + 900 * S,
        "setpoints": [
            {"gpu": "GPU-b", "host": "n2", "power_limit_w": 400.0, "sm_clock_max_mhz": None},
            {"gpu": "GPU-a", "host": "n1", "power_limit_w": 350.5, "sm_clock_max_mhz": None},
            {"gpu": "GPU-c", "host": "n1", "power_limit_w": 500, "sm_clock_max_mhz": None},
        ],
    }
    p.update(kw)
    return p


@pytest.fixture
def store(tmp_path: Path) -> Iterator[EmbeddedStore]:
    s = EmbeddedStore(tmp_path / "store.sqlite")
    yield s
    s.close()


def test_split_per_host_sorted() -> None:
    parts = split_plan(plan(), seq_from_ns=NOW + 5)
    assert [p.host for p in parts] == ["n1", "n2"]
    assert [s.gpu_uuid for s in parts[0].setpoints] == ["GPU-a", "GPU-c"]
    assert all(p.seq == NOW + 5 and p.mode == "power" for p in parts)
    assert parts[0].setpoints[1].power_limit_w == 500.0


def test_mode_is_dvfs_when_clocks_are_planned() -> None:
    sps = [{"gpu": "GPU-a", "host": "n1", "power_limit_w": 300.0, "sm_clock_max_mhz": 1410}]
    assert split_plan(plan(setpoints=sps), seq_from_ns=1)[0].mode == "dvfs"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"setpoints": None}, "setpoints"),
        ({"setpoints": []}, "setpoints"),
        ({"plan_id": ""}, "plan_id"),
        ({"created_ns": "soon"}, "created_ns"),
        ({"expires_ns": NOW - 1}, "expires_ns"),
        ({"mode": "turbo"}, "mode"),
        ({"setpoints": [{"gpu": "G", "host": "h", "power_limit_w": -1}]}, "power_limit_w"),
        (
            {"setpoints": [{"gpu": "G", "host": "h", "power_limit_w": float("nan")}]},
            "power_limit_w",
        ),
        ({"setpoints": [{"gpu": "G", "host": "h", "power_limit_w": True}]}, "power_limit_w"),
        ({"setpoints": [{"gpu": "G", "host": "h", "sm_clock_max_mhz": 1.5}]}, "sm_clock_max_mhz"),
        ({"setpoints": [{"gpu": "G", "host": "h"}]}, "setpoints[0]"),
        ({"setpoints": [{"gpu": "", "host": "h", "power_limit_w": 3}]}, "gpu"),
        ({"setpoints": [{"gpu": "G", "power_limit_w": 3}]}, "host"),
        (
            {
                "setpoints": [
                    {"gpu": "G", "host": "h", "power_limit_w": 3},
                    {"gpu": "G", "host": "h2", "power_limit_w": 3},
                ]
            },
            "setpoints[1].gpu",
        ),
    ],
)
def test_bad_plans_are_input_errors(change: dict[str, Any], field: str) -> None:
    bad = plan(**change)
    if change.get("setpoints", 0) is None:
        del bad["setpoints"]
    with pytest.raises(InputError) as info:
        split_plan(bad, seq_from_ns=1, source="plan.json")
    assert field in info.value.field
    assert info.value.exit_code == EX_DATAERR
    assert str(info.value).startswith("plan.json: field ")


def test_publish_writes_one_point_per_host_and_each_reads_its_own(store: EmbeddedStore) -> None:
    signed = publish(plan(), store, KEY, NOW + 7)
    points = store.read(schema.PLAN_PART.name, start_ns=0)
    assert sorted(p.tags["host"] for p in points) == ["n1", "n2"]
    for p in points:
        assert p.time_ns == NOW + 7
        assert p.fields["plan_id"] == "p1"
        assert p.fields["seq"] == NOW + 7
        assert p.fields["expires_ns"] == NOW + 900 * S
    n1 = fetch_latest_part(store, "n1", NOW + 10, 3600)
    assert n1 == signed[0].payload
    part = verify_part(
        n1, KEY.public_key(), now_ns=NOW + 10, last_seq=None, max_skew_s=0, host="n1"
    )
    assert [s.gpu_uuid for s in part.setpoints] == ["GPU-a", "GPU-c"]
    assert fetch_latest_part(store, "n3", NOW + 10, 3600) is None


def test_seq_increases_even_if_the_clock_steps_back(store: EmbeddedStore) -> None:
    first = publish(plan(), store, KEY, NOW + 100)
    second = publish(plan(plan_id="p2"), store, KEY, NOW + 50, last_seq=first[0].part.seq)
    assert second[0].part.seq == NOW + 101


def test_fetch_takes_the_newest_point(store: EmbeddedStore) -> None:
    publish(plan(plan_id="old"), store, KEY, NOW)
    newer = publish(plan(plan_id="new"), store, KEY, NOW + S)
    assert fetch_latest_part(store, "n1", NOW + 2 * S, 60) == newer[0].payload
    # outside the lookback window nothing is found
    assert fetch_latest_part(store, "n1", NOW + 3600 * S, 60) is None
