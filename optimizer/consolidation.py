"""Job consolidation: move jobs onto fewer GPUs and nodes so idle hardware can be powered down.

Pure: a :class:`ConsolidationProblem` in, a :class:`ConsolidationResult` out; no IO.

Power model (IT power, watts, before PUE):

* a powered node draws ``node_idle_w`` (CPUs, fans, and its GPUs while nobody holds them);
* every GPU that holds at least one job adds ``gpu_idle_w`` (context resident, clocks up);
* a job adds ``gpus * util * gpu_active_w_per_util`` of the node it runs on.

Moving a job to another node costs ``migration_cost_wh`` (IT energy, checkpoint and restart),
spread over the horizon, so the objective is one number in watts::

    objective_w = power_after_w + sum(migration_cost_wh of moved jobs) / horizon_h

Prices, PUE and carbon intensity scale every term alike, so they only convert the result.

Solvers: an exact MILP (``scipy.optimize.milp``, HiGHS) for instances up to a size
threshold, a greedy (first-fit decreasing plus "empty the least-loaded node" improvement)
for the rest and as the fallback. Sharing of GPUs by shareable single-GPU jobs is the only
part the MILP approximates: it counts shared GPU slots with an aggregate (fractional
bin-packing) constraint; the actual packing is done afterwards and repaired if it needs more
GPUs than the node has. The lower bound is the LP relaxation (``integrality=0``) of a model
that relaxes the true problem, so it is a valid bound for every result. See
``docs/consolidation.md``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import numpy as np
from numpy.typing import NDArray
from scipy.optimize import Bounds, LinearConstraint, OptimizeResult, milp
from scipy.sparse import coo_array

from dcenergy.errors import ProblemError

Method = Literal["auto", "milp", "greedy"]

#: A shareable job occupies at least this fraction of a GPU (at most 100 jobs per GPU), so a
#: job reporting 0 utilization and 0 memory still needs a powered GPU somewhere.
MIN_SHARED_UTIL: Final = 0.01
#: ``method="auto"`` runs the MILP only when it has at most this many (job, node) pairs.
DEFAULT_MILP_MAX_PAIRS: Final = 5_000
#: Above this many pairs even ``method="milp"`` runs the greedy only: HiGHS's presolve
#: ignores the time limit on big models (1 s asked, 17 s taken at 190,000 pairs).
MILP_HARD_MAX_PAIRS: Final = 50_000
_EPS: Final = 1e-9
_HOURS_PER_DAY: Final = 24.0


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConsolidationJob:
    """One running job: what it needs and where it runs now."""

    id: str
    gpus: int
    mem_per_gpu_gb: float
    util: float
    node: str
    shareable: bool = False
    gpu_indices: tuple[int, ...] | None = None
    migration_cost_wh: float = 0.0
    pinned: bool = False

    @property
    def packs(self) -> bool:
        """Only single-GPU shareable jobs share GPUs; a multi-GPU job always gets whole GPUs."""
        return self.shareable and self.gpus == 1


@dataclass(frozen=True, slots=True)
class ConsolidationNode:
    """One GPU server and its power characteristics."""

    id: str
    gpus: int
    mem_per_gpu_gb: float
    node_idle_w: float
    gpu_idle_w: float
    gpu_active_w_per_util: float
    may_power_down: bool = False


@dataclass(frozen=True, slots=True)
class ConsolidationProblem:
    """The ``"consolidation"`` section of a problem file, validated."""

    nodes: tuple[ConsolidationNode, ...]
    jobs: tuple[ConsolidationJob, ...]
    horizon_h: float
    price_per_kwh: float
    pue: float
    carbon_g_per_kwh: float


@dataclass(frozen=True, slots=True)
class Move:
    """A job that changes node."""

    job: str
    from_node: str
    to_node: str


@dataclass(frozen=True, slots=True)
class ConsolidationResult:
    """What consolidation recommends and what it saves.

    ``kwh_day``, ``cost_day`` and ``co2_kg_day`` are savings per day at the facility (IT
    savings times PUE); the one-off ``migration_cost_wh`` is reported apart. ``layout`` lists,
    for every node left on, the jobs on each of its used GPUs (logical GPUs: the scheduler
    maps them onto physical indices).
    """

    moves: tuple[Move, ...]
    gpus_freed: int
    nodes_freed: tuple[str, ...]
    power_before_w: float
    power_after_w: float
    savings_w: float
    migration_cost_wh: float
    objective_w: float
    kwh_day: float
    cost_day: float
    co2_kg_day: float
    method: Literal["milp", "greedy"]
    status: str
    gap: float
    lower_bound_w: float
    time_s: float
    layout: Mapping[str, tuple[tuple[str, ...], ...]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The plan's ``"consolidation"`` entry (JSON-safe: an infinite gap becomes null)."""
        return {
            "moves": [
                {"job": m.job, "from_node": m.from_node, "to_node": m.to_node} for m in self.moves
            ],
            "gpus_freed": self.gpus_freed,
            "nodes_freed": list(self.nodes_freed),
            "power_before_w": self.power_before_w,
            "power_after_w": self.power_after_w,
            "savings_w": self.savings_w,
            "migration_cost_wh": self.migration_cost_wh,
            "objective_w": self.objective_w,
            "kwh_day": self.kwh_day,
            "cost_day": self.cost_day,
            "co2_kg_day": self.co2_kg_day,
            "method": self.method,
            "status": self.status,
            "gap": self.gap if math.isfinite(self.gap) else None,
            "lower_bound_w": self.lower_bound_w,
            "time_s": self.time_s,
            "layout": {node: [list(gpu) for gpu in gpus] for node, gpus in self.layout.items()},
        }


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------

_TOP_KEYS: Final = frozenset(
    {"nodes", "jobs", "horizon_h", "price_per_kwh", "pue", "carbon_g_per_kwh"}
)
_NODE_KEYS: Final = frozenset(
    {"id", "gpus", "mem_per_gpu_gb", "node_idle_w", "gpu_idle_w", "gpu_active_w_per_util",
     "may_power_down"}
)  # fmt: skip
_JOB_KEYS: Final = frozenset(
    {"id", "gpus", "mem_per_gpu_gb", "util", "node", "shareable", "gpu_indices",
     "migration_cost_wh", "pinned"}
)  # fmt: skip
_MISSING: Final = object()


