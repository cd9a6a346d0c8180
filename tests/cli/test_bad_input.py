"""Nothing a user or the world does makes dcenergy crash, lie, or lose data silently.

Every case found by feeding the CLI bad input: each asserts the exit code
(README "Commands"), that stderr is exactly one error line and at most one
hint line, and that no traceback shows. Most run in-process through
``dcenergy.cli.main``; a few as a subprocess, as a user runs them.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.rapl import RaplReader
from agent.simfleet import SimFleet
from dcenergy import schema
from dcenergy.cli import main
from dcenergy.errors import (
    EX_CANTCREAT,
    EX_CONFIG,
    EX_DATAERR,
    EX_INFEASIBLE,
    EX_NO_TELEMETRY,
    EX_UNAVAILABLE,
    EX_USAGE,
    ProblemError,
)
from dcenergy.lineprotocol import WriteOutcome
from dcenergy.plan import generate_keypair
from dcenergy.publish import fetch_latest_part
from dcenergy.store.embedded import EmbeddedStore
from dcenergy.store.influx import InfluxStore
from tests.influx_server import InfluxServer

REPO = Path(__file__).parents[2]
EXAMPLE = REPO / "docs" / "examples" / "problem.json"
S = 1_000_000_000
DCENERGY = [sys.executable, "-c", "import sys; from dcenergy.cli import main; sys.exit(main())"]

Run = Callable[..., tuple[int, str, str]]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in list(os.environ):
        if var.startswith("DCENERGY_") and var != "DCENERGY_REQUIRE_INFLUXDB":
            monkeypatch.delenv(var)
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Run:
    def go(*args: str | Path) -> tuple[int, str, str]:
        rc = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return rc, out, err

    return go


def one_error(err: str, *words: str) -> str:
    """stderr is one ``dcenergy: error:`` line and at most one ``hint:``; no traceback."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert 1 <= len(lines) <= 2, err
    assert lines[0].startswith("dcenergy: error: "), err
    if len(lines) == 2:
        assert lines[1].startswith("hint: "), err
    for w in words:
        assert w in err, (w, err)
    return lines[0]


def write_config(
    tmp_path: Path, text: str = "", *, keys: bool = False, **sections: dict[str, Any]
) -> Path:
    """A config with its own state dir and embedded store under ``tmp_path``; with ``keys``
    also naming ``keys/plan.key``, ``keys/plan.pub`` and ``topology.json`` there."""
    base: dict[str, dict[str, Any]] = {
        "agent": {"state_dir": str(tmp_path / "state")},
        "store": {"embedded_path": str(tmp_path / "store.sqlite")},
    }
    if keys:
        base["optimizer"] = {
            "signing_key": str(tmp_path / "keys" / "plan.key"),
            "topology": str(tmp_path / "topology.json"),
        }
        base["reconciler"] = {"public_key": str(tmp_path / "keys" / "plan.pub")}
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    body = "".join(
        f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())
        for name, values in base.items()
    )
    p = tmp_path / "dcenergy.toml"
    p.write_text(body + text)
    return p


def problem_doc(**mutate: Any) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(EXAMPLE.read_text())
    doc.update(mutate)
    return doc


