"""Problem parsing: a valid document round-trips; every malformed one names its field."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dcenergy.errors import EX_DATAERR, ProblemError
from optimizer.problem import load_problem, parse_problem, problem_to_json

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "problem.json"


def valid_doc() -> dict[str, Any]:
    return {
        "version": 1,
        "domains": [
            {"id": "rack", "budget_w": 1000, "baseline_w": 100, "kind": "rack"},
            {"id": "node", "budget_w": 900},
        ],
        "gpus": [
            {
                "id": f"g{i}",
                "host": "n1",
                "model": "H100",
                "min_w": 100,
                "max_w": 400,
                "default_w": 400,
                "idle_w": 50,
                "domains": ["rack", "node"],
            }
            for i in range(3)
        ],
        "jobs": [
            {
                "id": "train",
                "gpus": ["g0", "g1"],
                "synchronous": True,
                "samples": [{"cap_w": 200, "throughput": 10}, {"power_w": 390, "throughput": 15}],
            }
        ],
        "objective": {"kind": "budget"},
    }


def test_valid_document_parses_with_defaults() -> None:
    p = parse_problem(valid_doc())
    assert len(p.gpus) == 3 and p.domain("node").baseline_w == 0.0
    job = p.jobs[0]
    assert job.weight == 1.0 and job.allowed_slowdown == 0.1 and job.synchronous
    assert p.objective.pue == 1.0
    assert p.job_of_gpu == {"g0": "train", "g1": "train"}


def test_round_trip() -> None:
    p = parse_problem(valid_doc())
    assert parse_problem(json.loads(json.dumps(problem_to_json(p)))) == p


def test_example_file_loads_and_round_trips() -> None:
    p = load_problem(EXAMPLE)
    assert len(p.gpus) == 16 and {d.kind for d in p.domains} >= {"facility", "rack", "node", "feed"}
    assert parse_problem(problem_to_json(p)) == p


def test_consolidation_section_is_left_alone() -> None:
    doc = valid_doc()
    doc["consolidation"] = {"anything": 1}
    parse_problem(doc)


def _set(path: list[Any], value: Any) -> Callable[[dict[str, Any]], None]:
    def apply(doc: dict[str, Any]) -> None:
        o: Any = doc
        for k in path[:-1]:
            o = o[k]
        o[path[-1]] = value

    return apply


def _del(path: list[Any]) -> Callable[[dict[str, Any]], None]:
    def apply(doc: dict[str, Any]) -> None:
        o: Any = doc
        for k in path[:-1]:
            o = o[k]
        del o[path[-1]]

    return apply


MALFORMED: dict[str, tuple[Callable[[dict[str, Any]], None], str, str]] = {
    "missing version": (_del(["version"]), "version", "missing"),
    "wrong version": (_set(["version"], 2), "version", "unsupported"),
    "missing gpus": (_del(["gpus"]), "gpus", "missing"),
    "gpus not array": (_set(["gpus"], {}), "gpus", "array"),
    "no gpus": (_set(["gpus"], []), "gpus", "at least one"),
    "missing max_w": (_del(["gpus", 2, "max_w"]), "gpus[2].max_w", "missing"),
    "max_w wrong type": (_set(["gpus", 1, "max_w"], "400"), "gpus[1].max_w", "number"),
    "max_w bool": (_set(["gpus", 1, "max_w"], True), "gpus[1].max_w", "number"),
    "negative idle": (_set(["gpus", 0, "idle_w"], -1), "gpus[0].idle_w", ">= 0"),
    "NaN power": (_set(["gpus", 0, "min_w"], float("nan")), "gpus[0].min_w", "finite"),
    "min above max": (_set(["gpus", 0, "min_w"], 500), "gpus[0].min_w", "above max_w"),
    "default outside": (_set(["gpus", 0, "default_w"], 450), "gpus[0].default_w", "outside"),
    "unknown domain": (
        _set(["gpus", 1, "domains"], ["rack", "nope"]),
        "gpus[1].domains[1]",
        "unknown domain",
    ),
    "duplicate gpu": (_set(["gpus", 2, "id"], "g0"), "gpus[2].id", "duplicate"),
    "duplicate domain": (_set(["domains", 1, "id"], "rack"), "domains[1].id", "duplicate"),
    "zero budget": (_set(["domains", 0, "budget_w"], 0), "domains[0].budget_w", "> 0"),
    "unknown kind": (_set(["domains", 0, "kind"], "planet"), "domains[0].kind", "unknown kind"),
    "unknown field": (_set(["domains", 0, "budget"], 5), "domains[0].budget", "unknown field"),
    "unknown gpu in job": (
        _set(["jobs", 0, "gpus"], ["g0", "gx"]),
        "jobs[0].gpus[1]",
        "unknown GPU",
    ),
    "gpu in two jobs": (
        _set(["jobs", 1], {"id": "b", "gpus": ["g2", "g1"], "samples": []}),
        "jobs[1].gpus[1]",
        "already in job 'train'",
    ),
    "duplicate job": (
        _set(["jobs", 1], {"id": "train", "gpus": ["g2"]}),
        "jobs[1].id",
        "duplicate",
    ),
    "slowdown 1": (
        _set(["jobs", 0, "allowed_slowdown"], 1.0),
        "jobs[0].allowed_slowdown",
        "[0, 1)",
    ),
    "slowdown negative": (
        _set(["jobs", 0, "allowed_slowdown"], -0.1),
        "jobs[0].allowed_slowdown",
        ">= 0",
    ),
    "sync not bool": (
        _set(["jobs", 0, "synchronous"], "yes"),
        "jobs[0].synchronous",
        "true or false",
    ),
    "sample without x": (
        _set(["jobs", 0, "samples", 0], {"throughput": 3}),
        "jobs[0].samples[0]",
        "cap_w or power_w",
    ),
    "sample negative throughput": (
        _set(["jobs", 0, "samples", 1, "throughput"], -3),
        "jobs[0].samples[1].throughput",
        ">= 0",
    ),
    "unknown objective": (
        _set(["objective", "kind"], "speed"),
        "objective.kind",
        "unknown objective",
    ),
    "pue below 1": (_set(["objective", "pue"], 0.9), "objective.pue", ">= 1"),
    "confidence too low": (
        _set(["objective", "slowdown_confidence"], 0.4),
        "objective.slowdown_confidence",
        "[0.5, 0.999]",
    ),
    "confidence certain": (
        _set(["objective", "slowdown_confidence"], 1.0),
        "objective.slowdown_confidence",
        "[0.5, 0.999]",
    ),
    "missing objective": (_del(["objective"]), "objective", "missing"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_problem_names_its_field(case: str) -> None:
    mutate, field, words = MALFORMED[case]
    doc = copy.deepcopy(valid_doc())
    if case in ("gpu in two jobs", "duplicate job"):
        doc["jobs"].append({})
    mutate(doc)
    with pytest.raises(ProblemError) as ei:
        parse_problem(doc, source="p.json")
    assert ei.value.field == field, str(ei.value)
    assert words in ei.value.problem, str(ei.value)
    assert str(ei.value).startswith("p.json: field")
    assert ei.value.exit_code == EX_DATAERR


def test_sync_job_with_disjoint_ranges_is_refused() -> None:
    doc = valid_doc()
    doc["gpus"][1]["min_w"] = 300
    doc["gpus"][0]["max_w"] = 250
    doc["gpus"][0]["default_w"] = 250
    with pytest.raises(ProblemError) as ei:
        parse_problem(doc)
    assert ei.value.field == "jobs[0].gpus"


def test_overlapping_domains_are_fine() -> None:
    doc = valid_doc()
    doc["domains"].append({"id": "feed-a", "budget_w": 500, "kind": "feed"})
    doc["gpus"][0]["domains"] = ["rack", "feed-a"]
    doc["gpus"][2]["domains"] = ["node", "feed-a"]
    parse_problem(doc)


def test_bad_json_reports_line_and_column(tmp_path: Path) -> None:
    f = tmp_path / "p.json"
    f.write_text('{\n  "version": 1,\n  "gpus": [,]\n}\n')
    with pytest.raises(ProblemError) as ei:
        load_problem(f)
    assert "line 3 column" in ei.value.problem
    assert ei.value.path == str(f)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ProblemError) as ei:
        load_problem(tmp_path / "absent.json")
    assert "cannot read" in ei.value.problem