class _Reader:
    """Reads typed fields out of one JSON object, naming the full path in every error."""

    def __init__(self, source: str, path: str, obj: object, allowed: frozenset[str]) -> None:
        self.source = source
        self.path = path
        if not isinstance(obj, dict):
            raise ProblemError(source, path or "consolidation", "expected an object")
        self.obj: dict[str, Any] = obj
        for key in obj:
            if key not in allowed:
                raise ProblemError(source, self.at(str(key)), "unknown field")

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def fail(self, key: str, problem: str) -> ProblemError:
        return ProblemError(self.source, self.at(key), problem)

    def get(self, key: str, default: object = _MISSING) -> Any:
        if key not in self.obj:
            if default is _MISSING:
                raise self.fail(key, "missing")
            return default
        return self.obj[key]

    def number(
        self,
        key: str,
        *,
        lo: float = 0.0,
        hi: float = math.inf,
        lo_open: bool = False,
        default: float | None = None,
    ) -> float:
        value = self.get(key, _MISSING if default is None else default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(key, f"expected a number, got {value!r}")
        out = float(value)
        if not math.isfinite(out):
            raise self.fail(key, f"expected a finite number, got {value!r}")
        if out < lo or (lo_open and out <= lo) or out > hi:
            left = "(" if lo_open else "["
            right = "]" if math.isfinite(hi) else ")"
            raise self.fail(key, f"{value!r} is outside {left}{lo:g}, {hi:g}{right}")
        return out

    def integer(self, key: str, *, lo: int) -> int:
        value = self.get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"expected an integer, got {value!r}")
        if value < lo:
            raise self.fail(key, f"{value!r} is below the minimum {lo}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            raise self.fail(key, f"expected true or false, got {value!r}")
        return value

    def ident(self, key: str) -> str:
        value = self.get(key)
        if not isinstance(value, str) or not value:
            raise self.fail(key, f"expected a non-empty string, got {value!r}")
        return value

    def items(self, key: str) -> list[Any]:
        value = self.get(key)
        if not isinstance(value, list):
            raise self.fail(key, "expected a list")
        return value


def parse_consolidation(
    obj: dict[str, Any], source: str, *, prefix: str = ""
) -> ConsolidationProblem:
    """Validate the ``"consolidation"`` section; every error names its JSON path.

    ``source`` is the file the section came from; ``prefix`` is put in front of every field
    path (pass ``"consolidation"`` when the section is embedded in a larger problem file).
    The current placement must be feasible, since it is the "before" the savings compare to.
    """
    top = _Reader(source, prefix, obj, _TOP_KEYS)
    horizon_h = top.number("horizon_h", lo=0.0, lo_open=True)
    price = top.number("price_per_kwh")
    pue = top.number("pue", lo=1.0)
    carbon = top.number("carbon_g_per_kwh")

    nodes: list[ConsolidationNode] = []
    node_index: dict[str, int] = {}
    for i, raw in enumerate(top.items("nodes")):
        r = _Reader(source, top.at(f"nodes[{i}]"), raw, _NODE_KEYS)
        node = ConsolidationNode(
            id=r.ident("id"),
            gpus=r.integer("gpus", lo=1),
            mem_per_gpu_gb=r.number("mem_per_gpu_gb", lo=0.0, lo_open=True),
            node_idle_w=r.number("node_idle_w"),
            gpu_idle_w=r.number("gpu_idle_w"),
            gpu_active_w_per_util=r.number("gpu_active_w_per_util"),
            may_power_down=r.boolean("may_power_down", False),
        )
        if node.id in node_index:
            raise r.fail("id", f"duplicate node id {node.id!r}")
        node_index[node.id] = i
        nodes.append(node)

    jobs: list[ConsolidationJob] = []
    job_ids: set[str] = set()
    # Per node: GPUs named by jobs' gpu_indices (index -> job ids), GPUs of jobs without indices.
    named: list[dict[int, list[int]]] = [{} for _ in nodes]
    unnamed: list[int] = [0] * len(nodes)
    for k, raw in enumerate(top.items("jobs")):
        r = _Reader(source, top.at(f"jobs[{k}]"), raw, _JOB_KEYS)
        job_id = r.ident("id")
        if job_id in job_ids:
            raise r.fail("id", f"duplicate job id {job_id!r}")
        job_ids.add(job_id)
        gpus = r.integer("gpus", lo=1)
        mem = r.number("mem_per_gpu_gb")
        util = r.number("util", hi=1.0)
        node_id = r.ident("node")
        if node_id not in node_index:
            raise r.fail("node", f"unknown node {node_id!r}")
        n = node_index[node_id]
        home = nodes[n]
        if gpus > home.gpus:
            raise r.fail("gpus", f"{gpus} GPUs but its node {node_id!r} has {home.gpus}")
        if mem > home.mem_per_gpu_gb + _EPS:
            raise r.fail(
                "mem_per_gpu_gb",
                f"{mem:g} GB per GPU but its node {node_id!r} has {home.mem_per_gpu_gb:g} GB",
            )
        indices = _parse_indices(r, gpus, home)
        job = ConsolidationJob(
            id=job_id,
            gpus=gpus,
            mem_per_gpu_gb=mem,
            util=util,
            node=node_id,
            shareable=r.boolean("shareable", False),
            gpu_indices=indices,
            migration_cost_wh=r.number("migration_cost_wh", default=0.0),
            pinned=r.boolean("pinned", False),
        )
        if indices is None:
            unnamed[n] += gpus
        else:
            for g in indices:
                holders = named[n].setdefault(g, [])
                others = [jobs[h] for h in holders]
                if holders and not (job.packs and all(o.packs for o in others)):
                    raise r.fail(
                        "gpu_indices",
                        f"GPU {g} of node {node_id!r} is also held by job {others[0].id!r} "
                        "and the two may not share it",
                    )
                holders.append(k)
        jobs.append(job)
        busy = len(named[n]) + unnamed[n]
        if busy > home.gpus:
            raise r.fail(
                "node", f"node {node_id!r} would need {busy} GPUs for its jobs, has {home.gpus}"
            )
    return ConsolidationProblem(
        nodes=tuple(nodes),
        jobs=tuple(jobs),
        horizon_h=horizon_h,
        price_per_kwh=price,
        pue=pue,
        carbon_g_per_kwh=carbon,
    )


def _parse_indices(r: _Reader, gpus: int, home: ConsolidationNode) -> tuple[int, ...] | None:
    """Optional current GPU indices: one distinct in-range index per GPU the job holds."""
    raw = r.get("gpu_indices", None)
    if raw is None:
        return None
    if not isinstance(raw, list) or not all(
        isinstance(g, int) and not isinstance(g, bool) for g in raw
    ):
        raise r.fail("gpu_indices", "expected a list of integers")
    if len(raw) != gpus:
        raise r.fail("gpu_indices", f"lists {len(raw)} GPUs, the job has {gpus}")
    if len(set(raw)) != len(raw):
        raise r.fail("gpu_indices", "lists a GPU twice")
    bad = [g for g in raw if not 0 <= g < home.gpus]
    if bad:
        raise r.fail("gpu_indices", f"GPU {bad[0]} does not exist on node {home.id!r}")
    return tuple(raw)


# --------------------------------------------------------------------------------------------
# Arrays shared by every solver
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Data:
    """The problem as arrays, indexed by node and job position."""

    p: ConsolidationProblem
    n_nodes: int
    n_jobs: int
    cap: NDArray[np.int64]  # GPUs per node
    mem: NDArray[np.float64]  # GB per GPU per node
    node_idle: NDArray[np.float64]
    gpu_idle: NDArray[np.float64]
    forced: NDArray[np.bool_]  # stays on: may not power down, or holds a pinned job
    cur: NDArray[np.int64]  # current node of each job
    gpus: NDArray[np.int64]
    jmem: NDArray[np.float64]
    util: NDArray[np.float64]  # shared util, floored at MIN_SHARED_UTIL for packing jobs
    packs: NDArray[np.bool_]
    pinned: NDArray[np.bool_]
    mig_w: NDArray[np.float64]  # migration cost spread over the horizon
    act_w: NDArray[np.float64]  # active power per job, the same wherever it runs

    def fits(self, j: int, n: int) -> bool:
        """Static fit: the node has enough GPUs and memory per GPU for the job at all."""
        return bool(self.gpus[j] <= self.cap[n] and self.jmem[j] <= self.mem[n] + _EPS)


def _data(p: ConsolidationProblem) -> _Data:
    index = {n.id: i for i, n in enumerate(p.nodes)}
    cur = np.array([index[j.node] for j in p.jobs], dtype=np.int64)
    pinned = np.array([j.pinned for j in p.jobs], dtype=bool)
    forced = np.array([not n.may_power_down for n in p.nodes], dtype=bool)
    forced[cur[pinned]] = True
    packs = np.array([j.packs for j in p.jobs], dtype=bool)
    util = np.array([j.util for j in p.jobs], dtype=np.float64)
    busy = np.array([j.gpus * j.util for j in p.jobs], dtype=np.float64)
    active = np.array([n.gpu_active_w_per_util for n in p.nodes], dtype=np.float64)
    return _Data(
        p=p,
        n_nodes=len(p.nodes),
        n_jobs=len(p.jobs),
        cap=np.array([n.gpus for n in p.nodes], dtype=np.int64),
        mem=np.array([n.mem_per_gpu_gb for n in p.nodes], dtype=np.float64),
        node_idle=np.array([n.node_idle_w for n in p.nodes], dtype=np.float64),
        gpu_idle=np.array([n.gpu_idle_w for n in p.nodes], dtype=np.float64),
        forced=forced,
        cur=cur,
        gpus=np.array([j.gpus for j in p.jobs], dtype=np.int64),
        jmem=np.array([j.mem_per_gpu_gb for j in p.jobs], dtype=np.float64),
        util=np.where(packs, np.maximum(util, MIN_SHARED_UTIL), util),
        packs=packs,
        pinned=pinned,
        mig_w=np.array([j.migration_cost_wh for j in p.jobs], dtype=np.float64) / p.horizon_h,
        act_w=busy * active[cur] if len(cur) else np.zeros(0),
    )


# --------------------------------------------------------------------------------------------
# Layout: where every job runs, GPU by GPU
# --------------------------------------------------------------------------------------------

#: A shared GPU: [util_sum, mem_sum_gb, [job, ...]]; mutable because the greedy tries
#: thousands of tentative moves and rolls most of them back.
_Bin = list[Any]
_Snap = tuple[list[int], list[_Bin], int, bool, float]


class _Layout:
    """A placement: exclusive jobs and shared GPUs ("bins") per node, and which nodes are on."""

    def __init__(self, d: _Data) -> None:
        self.d = d
        self.node_of = np.full(d.n_jobs, -1, dtype=np.int64)
        self.excl: list[list[int]] = [[] for _ in range(d.n_nodes)]
        self.bins: list[list[_Bin]] = [[] for _ in range(d.n_nodes)]
        self.free = d.cap.copy()
        self.act_w = np.zeros(d.n_nodes)  # active power of the jobs on the node
        self.on = np.ones(d.n_nodes, dtype=bool)

    def used(self, n: int) -> int:
        return int(self.d.cap[n] - self.free[n])

    def size(self, j: int) -> float:
        """How much of a GPU a shared job takes (the larger of its util and memory share)."""
        d = self.d
        return max(float(d.util[j]), float(d.jmem[j] / d.mem[d.cur[j]]))

    def bin_for(self, j: int, n: int) -> _Bin | None:
        u, m, cap = self.d.util[j], self.d.jmem[j], self.d.mem[n]
        for b in self.bins[n]:
            if b[0] + u <= 1.0 + _EPS and b[1] + m <= cap + _EPS:
                return b
        return None

    def can_place(self, j: int, n: int) -> bool:
        d = self.d
        if d.jmem[j] > d.mem[n] + _EPS:
            return False
        if not d.packs[j]:
            return bool(self.free[n] >= d.gpus[j])
        return bool(self.free[n] >= 1) or self.bin_for(j, n) is not None

    def place(self, j: int, n: int) -> bool:
        """Put job ``j`` on node ``n`` (first fit into a shared GPU); False if it does not fit."""
        if not self.can_place(j, n):
            return False
        d = self.d
        if d.packs[j]:
            b = self.bin_for(j, n)
            if b is None:
                self.bins[n].append([d.util[j], d.jmem[j], [j]])
                self.free[n] -= 1
            else:
                b[0] += d.util[j]
                b[1] += d.jmem[j]
                b[2].append(j)
        else:
            self.excl[n].append(j)
            self.free[n] -= d.gpus[j]
        self.act_w[n] += d.act_w[j]
        self.node_of[j] = n
        self.on[n] = True
        return True

    def remove(self, j: int) -> None:
        d, n = self.d, int(self.node_of[j])
        if d.packs[j]:
            for b in self.bins[n]:
                if j in b[2]:
                    b[2].remove(j)
                    b[0] -= d.util[j]
                    b[1] -= d.jmem[j]
                    if not b[2]:
                        self.bins[n].remove(b)
                        self.free[n] += 1
                    break
        else:
            self.excl[n].remove(j)
            self.free[n] += d.gpus[j]
        self.act_w[n] -= d.act_w[j]
        self.node_of[j] = -1

    def jobs_on(self, n: int) -> list[int]:
        return list(self.excl[n]) + [j for b in self.bins[n] for j in b[2]]

    def snapshot(self, n: int) -> _Snap:
        bins = [[b[0], b[1], list(b[2])] for b in self.bins[n]]
        return list(self.excl[n]), bins, int(self.free[n]), bool(self.on[n]), float(self.act_w[n])

    def restore(self, n: int, snap: _Snap) -> None:
        excl, bins, free, on, act_w = snap
        self.excl[n], self.bins[n] = list(excl), [[b[0], b[1], list(b[2])] for b in bins]
        self.free[n], self.on[n], self.act_w[n] = free, on, act_w
        for j in self.jobs_on(n):
            self.node_of[j] = n

    def node_power_w(self, n: int) -> float:
        if not self.on[n]:
            return 0.0
        d = self.d
        return float(d.node_idle[n] + d.gpu_idle[n] * self.used(n) + self.act_w[n])

    def mig_w(self, j: int) -> float:
        return float(self.d.mig_w[j]) if self.node_of[j] != self.d.cur[j] else 0.0

    def power_w(self) -> float:
        """IT power, recomputed from the jobs (no drift from incremental sums)."""
        d = self.d
        on = self.on
        used = np.where(on, d.cap - self.free, 0)
        act_w = float(np.sum(d.act_w[self.node_of >= 0]))
        return float(np.dot(d.node_idle, on) + np.dot(d.gpu_idle, used)) + act_w

    def objective_w(self) -> float:
        moved = self.node_of != self.d.cur
        return self.power_w() + float(np.sum(self.d.mig_w[moved]))

    def repack(self, n: int) -> None:
        """Re-pack node ``n``'s shared jobs first-fit decreasing if that uses fewer GPUs.

        GPU changes within a node carry no migration cost (documented approximation).
        """
        shared = [j for b in self.bins[n] for j in b[2]]
        if len(shared) < 2:
            return
        snap = self.snapshot(n)
        before = len(self.bins[n])
        for j in shared:
            self.remove(j)
        ok = all(self.place(j, n) for j in sorted(shared, key=self.size, reverse=True))
        if not ok or len(self.bins[n]) >= before:
            self.restore(n, snap)

    def copy(self) -> _Layout:
        out = _Layout(self.d)
        out.node_of = self.node_of.copy()
        out.excl = [list(e) for e in self.excl]
        out.bins = [[[b[0], b[1], list(b[2])] for b in bs] for bs in self.bins]
        out.free = self.free.copy()
        out.act_w = self.act_w.copy()
        out.on = self.on.copy()
        return out


def _current_gpus_used(d: _Data) -> NDArray[np.int64]:
    """GPUs held per node now: named indices count once, jobs without indices own their GPUs."""
    named: list[set[int]] = [set() for _ in range(d.n_nodes)]
    used = np.zeros(d.n_nodes, dtype=np.int64)
    for j, job in enumerate(d.p.jobs):
        n = int(d.cur[j])
        if job.gpu_indices is None:
            used[n] += job.gpus
        else:
            named[n].update(job.gpu_indices)
    return used + np.array([len(s) for s in named], dtype=np.int64)


def _power_before_w(d: _Data) -> float:
    used = _current_gpus_used(d)
    return float(np.sum(d.node_idle) + np.dot(d.gpu_idle, used) + np.sum(d.act_w))


def _current_layout(d: _Data) -> _Layout:
    """Today's placement, shared GPUs grouped as the input says, then re-packed per node."""
    lay = _Layout(d)
    groups: dict[tuple[int, int], _Bin] = {}
    for j, job in enumerate(d.p.jobs):
        n = int(d.cur[j])
        if not d.packs[j]:
            lay.excl[n].append(j)
            lay.free[n] -= d.gpus[j]
        else:
            key = (n, job.gpu_indices[0]) if job.gpu_indices is not None else (n, -1 - j)
            if key not in groups:
                groups[key] = [0.0, 0.0, []]
                lay.bins[n].append(groups[key])
                lay.free[n] -= 1
            b = groups[key]
            b[0] += d.util[j]
            b[1] += d.jmem[j]
            b[2].append(j)
        lay.act_w[n] += d.act_w[j]
        lay.node_of[j] = n
    for n in range(d.n_nodes):
        lay.repack(n)
    return lay


# --------------------------------------------------------------------------------------------
# Greedy: first-fit decreasing, then empty the least-loaded nodes
# --------------------------------------------------------------------------------------------


def _best_target(lay: _Layout, j: int, exclude: int | None) -> int:
    """Cheapest powered node for ``j`` (not ``exclude``), best fit among equals; -1 if none.

    Its home node comes first when it is on and has room: staying costs no migration.
    """
    d = lay.d
    home = int(d.cur[j])
    if home != exclude and lay.on[home] and lay.can_place(j, home):
        return home
    ok = lay.on & (d.mem + _EPS >= d.jmem[j])
    if exclude is not None:
        ok[exclude] = False
    if d.packs[j]:
        room = np.flatnonzero(ok & (lay.free >= 1))
        binned = [n for n in np.flatnonzero(ok) if lay.bin_for(j, int(n)) is not None]
        cand = np.union1d(room, np.array(binned, dtype=np.int64))
        if cand.size == 0:
            return -1
        new_gpus = np.array([0.0 if n in binned else 1.0 for n in cand])
        leftover = lay.free[cand].astype(np.float64) - new_gpus
    else:
        cand = np.flatnonzero(ok & (lay.free >= d.gpus[j]))
        if cand.size == 0:
            return -1
        new_gpus = np.full(cand.size, float(d.gpus[j]))
        leftover = lay.free[cand].astype(np.float64) - new_gpus
    mig = np.where(cand != home, d.mig_w[j], 0.0)
    marginal = np.round(d.gpu_idle[cand] * new_gpus + mig, 6)
    # Cheapest first; then the smallest memory that fits (keep big-memory GPUs for the jobs
    # that need them); then best fit, so nodes fill up and others can empty.
    best = np.lexsort((leftover, d.mem[cand], marginal))[0]
    return int(cand[best])


def _try_empty(lay: _Layout, n: int, spare: int | None = None) -> bool:
    """Move every job off node ``n`` and power it down if that lowers the objective.

    With ``spare`` (a powered-down node), that node may be powered on to take the jobs: this
    replaces an expensive node by a cheaper one.
    """
    d = lay.d
    jobs = sorted(
        lay.jobs_on(n), key=lambda j: (not d.packs[j], d.gpus[j], lay.size(j)), reverse=True
    )
    snaps = {n: lay.snapshot(n)}
    before_w = lay.node_power_w(n) + sum(lay.mig_w(j) for j in jobs)
    if spare is not None:
        snaps[spare] = lay.snapshot(spare)
        before_w += lay.node_power_w(spare)
        lay.on[spare] = True
    for j in jobs:
        t = _best_target(lay, j, n)
        if t < 0:
            break
        if t not in snaps:
            snaps[t] = lay.snapshot(t)
            before_w += lay.node_power_w(t)
        lay.remove(j)
        lay.place(j, t)
    else:
        lay.on[n] = False
        if spare is not None and not lay.jobs_on(spare):
            lay.on[spare] = False
        after_w = sum(lay.node_power_w(m) for m in snaps) + sum(lay.mig_w(j) for j in jobs)
        if after_w < before_w - 1e-7:
            return True
    for m, snap in snaps.items():
        lay.restore(m, snap)
    return False


def _empty_pass(lay: _Layout, deadline: float) -> bool:
    """One pass of "empty a node", least loaded first; True if anything changed."""
    d = lay.d
    changed = False
    order = sorted(
        (n for n in range(d.n_nodes) if lay.on[n] and not d.forced[n]),
        key=lambda n: (lay.used(n), -d.node_idle[n]),
    )
    for n in order:
        if time.monotonic() >= deadline:
            break
        if lay.on[n] and _try_empty(lay, n):
            changed = True
    return changed


def _replace_pass(lay: _Layout, deadline: float) -> bool:
    """One pass of "replace a node by a cheaper powered-down one"; True if anything changed."""
    d = lay.d
    changed = False
    order = sorted(
        (n for n in range(d.n_nodes) if lay.on[n] and not d.forced[n]),
        key=lambda n: (-d.node_idle[n], lay.used(n)),
    )
    for n in order:
        if time.monotonic() >= deadline:
            break
        if not lay.on[n]:
            continue
        spares: dict[tuple[float, float, int], int] = {}
        for e in np.flatnonzero(~lay.on & (d.node_idle < d.node_idle[n] - _EPS)):
            spares.setdefault((float(d.node_idle[e]), float(d.mem[e]), int(d.cap[e])), int(e))
        for spare in sorted(spares.values(), key=lambda e: d.node_idle[e]):
            if _try_empty(lay, n, spare):
                changed = True
                break
    return changed


def _merge_pass(lay: _Layout, deadline: float) -> bool:
    """Free shared GPUs: move a shared GPU's jobs into room left on other shared GPUs.

    Catches what emptying nodes cannot: nodes that stay on anyway but share poorly.
    """
    d = lay.d
    changed = False
    for n in map(int, np.flatnonzero(lay.on)):
        for b in sorted(lay.bins[n], key=lambda b: b[0]):
            if time.monotonic() >= deadline:
                return changed
            if b not in lay.bins[n] or any(d.pinned[j] for j in b[2]):
                continue  # gone already, or holds a job that must stay
            jobs = list(b[2])
            snaps = {n: lay.snapshot(n)}
            before_w = lay.node_power_w(n) + sum(lay.mig_w(j) for j in jobs)
            for j in jobs:
                lay.remove(j)  # the GPU disappears once its last job is out
            ok = True
            for j in sorted(jobs, key=lay.size, reverse=True):
                targets = [
                    int(t) for t in np.flatnonzero(lay.on & (d.mem + _EPS >= d.jmem[j]))
                    if lay.bin_for(j, int(t)) is not None
                ]  # fmt: skip
                if not targets:
                    ok = False
                    break
                t = min(targets, key=lambda t: (t != d.cur[j], t != n))
                if t not in snaps:
                    snaps[t] = lay.snapshot(t)
                    before_w += lay.node_power_w(t)
                lay.place(j, t)
            if ok:
                after_w = sum(lay.node_power_w(m) for m in snaps) + sum(lay.mig_w(j) for j in jobs)
                if after_w < before_w - 1e-7:
                    changed = True
                    continue
            for m, snap in snaps.items():  # n first: it re-links every job of the bin
                lay.restore(m, snap)
    return changed


def _home_pass(lay: _Layout) -> None:
    """Send moved jobs back to their own node where it is on, has room and costs no more."""
    d = lay.d
    for jj in np.flatnonzero(lay.node_of != d.cur):
        j, home, away = int(jj), int(d.cur[jj]), int(lay.node_of[jj])
        if not lay.on[home] or not lay.can_place(j, home):
            continue
        snaps = {home: lay.snapshot(home), away: lay.snapshot(away)}
        before_w = lay.node_power_w(home) + lay.node_power_w(away) + lay.mig_w(j)
        lay.remove(j)
        lay.place(j, home)
        if lay.node_power_w(home) + lay.node_power_w(away) > before_w + 1e-7:
            for m, snap in snaps.items():
                lay.restore(m, snap)


def _improve(lay: _Layout, deadline: float) -> _Layout:
    """Empty nodes and replace expensive ones until nothing changes or time runs out."""
    d = lay.d
    for n in range(d.n_nodes):
        if lay.on[n] and not d.forced[n] and not lay.jobs_on(n):
            lay.on[n] = False
    while time.monotonic() < deadline:
        emptied = _empty_pass(lay, deadline)
        replaced = _replace_pass(lay, deadline)
        if not (_merge_pass(lay, deadline) or replaced or emptied):
            break
    _home_pass(lay)
    for n in range(d.n_nodes):
        lay.repack(n)
    return lay


def _ffd(d: _Data, keep: Mapping[int, int] | None = None) -> _Layout | None:
    """Best-fit decreasing onto nodes that must stay on first, then the fullest nodes.

    ``keep`` maps a node class (index into :func:`_node_classes`) to how many of its nodes to
    open up front (the LP's node counts, rounded up); without it, the fullest nodes are opened
    until they hold the demand in GPUs. Jobs whose node is open stay; the rest go, biggest
    first, to the cheapest best-fitting open node; more nodes open when needed. None when
    fragmentation leaves a job nowhere to go (the caller keeps its other start).
    """
    lay = _Layout(d)
    lay.on[:] = d.forced
    used_now = _current_gpus_used(d)

    def fullest(nodes: list[int]) -> list[int]:
        return sorted(nodes, key=lambda n: (-used_now[n], d.node_idle[n] / d.cap[n]))

    first: list[int] = []
    later: list[int] = []
    if keep is None:
        rest = fullest([n for n in range(d.n_nodes) if not d.forced[n]])
        demand = float(np.sum(d.gpus[~d.packs]) + np.sum(d.util[d.packs]))
        capacity = float(np.sum(d.cap[d.forced]))
        for n in rest:
            (first if capacity < demand else later).append(n)
            capacity += float(d.cap[n])
    else:
        for c, members in enumerate(_node_classes(d)):
            free = fullest([n for n in members if not d.forced[n]])
            first += free[: keep.get(c, 0)]
            later += free[keep.get(c, 0) :]
        later = sorted(later, key=lambda n: (d.node_idle[n] / d.cap[n], -used_now[n]))
    lay.on[first] = True
    # Pinned jobs, then the jobs that fit on the fewest nodes (big memory), then by size.
    fit_count = np.sum(d.jmem[:, None] <= d.mem[None, :] + _EPS, axis=1)
    order = sorted(
        range(d.n_jobs),
        key=lambda j: (not d.pinned[j], fit_count[j], -d.gpus[j], -d.jmem[j], -lay.size(j)),
    )
    later.reverse()  # pop() from the end
    for j in order:
        home = int(d.cur[j])
        if lay.on[home] and lay.place(j, home):
            continue
        if d.pinned[j]:
            return None
        t = _best_target(lay, j, None)
        while t < 0 and later:
            n = later.pop()
            lay.on[n] = True
            t = n if lay.can_place(j, n) else -1
        if t < 0:
            return None
        lay.place(j, t)
    lay.on &= d.forced | np.array([bool(lay.jobs_on(n)) for n in range(d.n_nodes)], dtype=bool)
    return lay


def _greedy(d: _Data, deadline: float, keep: Mapping[int, int] | None) -> _Layout:
    """The best of improving today's placement, plain FFD and LP-guided FFD."""
    best = _improve(_current_layout(d), deadline)
    for start in (_ffd(d), _ffd(d, keep) if keep is not None else None):
        if start is not None and time.monotonic() < deadline:
            other = _improve(start, deadline)
            if other.objective_w() < best.objective_w():
                best = other
    return best


# --------------------------------------------------------------------------------------------
# MILP and LP bound
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Model:
    """A (job option, class) model ready for ``milp``; see :func:`_build_model`."""

    c: NDArray[np.float64]
    a: coo_array
    row_lo: NDArray[np.float64]
    row_hi: NDArray[np.float64]
    lo: NDArray[np.float64]
    hi: NDArray[np.float64]
    integrality: NDArray[np.int64]
    constant: float
    opt_job: NDArray[np.int64]  # job of each option variable
    opt_class: NDArray[np.int64]
    classes: list[list[int]]


def _build_model(d: _Data, classes: list[list[int]]) -> _Model:
    """Assignment model over node classes (identical nodes grouped).

    Variables: ``x[option]`` (job to class, or job stays), ``y[c]`` nodes on in class c,
    ``s[c]`` shared GPU slots in class c. With one node per class this is the exact MILP
    (up to GPU sharing, counted by its fractional-packing bound); with bigger classes it is an
    aggregation whose LP is still a valid lower bound (sum the per-node rows of any solution).
    """
    node_class = np.empty(d.n_nodes, dtype=np.int64)
    for c, members in enumerate(classes):
        node_class[members] = c
    singleton = all(len(m) == 1 for m in classes)
    n_cls = len(classes)
    rep = np.array([m[0] for m in classes], dtype=np.int64)  # a representative node per class
    count = np.array([len(m) for m in classes], dtype=np.float64)
    forced_count = np.array([float(np.sum(d.forced[m])) for m in classes])

    # Memory rounded down to whole MB: coefficients near HiGHS's tolerances (1e-7 GB seen in
    # testing) made it return a wrong "optimal"; rounding down keeps the model a relaxation.
    model_mem = np.floor(d.jmem * 1e3) / 1e3
    opt_job: list[int] = []
    opt_class: list[int] = []
    opt_cost: list[float] = []
    constant = float(np.sum(d.act_w))  # active power does not depend on placement
    pin_gpus = np.zeros(n_cls)
    pin_util = np.zeros(n_cls)
    pin_mem = np.zeros(n_cls)
    for j in range(d.n_jobs):
        home_c = int(node_class[d.cur[j]])
        if d.pinned[j]:
            if d.packs[j]:
                pin_util[home_c] += d.util[j]
                pin_mem[home_c] += model_mem[j]
            else:
                pin_gpus[home_c] += d.gpus[j]
                constant += float(d.gpus[j] * d.gpu_idle[d.cur[j]])
            continue
        gpu_part = 0.0 if d.packs[j] else float(d.gpus[j])
        # Staying home: no migration cost.
        opt_job.append(j)
        opt_class.append(home_c)
        opt_cost.append(gpu_part * float(d.gpu_idle[d.cur[j]]))
        for c in range(n_cls):
            if c == home_c and (singleton or count[c] < 2):
                continue  # the only node of this class is home: covered by "stay"
            n = int(rep[c])
            if not d.fits(j, n):
                continue
            opt_job.append(j)
            opt_class.append(c)
            opt_cost.append(gpu_part * float(d.gpu_idle[n]) + float(d.mig_w[j]))
    n_opt = len(opt_job)
    oj = np.array(opt_job, dtype=np.int64)
    oc = np.array(opt_class, dtype=np.int64)
    y0, s0 = n_opt, n_opt + n_cls
    n_var = n_opt + 2 * n_cls

    c_vec = np.concatenate([np.array(opt_cost), d.node_idle[rep], d.gpu_idle[rep]])

    movable = np.flatnonzero(~d.pinned)
    row_of_job = np.full(d.n_jobs, -1, dtype=np.int64)
    row_of_job[movable] = np.arange(len(movable))
    n_assign = len(movable)
    cap_r, util_r, mem_r = n_assign, n_assign + n_cls, n_assign + 2 * n_cls
    rows: list[NDArray[np.int64]] = []
    cols: list[NDArray[np.int64]] = []
    vals: list[NDArray[np.float64]] = []

    def add(r: NDArray[np.int64], k: NDArray[np.int64], v: NDArray[np.float64]) -> None:
        rows.append(r)
        cols.append(k)
        vals.append(v)

    opt_idx = np.arange(n_opt, dtype=np.int64)
    add(row_of_job[oj], opt_idx, np.ones(n_opt))  # each movable job placed once
    sh = d.packs[oj]
    ex = ~sh
    add(cap_r + oc[ex], opt_idx[ex], d.gpus[oj[ex]].astype(np.float64))
    add(util_r + oc[sh], opt_idx[sh], d.util[oj[sh]])
    add(mem_r + oc[sh], opt_idx[sh], model_mem[oj[sh]])
    cls = np.arange(n_cls, dtype=np.int64)
    add(cap_r + cls, y0 + cls, -d.cap[rep].astype(np.float64))  # GPUs: exclusive + slots <= cap*on
    add(cap_r + cls, s0 + cls, np.ones(n_cls))
    add(util_r + cls, s0 + cls, -np.ones(n_cls))  # shared util <= slots
    add(mem_r + cls, s0 + cls, -d.mem[rep])  # shared memory <= slots * memory per GPU
    n_rows = n_assign + 3 * n_cls
    a = coo_array(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n_rows, n_var)
    )
    row_lo = np.concatenate([np.ones(n_assign), np.full(3 * n_cls, -np.inf)])
    row_hi = np.concatenate([np.ones(n_assign), -pin_gpus, -pin_util, -pin_mem])

    lo = np.concatenate([np.zeros(n_opt), forced_count, np.zeros(n_cls)])
    hi = np.concatenate([np.ones(n_opt), count, count * d.cap[rep]])
    integrality = np.ones(n_var, dtype=np.int64)
    return _Model(
        c=c_vec,
        a=a,
        row_lo=row_lo,
        row_hi=row_hi,
        lo=lo,
        hi=hi,
        integrality=integrality,
        constant=constant,
        opt_job=oj,
        opt_class=oc,
        classes=classes,
    )


