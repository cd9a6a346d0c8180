"""Job throughput: cumulative work counters in, rates (units per second) out.

Two sources, both optional:

* **report**: jobs write ``<job_id>.json`` into a directory (see
  :mod:`dcenergy.report` and docs/job-throughput.md); every cycle the agent
  reads them all. The rate is taken between two *distinct* reports, using the
  job's own timestamps, and held until the next one arrives or the report
  goes stale, so a job reporting every 10 s still has a rate in every 1 s
  cycle.
* **prometheus**: the agent scrapes a job's text endpoint for one counter
  (``vllm:generation_tokens_total``, summed over its label sets) and takes
  the rate between successive scrapes.

A counter that goes down (job restarted) restarts from its new value: no rate
for that interval, never a negative one. A job with neither source gets no
rate at all; the sampler then labels SM utilization as a proxy. When a job
has both, the report wins: it is the job's own statement of its work.

Nothing here raises into the daemon: failures are counted in
``errors_total`` and logged once (per file, or per target until it recovers).
"""

from __future__ import annotations

import fnmatch
import logging
import math
import os
import re
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import httpx

from dcenergy.errors import InputError
from dcenergy.inputs import parse_json
from dcenergy.logonce import LogOnce
from dcenergy.report import JOB_ID_PATTERN, report_dir

log = logging.getLogger(__name__)

RateSource = Literal["report", "prometheus"]

DEFAULT_MAX_AGE_S = 60.0
DEFAULT_SCRAPE_TIMEOUT_S = 1.0
MAX_REPORT_BYTES = 64 * 1024  # a report is ~100 bytes; anything bigger is not one


@dataclass(frozen=True, slots=True)
class Rate:
    """A job's work rate and where it came from (the JOB measurement's throughput fields)."""

    value_per_s: float
    unit: str
    source: RateSource


@dataclass(frozen=True, slots=True)
class CounterReading:
    """One cumulative counter value at one moment (unix seconds)."""

    job_id: str
    counter: float
    unit: str
    time_s: float


@dataclass(frozen=True, slots=True)
class ScrapeTarget:
    """Where a job's counter lives. ``{job_id}`` in ``url`` is replaced by the job id.

    ``labels`` restricts the sum to series carrying those label values (e.g.
    one ``model_name`` on a multi-model server); empty sums every series.
    """

    url: str
    metric: str
    unit: str
    labels: Mapping[str, str] = field(default_factory=dict)


# --- counter → rate ----------------------------------------------------------------


class _CounterRate:
    """Rate of one cumulative counter between distinct readings, with resets handled."""

    def __init__(self) -> None:
        self._last: tuple[float, float] | None = None  # (time_s, counter)
        self._rate: float | None = None

    def update(self, counter: float, time_s: float) -> float | None:
        last, self._last = self._last, (time_s, counter)
        if last is None:
            return None
        last_time, last_counter = last
        if time_s == last_time and counter == last_counter:
            return self._rate  # the same reading again (report not rewritten): hold its rate
        if time_s <= last_time or counter < last_counter:
            self._rate = None  # clock went back or the counter reset: restart from here
        else:
            self._rate = (counter - last_counter) / (time_s - last_time)
        return self._rate


# --- Prometheus text format ------------------------------------------------------------
#
# A small parser instead of prometheus-client: we need one counter from one
# page, and the text format (exposition 0.0.4, which OpenMetrics extends) is a
# line-based grammar of a few rules. A dependency in every agent for that is
# not worth it, and this parser only fully parses the lines of the wanted
# metric, so a 100 kB vLLM page costs a prefix check per line.

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_ESCAPES = {"\\": "\\", '"': '"', "n": "\n"}


@dataclass(frozen=True, slots=True)
class Sample:
    """One sample line: metric name, label set, value (timestamp and exemplar dropped)."""

    name: str
    labels: Mapping[str, str]
    value: float