@pytest.fixture(scope="module")
def fleet_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An embedded store holding 10 minutes of a 2-node × 4-GPU simulated fleet, ending now."""
    root = tmp_path_factory.mktemp("fleet")
    db = root / "store.sqlite"
    store = EmbeddedStore(db)
    with SimFleet(
        nodes=2,
        gpus_per_node=4,
        store=store,
        state_root=root / "state",
        start_ns=time.time_ns() - int(600e9),
    ) as fleet:
        fleet.run(590)
    store.close()
    return db


def fleet_config(tmp_path: Path, db: Path, *, keys: bool = False) -> Path:
    return write_config(
        tmp_path, keys=keys, store={"embedded_path": str(db)}, optimizer={"window_s": 900}
    )


# --- tracebacks -----------------------------------------------------------------------


def test_a_non_utf8_config_file_is_a_config_error(tmp_path: Path, run: Run) -> None:
    p = tmp_path / "bad.toml"
    p.write_bytes(b"\xff\xfe[agent]\n")
    rc, _, err = run("--config", p, "config", "check")
    assert rc == EX_CONFIG
    one_error(err, "UTF-8", str(p))


def test_a_non_utf8_config_file_as_a_user_runs_it(tmp_path: Path) -> None:
    p = tmp_path / "bad.toml"
    p.write_bytes(b"\xff\xfe[agent]\n")
    r = subprocess.run(
        [*DCENERGY, "--config", str(p), "config", "check"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("DCENERGY_")},
    )
    assert r.returncode == EX_CONFIG
    one_error(r.stderr, "UTF-8")


def test_a_missing_ca_file_is_a_config_error(tmp_path: Path, run: Run) -> None:
    cfg = write_config(
        tmp_path,
        store={"influx_url": "https://127.0.0.1:1", "ca_file": str(tmp_path / "ca.pem")},
    )
    rc, _, err = run("-c", cfg, "recommend", "--budget", "1000")
    assert rc == EX_CONFIG
    one_error(err, "store.ca_file", "ca.pem", str(cfg))


def test_a_ca_file_that_is_not_pem_is_a_config_error(tmp_path: Path, run: Run) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not a certificate\n")
    cfg = write_config(tmp_path, store={"influx_url": "https://127.0.0.1:1", "ca_file": str(ca)})
    rc, _, err = run("-c", cfg, "recommend", "--budget", "1000")
    assert rc == EX_CONFIG
    one_error(err, "store.ca_file")


def test_a_state_dir_that_is_a_file_is_a_config_error(tmp_path: Path, run: Run) -> None:
    (tmp_path / "statefile").write_text("")
    cfg = write_config(tmp_path, agent={"state_dir": str(tmp_path / "statefile")})
    cfg.write_text(cfg.read_text().replace(f'embedded_path = "{tmp_path / "store.sqlite"}"', ""))
    for args in (
        ["recommend", "--budget", "1000"],
        ["simulate", "--nodes", "1", "--gpus", "1", "--duration", "10"],
        ["agent", "run", "--simulate", "1", "--duration", "0"],
    ):
        rc, _, err = run("-c", cfg, *args)
        assert rc == EX_CONFIG, args
        one_error(err, "agent.state_dir", "is a file")


@pytest.fixture
def unwritable_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder this process cannot write: a read-only tmpfs as root, mode 0500 otherwise."""
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() == 0:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(d)], check=False
        )
        if done.returncode != 0:
            pytest.skip("cannot mount a read-only tmpfs here (root inside a restricted container)")
        yield d
        subprocess.run(["umount", str(d)], check=False)
    else:
        d.chmod(0o500)
        yield d
        d.chmod(0o700)


def test_an_unwritable_state_dir_is_a_config_error(
    tmp_path: Path, run: Run, unwritable_dir: Path
) -> None:
    cfg = write_config(tmp_path, agent={"state_dir": str(unwritable_dir / "state")})
    cfg.write_text(cfg.read_text().replace(f'embedded_path = "{tmp_path / "store.sqlite"}"', ""))
    for args in (
        ["simulate", "--nodes", "1", "--gpus", "1", "--duration", "10"],
        ["agent", "run", "--simulate", "1", "--duration", "0"],
    ):
        rc, _, err = run("-c", cfg, *args)
        assert rc == EX_CONFIG, (args, err)
        one_error(err, "agent.state_dir")
        assert "not writable" in err or "Read-only" in err or "ermission" in err, err


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('{"version": 1, "gpus": [' + "9" * 5000 + "]}", ["5000 digits"]),
        ("[" * 100_000 + "]" * 100_000, ["nested too deeply"]),
        ('{"version": 1, "version": 1}', ["duplicate key 'version'"]),
        ('{"version": NaN}', ["NaN"]),
    ],
)
def test_a_hostile_problem_file_is_one_error(
    tmp_path: Path, run: Run, text: str, words: list[str]
) -> None:
    p = tmp_path / "problem.json"
    p.write_text(text)
    rc, _, err = run("optimize", p)
    assert rc == EX_DATAERR
    one_error(err, str(p), *words)


def test_a_non_utf8_problem_file_is_one_error(tmp_path: Path, run: Run) -> None:
    p = tmp_path / "problem.json"
    p.write_bytes(b'{"version": 1, "x": "\xff"}')
    rc, _, err = run("optimize", p)
    assert rc == EX_DATAERR
    one_error(err, "UTF-8")