def _solve(m: _Model, *, relax: bool, time_limit_s: float) -> Any:
    if m.c.size == 0:  # no nodes: nothing to decide (HiGHS refuses an empty model)
        return OptimizeResult(status=0, x=np.zeros(0), fun=0.0, mip_dual_bound=0.0)
    return milp(
        m.c,
        constraints=LinearConstraint(m.a.tocsr(), m.row_lo, m.row_hi),
        integrality=np.zeros_like(m.integrality) if relax else m.integrality,
        bounds=Bounds(m.lo, m.hi),
        options={"time_limit": max(time_limit_s, 0.05), "disp": False},
    )


def _node_classes(d: _Data) -> list[list[int]]:
    """Group interchangeable nodes (same hardware, power and must-stay-on) for the LP bound."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for n in range(d.n_nodes):
        key = (
            int(d.cap[n]),
            float(d.mem[n]),
            float(d.node_idle[n]),
            float(d.gpu_idle[n]),
            bool(d.forced[n]),
        )
        groups.setdefault(key, []).append(n)
    return list(groups.values())


def _lp_bound_w(m: _Model, time_limit_s: float) -> tuple[float, NDArray[np.float64] | None]:
    """The LP relaxation's optimum (a valid lower bound) and its nodes-on per class."""
    res = _solve(m, relax=True, time_limit_s=time_limit_s)
    if res.status != 0 or res.x is None:
        return 0.0, None  # always valid: every power term is non-negative
    n_opt = len(m.opt_job)
    return float(res.fun) + m.constant, np.asarray(res.x[n_opt : n_opt + len(m.classes)])