def parse_sample_line(line: str) -> Sample:
    """Parse ``name{label="value",...} value [timestamp]``; raises ``ValueError`` if malformed."""
    m = _METRIC_NAME.match(line)
    if m is None:
        raise ValueError(f"no metric name in {line!r}")
    name, pos, n = m.group(), m.end(), len(line)
    labels: dict[str, str] = {}

    def skip_ws(i: int) -> int:
        while i < n and line[i] in " \t":
            i += 1
        return i

    pos = skip_ws(pos)
    if pos < n and line[pos] == "{":
        pos = skip_ws(pos + 1)
        while True:
            if pos < n and line[pos] == "}":  # empty set, or a trailing comma before it
                pos += 1
                break
            lm = _LABEL_NAME.match(line, pos)
            if lm is None:
                raise ValueError(f"bad label name at column {pos} in {line!r}")
            pos = skip_ws(lm.end())
            if line[pos : pos + 1] != "=":
                raise ValueError(f"expected '=' at column {pos} in {line!r}")
            pos = skip_ws(pos + 1)
            if line[pos : pos + 1] != '"':
                raise ValueError(f"expected '\"' at column {pos} in {line!r}")
            pos += 1
            chars: list[str] = []
            while True:
                if pos >= n:
                    raise ValueError(f"unterminated label value in {line!r}")
                c = line[pos]
                if c == "\\" and pos + 1 < n:
                    nxt = line[pos + 1]
                    chars.append(_ESCAPES.get(nxt, "\\" + nxt))
                    pos += 2
                elif c == '"':
                    pos += 1
                    break
                else:
                    chars.append(c)
                    pos += 1
            labels[lm.group()] = "".join(chars)
            pos = skip_ws(pos)
            if line[pos : pos + 1] == ",":
                pos = skip_ws(pos + 1)
            elif line[pos : pos + 1] != "}":
                raise ValueError(f"expected ',' or '}}' at column {pos} in {line!r}")
    rest = line[pos:].split()
    if not rest:
        raise ValueError(f"no value in {line!r}")
    return Sample(name, labels, _parse_value(rest[0]))


def _parse_value(token: str) -> float:
    if "_" in token:  # Python's float() accepts 1_000; the format does not
        raise ValueError(f"bad sample value {token!r}")
    return float(token)  # accepts NaN, +Inf, -Inf, exponents; ValueError otherwise


def counter_total(text: str, metric: str, labels: Mapping[str, str] | None = None) -> float | None:
    """Sum of ``metric`` over its label sets in a text exposition; ``None`` if absent.

    A counter may be named with or without ``_total``: ``foo`` also matches
    ``foo_total`` (how client libraries expose counter ``foo``) when no plain
    ``foo`` series exists. ``_created`` series are never summed. Raises
    ``ValueError`` when a line of this metric is malformed; other lines are
    not even parsed.
    """
    wanted = {metric} if metric.endswith("_total") else {metric, metric + "_total"}
    sums: dict[str, float] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # HELP, TYPE, other comments, OpenMetrics '# EOF'
        m = _METRIC_NAME.match(line)
        if m is None or m.group() not in wanted:
            continue
        sample = parse_sample_line(line)
        if labels and any(sample.labels.get(k) != v for k, v in labels.items()):
            continue
        sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
    if metric in sums:
        return sums[metric]
    return sums.get(metric + "_total")


# --- the tracker ---------------------------------------------------------------------