def test_a_deep_array_as_a_user_runs_it(tmp_path: Path) -> None:
    p = tmp_path / "problem.json"
    p.write_text("[" * 100_000 + "]" * 100_000)
    r = subprocess.run(
        [*DCENERGY, "optimize", str(p)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == EX_DATAERR
    one_error(r.stderr, "nested too deeply")


def test_method_fast_on_the_example_falls_back_to_the_lp(run: Run) -> None:
    rc, out, err = run("optimize", EXAMPLE, "--method", "fast", "--json")
    assert rc == 0
    assert json.loads(out)["solver"]["method"] == "lp"
    assert err.strip().startswith("note: --method fast does not apply")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("where", ["missing folder", "a folder"])
def test_output_into_a_missing_folder_or_at_a_folder(
    tmp_path: Path, run: Run, fleet_db: Path, where: str
) -> None:
    target = tmp_path / "nope" / "plan.json" if where == "missing folder" else tmp_path
    rc, out, err = run("optimize", EXAMPLE, "-o", target)
    assert rc == EX_CANTCREAT
    one_error(err, str(target))
    assert out == ""  # refused before solving
    cfg = fleet_config(tmp_path, fleet_db)
    for option in ("-o", "--save-problem"):
        rc, out, err = run("-c", cfg, "recommend", "--budget", "3800", option, target)
        assert rc == EX_CANTCREAT, option
        one_error(err, str(target))


# --- silently accepted ----------------------------------------------------------------


def test_an_override_with_a_section_typo_is_an_error(
    tmp_path: Path, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = write_config(tmp_path)
    monkeypatch.setenv("DCENERGY_STOR_INFLUX_URL", "http://db:8086")
    rc, _, err = run("-c", cfg, "config", "check")
    assert rc == EX_CONFIG
    one_error(err, "DCENERGY_STOR_INFLUX_URL", "hint: fix or unset the environment variable")
    monkeypatch.delenv("DCENERGY_STOR_INFLUX_URL")
    monkeypatch.setenv("DCENERGY_STORE_INFLUXURL", "http://db:8086")  # a key typo: as before
    rc, _, err = run("-c", cfg, "config", "check")
    assert rc == EX_CONFIG
    one_error(err, "store.influxurl", "hint: fix the environment variable DCENERGY_STORE_INFLUXURL")


def test_other_dcenergy_variables_are_not_overrides(
    tmp_path: Path, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DCENERGY_JOBS_DIR", str(tmp_path))
    monkeypatch.setenv("DCENERGY_INFLUX_URL", "http://grafana-side:8086")
    rc, _, _ = run("-c", write_config(tmp_path), "config", "check", "--json")
    assert rc == 0


def test_an_unknown_topology_field_is_refused_with_its_path(
    tmp_path: Path, run: Run, fleet_db: Path
) -> None:
    topo = {
        "version": 1,
        "domains": [{"id": "room", "kind": "facility", "budget_w": 3800}],
        "hosts": {"node-1": {"domains": ["room"], "budget": 1500}},
        "default_domains": ["room"],
    }
    tp = tmp_path / "topology.json"
    tp.write_text(json.dumps(topo))
    rc, _, err = run("-c", fleet_config(tmp_path, fleet_db), "recommend", "--topology", tp)
    assert rc == EX_DATAERR
    one_error(err, "hosts.node-1.budget", "unknown field")


def test_duplicate_keys_in_a_topology_and_a_plan_are_refused(tmp_path: Path, run: Run) -> None:
    tp = tmp_path / "topology.json"
    tp.write_text('{"version": 1, "domains": [{"id": "a", "budget_w": 1, "budget_w": 2}]}')
    cfg = write_config(tmp_path)
    rc, _, err = run("-c", cfg, "recommend", "--topology", tp)
    assert rc == EX_DATAERR
    one_error(err, "duplicate key 'budget_w'")
    plan = tmp_path / "plan.json"
    plan.write_text('{"plan_id": "a", "plan_id": "b"}')
    rc, _, err = run("-c", cfg, "apply", plan)
    assert rc == EX_DATAERR
    one_error(err, "duplicate key 'plan_id'")


def test_topology_hosts_and_telemetry_hosts_that_do_not_match_are_warned(
    tmp_path: Path, run: Run, fleet_db: Path
) -> None:
    topo = {
        "version": 1,
        "domains": [{"id": "room", "kind": "facility", "budget_w": 3800}],
        "hosts": {"node-1": {"domains": ["room"]}, "ghost-7": {"domains": ["room"]}},
        "default_domains": ["room"],
    }
    tp = tmp_path / "topology.json"
    tp.write_text(json.dumps(topo))
    rc, _, err = run("-c", fleet_config(tmp_path, fleet_db), "recommend", "--topology", tp)
    assert rc in (0, EX_INFEASIBLE)
    warned = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warned) == 2, err
    assert "ghost-7" in warned[0] and "sent no GPU telemetry" in warned[0]
    assert "node-2" in warned[1] and "not in the topology" in warned[1]


def test_topology_with_budget_is_refused(tmp_path: Path, run: Run) -> None:
    rc, _, err = run(
        "-c", write_config(tmp_path), "recommend", "--budget", "1000", "--topology", "t.json"
    )
    assert rc == EX_USAGE
    one_error(err, "--budget and --topology exclude each other")


def _seed(db: Path, *gpus: tuple[str, str]) -> None:
    store = EmbeddedStore(db)
    store.write(
        [
            schema.point(
                schema.GPU,
                {"host": host, "gpu": str(i), "gpu_uuid": uuid, "model": "H100"},
                {"power_limit_w": 700.0, "power_limit_min_w": 200.0, "power_limit_max_w": 700.0},
                time.time_ns() - 10 * S,
            )
            for i, (host, uuid) in enumerate(gpus)
        ]
    )
    store.close()


def _plan(tmp_path: Path, *setpoints: tuple[str, str, float], **kw: Any) -> Path:
    now = time.time_ns()
    doc: dict[str, Any] = {
        "plan_id": "p-1",
        "created_ns": now,
        "expires_ns": now + 900 * S,
        "setpoints": [{"host": h, "gpu": g, "power_limit_w": w} for h, g, w in setpoints],
    }
    doc.update(kw)
    p = tmp_path / "plan.json"
    p.write_text(json.dumps(doc))
    return p


@pytest.fixture
def keyed(tmp_path: Path) -> Path:
    """A config with a key pair and a store that saw GPU-a on n1 (limits 200-700 W)."""
    generate_keypair(tmp_path / "keys" / "plan.key", tmp_path / "keys" / "plan.pub")
    _seed(tmp_path / "store.sqlite", ("n1", "GPU-a"))
    return write_config(tmp_path, keys=True)


@pytest.mark.parametrize(
    ("setpoint", "words"),
    [
        (("n1", "GPU-a", 5000.0), ["setpoints[0].power_limit_w", "above", "700 W"]),
        (("n1", "GPU-a", 50.0), ["setpoints[0].power_limit_w", "below", "200 W"]),
        (("n9", "GPU-a", 300.0), ["setpoints[0].host", "'n9'"]),
        (("n1", "GPU-zz", 300.0), ["setpoints[0].gpu", "GPU-zz"]),
    ],
)
def test_apply_refuses_what_the_fleet_cannot_take_unless_forced(
    tmp_path: Path, keyed: Path, run: Run, setpoint: tuple[str, str, float], words: list[str]
) -> None:
    plan = _plan(tmp_path, setpoint)
    rc, _, err = run("-c", keyed, "apply", plan)
    assert rc == EX_DATAERR
    one_error(err, *words, "--force")
    store = EmbeddedStore(tmp_path / "store.sqlite")
    try:
        assert store.count(schema.PLAN_PART.name) == 0
    finally:
        store.close()
    rc, _, err = run("-c", keyed, "apply", "--dry-run", plan)
    assert rc == 0 and "would refuse" in err
    rc, _, _ = run("-c", keyed, "apply", "--force", plan)
    assert rc == 0
    store = EmbeddedStore(tmp_path / "store.sqlite")
    try:
        assert fetch_latest_part(store, setpoint[0], time.time_ns(), 3600) is not None
    finally:
        store.close()


def test_apply_publishes_a_plan_the_fleet_can_take(tmp_path: Path, keyed: Path, run: Run) -> None:
    rc, out, _ = run("-c", keyed, "apply", _plan(tmp_path, ("n1", "GPU-a", 450.0)))
    assert rc == 0 and "published plan p-1" in out


def test_apply_with_a_line_break_in_the_plan_id_is_bad_input(
    tmp_path: Path, keyed: Path, run: Run
) -> None:
    rc, _, err = run("-c", keyed, "apply", _plan(tmp_path, ("n1", "GPU-a", 450.0), plan_id="a\nb"))
    assert rc == EX_DATAERR
    one_error(err, "plan_id", "line break")


# --- exit codes -----------------------------------------------------------------------


def test_an_infeasible_problem_exits_3_and_still_writes_the_plan(tmp_path: Path, run: Run) -> None:
    doc = problem_doc()
    doc["domains"][0]["budget_w"] = 2000  # 16 GPUs at >= 200 W plus 1200 W baseline
    p = tmp_path / "problem.json"
    p.write_text(json.dumps(doc))
    out_file = tmp_path / "plan.json"
    rc, out, err = run("optimize", p, "-o", out_file)
    assert rc == EX_INFEASIBLE
    one_error(err, "facility", "best-effort plan")
    assert "Domains" in out
    assert json.loads(out_file.read_text())["solver"]["feasible"] is False


def test_an_infeasible_recommend_exits_3_and_still_prints_the_plan(
    tmp_path: Path, run: Run, fleet_db: Path
) -> None:
    rc, out, err = run("-c", fleet_config(tmp_path, fleet_db), "recommend", "--budget", "100")
    assert rc == EX_INFEASIBLE
    one_error(err, "fleet", "best-effort")
    assert out


def test_an_infeasible_optimizer_run_once_exits_3(tmp_path: Path, run: Run, fleet_db: Path) -> None:
    generate_keypair(tmp_path / "keys" / "plan.key", tmp_path / "keys" / "plan.pub")
    topo = {"version": 1, "domains": [{"id": "room", "budget_w": 100}], "default_domains": ["room"]}
    (tmp_path / "topology.json").write_text(json.dumps(topo))
    db = tmp_path / "copy.sqlite"
    db.write_bytes(fleet_db.read_bytes())  # the run publishes: keep the shared store clean
    rc, out, err = run("-c", fleet_config(tmp_path, db, keys=True), "optimizer", "run", "--once")
    assert rc == EX_INFEASIBLE
    assert "published plan" in out
    one_error(err, "best effort")


def test_simulate_into_an_unreachable_store_exits_69(tmp_path: Path, run: Run) -> None:
    cfg = write_config(tmp_path, store={"influx_url": "http://127.0.0.1:1", "timeout_s": 1})
    rc, out, err = run("-c", cfg, "simulate", "--nodes", "1", "--gpus", "1", "--duration", "30")
    assert rc == EX_UNAVAILABLE
    assert "points left in the spools" in out
    error = [line for line in err.splitlines() if line.startswith("dcenergy: error:")]
    assert len(error) == 1 and "could not be written" in error[0]
    assert "Traceback" not in err


def test_no_telemetry_exits_4_and_creates_nothing(tmp_path: Path, run: Run) -> None:
    cfg = tmp_path / "dcenergy.toml"
    cfg.write_text(f'[agent]\nstate_dir = "{tmp_path / "state"}"\n')
    rc, _, err = run("-c", cfg, "recommend", "--budget", "1000")
    assert rc == EX_NO_TELEMETRY
    one_error(err, "no GPU telemetry")
    assert not (tmp_path / "state").exists()


def test_an_empty_store_exits_4(tmp_path: Path, run: Run) -> None:
    EmbeddedStore(tmp_path / "store.sqlite").close()
    rc, _, err = run("-c", write_config(tmp_path), "recommend", "--budget", "1000")
    assert rc == EX_NO_TELEMETRY
    one_error(err, "no GPU telemetry")


# --- messages -------------------------------------------------------------------------


def test_a_bad_flag_is_hinted_as_a_flag(tmp_path: Path, run: Run) -> None:
    rc, _, err = run("-c", write_config(tmp_path), "recommend", "--budget", "-5")
    assert rc == EX_CONFIG
    line = one_error(err, "hint: pass a valid --budget")
    assert "option '--budget'" in line and "config file" not in err


def test_a_bad_file_key_is_hinted_with_the_file(tmp_path: Path, run: Run) -> None:
    cfg = write_config(tmp_path, agent={"interval_s": -1})
    rc, _, err = run("-c", cfg, "config", "check")
    assert rc == EX_CONFIG
    one_error(err, f"hint: fix 'agent.interval_s' in {cfg}")


def test_a_bad_env_key_is_hinted_with_the_variable(
    tmp_path: Path, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DCENERGY_AGENT_INTERVAL_S", "-1")
    rc, _, err = run("-c", write_config(tmp_path), "config", "check")
    assert rc == EX_CONFIG
    one_error(err, "hint: fix the environment variable DCENERGY_AGENT_INTERVAL_S")


def test_a_signing_key_that_is_a_folder_or_the_public_key(
    tmp_path: Path, keyed: Path, run: Run
) -> None:
    plan = _plan(tmp_path, ("n1", "GPU-a", 450.0))
    for key, words in (
        (tmp_path, ["is a folder"]),
        (tmp_path / "keys" / "plan.pub", ["is a public key"]),
    ):
        cfg = write_config(tmp_path, keys=True, optimizer={"signing_key": str(key)})
        rc, _, err = run("-c", cfg, "apply", plan)
        assert rc == EX_CONFIG
        one_error(err, "optimizer.signing_key", *words)
        assert "chmod" not in err


def test_a_web_page_from_a_server_that_is_not_influxdb_is_one_line() -> None:
    page = "<html>\n<head><title>Sign in</title></head>\n<body>" + "welcome " * 500 + "</body>"

    def answer(status: int) -> httpx.MockTransport:
        return httpx.MockTransport(
            lambda req: httpx.Response(status, text=page, headers={"content-type": "text/html"})
        )

    for status, outcome in ((502, WriteOutcome.UNAVAILABLE), (200, WriteOutcome.UNAVAILABLE)):
        store = InfluxStore("http://proxy.test", "db", transport=answer(status))
        result = store.write_lines(b"m f=1 1\n")
        assert result.outcome is outcome, status  # a 200 web page stored nothing: keep the data
        assert "\n" not in result.message and len(result.message) < 300
        assert "Sign in" in result.message and "welcome" not in result.message


def test_recommend_apply_json_prints_one_json_document(
    tmp_path: Path, run: Run, fleet_db: Path
) -> None:
    generate_keypair(tmp_path / "keys" / "plan.key", tmp_path / "keys" / "plan.pub")
    db = tmp_path / "copy.sqlite"
    db.write_bytes(fleet_db.read_bytes())
    cfg = fleet_config(tmp_path, db, keys=True)
    rc, out, err = run("-c", cfg, "recommend", "--budget", "3800", "--json", "--apply")
    assert rc == 0
    assert json.loads(out)["setpoints"]  # the whole of stdout is the plan
    assert "published plan" in err


# --- config check ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setup", "words"),
    [
        ("topology", ["optimizer.topology", "an existing topology file"]),
        ("signing_key", ["optimizer.signing_key", "an existing key file"]),
        ("public_key", ["reconciler.public_key", "an existing key file"]),
        ("ca_file", ["store.ca_file", "CA bundle"]),
        ("token_0644", ["store.token_file", "chmod 600"]),
        ("bad_topology", ["topology.json", "unknown field"]),
    ],
)
def test_config_check_checks_every_file_the_config_names(
    tmp_path: Path, run: Run, setup: str, words: list[str]
) -> None:
    generate_keypair(tmp_path / "keys" / "plan.key", tmp_path / "keys" / "plan.pub")
    (tmp_path / "topology.json").write_text(
        json.dumps({"version": 1, "domains": [{"id": "room", "budget_w": 1000}]})
    )
    store: dict[str, Any] = {}
    if setup == "topology":
        (tmp_path / "topology.json").unlink()
    elif setup == "signing_key":
        (tmp_path / "keys" / "plan.key").unlink()
    elif setup == "public_key":
        (tmp_path / "keys" / "plan.pub").unlink()
    elif setup == "ca_file":
        store = {"influx_url": "https://db:8086", "ca_file": str(tmp_path / "ca.pem")}
    elif setup == "token_0644":
        token = tmp_path / "token"
        token.write_text("t\n")
        token.chmod(0o644)
        store = {"influx_url": "http://db:8086", "token_file": str(token)}
    elif setup == "bad_topology":
        (tmp_path / "topology.json").write_text('{"version": 1, "domainz": []}')
    cfg = write_config(tmp_path, keys=True, store=store)
    rc, out, err = run("-c", cfg, "config", "check")
    assert rc in (EX_CONFIG, EX_DATAERR)
    one_error(err, *words)
    assert "# error" in out


def test_config_check_passes_a_complete_config_and_names_what_it_checked(
    tmp_path: Path, run: Run
) -> None:
    generate_keypair(tmp_path / "keys" / "plan.key", tmp_path / "keys" / "plan.pub")
    (tmp_path / "topology.json").write_text(
        json.dumps({"version": 1, "domains": [{"id": "room", "budget_w": 1000}]})
    )
    cfg = write_config(tmp_path, keys=True)
    rc, out, err = run("-c", cfg, "config", "check", "--json", "--connect")
    assert rc == 0, err
    checks = {c["key"]: c["status"] for c in json.loads(out)["checks"]}
    assert checks == {
        "agent.state_dir": "ok",
        "optimizer.topology": "ok",
        "optimizer.signing_key": "ok",
        "reconciler.public_key": "ok",
        "store": "ok",
    }


def test_config_check_connect_to_an_unreachable_store_exits_69(tmp_path: Path, run: Run) -> None:
    cfg = write_config(tmp_path, store={"influx_url": "http://127.0.0.1:1", "timeout_s": 1})
    rc, _, err = run("-c", cfg, "config", "check", "--connect")
    assert rc == EX_UNAVAILABLE
    one_error(err, "127.0.0.1:1")


@pytest.mark.influxdb
def test_config_check_connect_reaches_a_real_influxdb(
    tmp_path: Path, run: Run, influxd: InfluxServer, influx_db: str
) -> None:
    cfg = write_config(tmp_path, store={"influx_url": influxd.url, "database": influx_db})
    rc, out, err = run("-c", cfg, "config", "check", "--connect")
    assert rc == 0, err
    assert "# ok     store" in out


# --- global options -------------------------------------------------------------------


def test_global_options_work_after_the_subcommand(tmp_path: Path, run: Run) -> None:
    cfg = write_config(tmp_path)
    rc, out, _ = run("config", "check", "--json", "--config", cfg, "-v")
    assert rc == 0
    assert json.loads(out)["source"] == str(cfg)
    p = tmp_path / "problem.json"
    p.write_text("{")
    with pytest.raises(ProblemError):  # --debug after the subcommand: the real exception
        main(["optimize", str(p), "--debug"])


def test_version(run: Run) -> None:
    from importlib.metadata import version

    rc, out, _ = run("--version")
    assert rc == 0 and out.strip() == f"dcenergy {version('dcenergy')}"


# --- noise ----------------------------------------------------------------------------


def test_no_powercap_is_one_info_line_not_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    reader = RaplReader(tmp_path / "no-powercap")
    with caplog.at_level(logging.DEBUG, logger="agent.rapl"):
        for t in range(3):
            assert reader.power_w(float(t)) == (None, None)
    assert [r.levelno for r in caplog.records] == [logging.INFO]
    assert reader.errors_total == 0


def test_baselines_for_a_gpu_in_no_domain_warn_nothing() -> None:
    from optimizer.baselines import evaluate_baselines
    from optimizer.problem import parse_problem

    doc = problem_doc()
    doc["gpus"][0]["domains"] = []
    idle = dict(doc["gpus"][-1], id="GPU-idle", domains=[])
    doc["gpus"].append(idle)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = evaluate_baselines(parse_problem(doc))
    assert set(result) == {"none", "uniform", "proportional"}


# --- config item 2: names the line protocol and InfluxDB accept ------------------------


@pytest.mark.parametrize(
    ("host", "words"),
    [
        ("node-1\\", ["backslash"]),
        ("node\n1", ["line break"]),
        ("rack\\,node", ["backslash"]),
        ("n" * 300, ["longer than 253 bytes"]),
    ],
)
def test_a_host_name_influxdb_cannot_store_is_a_config_error(
    tmp_path: Path, run: Run, host: str, words: list[str]
) -> None:
    cfg = write_config(tmp_path, agent={"host": host})
    rc, _, err = run("-c", cfg, "config", "check")
    assert rc == EX_CONFIG
    one_error(err, "agent.host", *words)