def _layout_from_milp(
    d: _Data, m: _Model, x: NDArray[np.float64], deadline: float
) -> _Layout | None:
    """Turn a MILP assignment into a real GPU layout; repair packing overflow greedily.

    The MILP counts shared GPUs by a fractional bound, so real packing can need more GPUs
    than a node has; those jobs go to the cheapest node with room. None if nowhere is left.
    """
    lay = _Layout(d)
    lay.on[:] = d.forced
    target = d.cur.copy()
    for k in np.flatnonzero(x[: len(m.opt_job)] > 0.5):
        target[m.opt_job[k]] = m.classes[int(m.opt_class[k])][0]
    order = sorted(
        range(d.n_jobs),
        key=lambda j: (d.pinned[j], not d.packs[j], d.gpus[j], lay.size(j)),
        reverse=True,
    )
    overflow = [j for j in order if not lay.place(j, int(target[j]))]
    for j in overflow:
        t = _best_target(lay, j, None)
        if t < 0:
            t = next((n for n in range(d.n_nodes) if lay.can_place(j, n)), -1)
        if t < 0 or d.pinned[j]:
            return None
        lay.place(j, t)
    return _improve(lay, deadline)


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def solve_consolidation(
    problem: ConsolidationProblem,
    *,
    time_limit_s: float = 10.0,
    method: Method = "auto",
    milp_max_pairs: int = DEFAULT_MILP_MAX_PAIRS,
) -> ConsolidationResult:
    """Recommend job moves and node power-downs; always reports a lower bound and the gap.

    ``method="auto"`` runs the MILP when the instance has at most ``milp_max_pairs``
    (movable job, node) pairs, else the greedy; ``"milp"`` always tries the MILP. Whenever
    the MILP runs, the greedy runs too and the better result is returned, so a MILP that
    finds nothing in time falls back to the greedy (``status="milp_no_solution"``).
    """
    if method not in ("auto", "milp", "greedy"):
        raise ValueError(f"method must be 'auto', 'milp' or 'greedy', got {method!r}")
    start = time.monotonic()
    deadline = start + time_limit_s
    d = _data(problem)
    fits = (d.gpus[:, None] <= d.cap[None, :]) & (d.jmem[:, None] <= d.mem[None, :] + _EPS)
    pairs = int(np.sum(fits[~d.pinned]))
    use_milp = pairs <= MILP_HARD_MAX_PAIRS and (
        method == "milp" or (method == "auto" and pairs <= milp_max_pairs)
    )

    # The aggregated LP is cheap at any size: its bound is always valid, and its node counts
    # per class tell the greedy which kind of node to keep on.
    aggregated = _build_model(d, _node_classes(d))
    bound, nodes_on = _lp_bound_w(aggregated, max(deadline - time.monotonic(), 1.0))
    keep = None
    if nodes_on is not None:
        keep = {c: math.ceil(float(y) - 1e-6) for c, y in enumerate(nodes_on)}
    best = _greedy(d, start + 0.5 * time_limit_s if use_milp else deadline, keep)
    best_method: Literal["milp", "greedy"] = "greedy"
    status = "milp_too_large" if method == "milp" and not use_milp else "heuristic"
    if use_milp:
        exact = _build_model(d, [[n] for n in range(d.n_nodes)])
        if pairs <= milp_max_pairs:  # the exact LP is a little tighter, and cheap at this size
            bound = max(bound, _lp_bound_w(exact, max(deadline - time.monotonic(), 0.05))[0])
        res = _solve(exact, relax=False, time_limit_s=deadline - time.monotonic())
        status = "milp_no_solution"
        if res.x is not None:
            status = "optimal" if res.status == 0 else "time_limit"
            dual = getattr(res, "mip_dual_bound", None)
            lay = _layout_from_milp(d, exact, np.asarray(res.x), deadline + 1.0)
            if lay is not None and lay.objective_w() <= best.objective_w() + 1e-7:
                best, best_method = lay, "milp"
            # A dual bound above a layout we verified is numerically wrong: keep the LP's.
            if dual is not None and math.isfinite(dual):
                dual_w = float(dual) + exact.constant
                if dual_w <= best.objective_w() * (1 + 1e-7) + 1e-7:
                    bound = max(bound, dual_w)
    return _result(
        d, best, method=best_method, status=status, bound_w=bound, time_s=time.monotonic() - start
    )


