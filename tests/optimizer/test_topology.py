from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dcenergy.errors import InputError
from optimizer.topology import load_topology, parse_topology

EXAMPLE = Path(__file__).parents[2] / "docs" / "examples" / "topology.json"


def test_example_loads_and_resolves_ancestors_and_node_domains() -> None:
    topo = load_topology(EXAMPLE)
    assert topo.domains_of("node-1") == ("node:node-1", "rack-a1", "row-a", "facility", "feed-a")
    assert topo.domains_of("node-3") == ("rack-a2", "row-a", "facility", "feed-a")
    assert topo.domains_of("unlisted") == ("facility",)
    node = next(d for d in topo.domains if d.id == "node:node-1")
    assert (node.budget_w, node.baseline_w, node.kind) == (6500.0, 900.0, "node")


def base() -> dict[str, Any]:
    return json.loads(EXAMPLE.read_text())


@pytest.mark.parametrize(
    ("mutate", "field", "words"),
    [
        (lambda t: t.update(version=2), "version", "expected 1"),
        (lambda t: t["domains"][0].update(budget_w=0), "domains[0].budget_w", "> 0"),
        (lambda t: t["domains"][0].update(budget_w="lots"), "domains[0].budget_w", "finite"),
        (lambda t: t["domains"][1].update(id="facility"), "domains[1].id", "duplicate"),
        (lambda t: t["domains"][1].update(parent="nowhere"), "domains[1].parent", "unknown"),
        (lambda t: t["domains"][0].update(parent="row-a"), "domains[0].parent", "loops"),
        (lambda t: t["hosts"]["node-1"].update(domains=["x"]), "hosts.node-1.domains", "unknown"),
        (lambda t: t["hosts"]["node-1"].update(budget_w=-5), "hosts.node-1.budget_w", ">"),
        (lambda t: t.update(default_domains=["x"]), "default_domains", "known"),
        (lambda t: t["domains"][0].update(kind="moon"), "domains[0].kind", "rack"),
    ],
)
def test_each_bad_field_is_named(mutate: Any, field: str, words: str) -> None:
    t = base()
    mutate(t)
    with pytest.raises(InputError) as e:
        parse_topology(t, "topo.json")
    assert e.value.field == field
    assert words in str(e.value)


def test_bad_json_names_line(tmp_path: Path) -> None:
    p = tmp_path / "t.json"
    p.write_text('{"version": 1,\n "domains": [}\n')
    with pytest.raises(InputError, match="line 2"):
        load_topology(p)