class ThroughputTracker:
    """Turns job reports and scraped counters into per-job rates, once per cycle.

    ``targets`` maps a job id, or an ``fnmatch`` pattern over job ids (``*``,
    ``?``, ``[``), to a :class:`ScrapeTarget`. Pattern targets apply to the
    ``active_jobs`` given to :meth:`rates` (the jobs attributed to this host's
    GPUs); use ``{job_id}`` in their URL when several jobs can match, or they
    would all be credited with the same counter. ``client`` is injectable so
    tests replace the network with ``httpx.MockTransport``.
    """

    def __init__(
        self,
        report_directory: Path | None = None,
        *,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        targets: Mapping[str, ScrapeTarget] | None = None,
        client: httpx.Client | None = None,
        timeout_s: float = DEFAULT_SCRAPE_TIMEOUT_S,
    ) -> None:
        self.report_directory = report_dir(report_directory)
        self.max_age_s = max_age_s
        self.targets = dict(targets or {})
        self.timeout_s = timeout_s
        self.errors_total = 0
        self._client = client
        self._own_client = client is None
        self._states: dict[tuple[str, RateSource], _CounterRate] = {}
        self._logged = LogOnce(log)
        self._bad_files: dict[str, int] = {}  # name → mtime_ns of the version already counted
        self._failing: set[str] = set()  # 'url metric' logged as failing until it recovers

    def close(self) -> None:
        """Close the HTTP client if this tracker created it."""
        if self._own_client and self._client is not None:
            self._client.close()
            self._client = None

    def rates(self, now_s: float, active_jobs: Iterable[str] | None = None) -> dict[str, Rate]:
        """Rates of every job with a live source; a job without one is absent.

        ``active_jobs`` limits scraping to jobs running here (exact targets
        included); ``None`` scrapes every exact target and no pattern.
        """
        out: dict[str, Rate] = {}
        seen: set[tuple[str, RateSource]] = set()
        for job_id, unit, value in self._scrape_all(active_jobs):
            seen.add((job_id, "prometheus"))
            if value is None:
                continue  # failed this cycle: keep the baseline, the next rate spans the gap
            rate = self._state(job_id, "prometheus").update(value, now_s)
            if rate is not None:
                out[job_id] = Rate(rate, unit, "prometheus")
        for reading in self.read_reports(now_s).values():
            seen.add((reading.job_id, "report"))
            rate = self._state(reading.job_id, "report").update(reading.counter, reading.time_s)
            if rate is not None:
                out[reading.job_id] = Rate(rate, reading.unit, "report")  # the report wins
        for key in set(self._states) - seen:
            del self._states[key]  # a job whose source went away starts afresh if it returns
        return out

    def _state(self, job_id: str, source: RateSource) -> _CounterRate:
        return self._states.setdefault((job_id, source), _CounterRate())

    # --- report channel ---
    def read_reports(self, now_s: float) -> dict[str, CounterReading]:
        """Every valid, fresh report in the directory (stale ones are ignored)."""
        try:
            entries = sorted(os.scandir(self.report_directory), key=lambda e: e.name)
        except FileNotFoundError:
            return {}  # no job has reported yet: normal, not an error
        except OSError as e:
            self._count_and_log_once(
                f"dir:{self.report_directory}", "cannot list %s: %s", self.report_directory, e
            )
            return {}
        out: dict[str, CounterReading] = {}
        for entry in entries:
            if entry.name.startswith(".") or not entry.name.endswith(".json"):
                continue  # temporary files of writers in progress, and anything else
            reading = self._read_report(entry)
            if reading is not None and now_s - reading.time_s <= self.max_age_s:
                out[reading.job_id] = reading
        return out

    def _read_report(self, entry: os.DirEntry[str]) -> CounterReading | None:
        job_id = entry.name.removesuffix(".json")
        mtime_ns = 0
        try:
            # O_NOFOLLOW and the size cap: the directory is writable by jobs, so trust
            # no file in it to be small or even a regular file.
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            try:
                st = os.fstat(fd)
                mtime_ns = st.st_mtime_ns
                if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_REPORT_BYTES:
                    raise ValueError("not a small regular file")
                data = os.read(fd, MAX_REPORT_BYTES + 1)
            finally:
                os.close(fd)
            reading = _decode_report(job_id, data)
        except FileNotFoundError:
            return None  # the job removed it after we listed the directory
        except (OSError, ValueError) as e:
            self._bad_report(entry.name, mtime_ns, str(e))
            return None
        self._bad_files.pop(entry.name, None)
        return reading

    def _bad_report(self, name: str, mtime_ns: int, why: str) -> None:
        if self._bad_files.get(name) == mtime_ns:
            return  # this version of the file was already counted
        self._bad_files[name] = mtime_ns
        self._count_and_log_once(f"file:{name}", "ignoring job report %s: %s", name, why)

    # --- prometheus ---
    def _scrape_all(self, active_jobs: Iterable[str] | None) -> list[tuple[str, str, float | None]]:
        """(job id, unit, counter or None when this scrape failed) for each target in play."""
        jobs = None if active_jobs is None else sorted(set(active_jobs))
        pages: dict[str, str | Exception] = {}  # one GET per URL per cycle
        out: list[tuple[str, str, float | None]] = []
        for job_id, target in self._resolve_targets(jobs):
            url = target.url.replace("{job_id}", job_id)
            if url not in pages:
                pages[url] = self._fetch(url)
            page = pages[url]
            key = f"{url} {target.metric}"  # failure state per counter: one page, many metrics
            try:
                if isinstance(page, Exception):
                    raise page
                value = counter_total(page, target.metric, target.labels)
                if value is None:
                    raise ValueError(f"metric {target.metric!r} not found")
                if not math.isfinite(value):
                    raise ValueError(f"metric {target.metric!r} is {value}")
            except (httpx.HTTPError, ValueError) as e:
                self._scrape_failed(key, e)
                out.append((job_id, target.unit, None))
                continue
            if key in self._failing:
                self._failing.discard(key)
                log.info("scraping %s works again", key)
            out.append((job_id, target.unit, value))
        return out

    def _resolve_targets(self, jobs: list[str] | None) -> list[tuple[str, ScrapeTarget]]:
        pairs: dict[str, ScrapeTarget] = {}
        for key, target in self.targets.items():
            if any(c in key for c in "*?["):
                for job_id in jobs or ():
                    if fnmatch.fnmatchcase(job_id, key):
                        pairs.setdefault(job_id, target)  # first matching pattern wins
        for key, target in self.targets.items():  # an exact key beats any pattern
            if not any(c in key for c in "*?[") and (jobs is None or key in jobs):
                pairs[key] = target
        return sorted(pairs.items())

    def _fetch(self, url: str) -> str | Exception:
        """The page's text, or the error that prevented it (raised later, per target)."""
        if self._client is None:
            # trust_env=False: targets are local or in-cluster; an HTTP(S)_PROXY meant for
            # the internet must not capture them.
            self._client = httpx.Client(timeout=self.timeout_s, trust_env=False)
        try:
            resp = self._client.get(url, headers={"Accept": "text/plain;version=0.0.4"})
            resp.raise_for_status()
            return resp.text
        except (httpx.HTTPError, ValueError) as e:
            return e

    def _scrape_failed(self, key: str, err: Exception) -> None:
        self.errors_total += 1
        if key not in self._failing:
            self._failing.add(key)
            log.warning("scraping %s failed: %s (logged once until it recovers)", key, err)

    def _count_and_log_once(self, key: str, msg: str, *args: object) -> None:
        self.errors_total += 1
        self._logged(key, logging.WARNING, msg + " (logged once)", *args)


def _decode_report(job_id: str, data: bytes) -> CounterReading:
    """Validate one report file; ``ValueError`` says what is wrong with it."""
    try:  # strict: no duplicate keys, no huge integers, no deep nesting (RecursionError)
        doc = parse_json(data.decode("utf-8"), "report")
    except InputError as e:
        raise ValueError(f"not JSON: {e.problem}") from None
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    if doc.get("job_id") != job_id or not JOB_ID_PATTERN.match(job_id):
        raise ValueError(f"job_id {doc.get('job_id')!r} does not match the file name")
    unit = doc.get("unit")
    if not isinstance(unit, str) or not unit:
        raise ValueError(f"unit must be a non-empty string, not {unit!r}")
    return CounterReading(job_id, _number(doc, "counter"), unit, _number(doc, "time"))


def _number(doc: Mapping[str, object], key: str) -> float:
    value = doc.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key} must be a number, not {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{key} must be finite, not {value!r}")
    return float(value)