def _result(
    d: _Data,
    lay: _Layout,
    *,
    method: Literal["milp", "greedy"],
    status: str,
    bound_w: float,
    time_s: float,
) -> ConsolidationResult:
    p = d.p
    before_w = _power_before_w(d)
    after_w = lay.power_w()
    moved = np.flatnonzero(lay.node_of != d.cur)
    mig_wh = float(np.sum(d.mig_w[moved])) * p.horizon_h
    objective = after_w + mig_wh / p.horizon_h
    diff = objective - bound_w
    if abs(diff) <= 1e-7 * max(1.0, abs(objective)):
        gap = 0.0  # solver tolerance; a clearly negative gap is a bug and stays visible
    elif bound_w > _EPS:
        gap = diff / bound_w
    else:
        gap = math.inf
    savings_w = before_w - after_w
    kwh_day = savings_w * p.pue * _HOURS_PER_DAY / 1000.0
    used_before = _current_gpus_used(d)
    layout = {
        p.nodes[n].id: tuple(
            tuple(p.jobs[j].id for j in grp)
            for grp in [[j] for j in lay.excl[n] for _ in range(int(d.gpus[j]))]
            + [b[2] for b in lay.bins[n]]
        )
        for n in range(d.n_nodes)
        if lay.on[n]
    }
    return ConsolidationResult(
        moves=tuple(
            Move(p.jobs[j].id, p.nodes[d.cur[j]].id, p.nodes[lay.node_of[j]].id) for j in moved
        ),
        gpus_freed=int(np.sum(used_before))
        - sum(lay.used(n) for n in range(d.n_nodes) if lay.on[n]),
        nodes_freed=tuple(p.nodes[n].id for n in range(d.n_nodes) if not lay.on[n]),
        power_before_w=before_w,
        power_after_w=after_w,
        savings_w=savings_w,
        migration_cost_wh=mig_wh,
        objective_w=objective,
        kwh_day=kwh_day,
        cost_day=kwh_day * p.price_per_kwh,
        co2_kg_day=kwh_day * p.carbon_g_per_kwh / 1000.0,
        method=method,
        status=status,
        gap=gap,
        lower_bound_w=bound_w,
        time_s=time_s,
        layout=layout,
    )


__all__: Sequence[str] = (
    "DEFAULT_MILP_MAX_PAIRS",
    "MILP_HARD_MAX_PAIRS",
    "MIN_SHARED_UTIL",
    "ConsolidationJob",
    "ConsolidationNode",
    "ConsolidationProblem",
    "ConsolidationResult",
    "Move",
    "parse_consolidation",
    "solve_consolidation",
)
