"""Job throughput: the report channel, the Prometheus parser, and rates from both."""

from __future__ import annotations

import http.server
import json
import logging
import math
import os
import re
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from agent.throughput import (
    Rate,
    ScrapeTarget,
    ThroughputTracker,
    counter_total,
    parse_sample_line,
)
from dcenergy.report import REPORT_DIR_ENV, report_progress

DOCS = Path(__file__).parent.parent.parent / "docs" / "job-throughput.md"


# --- the writer: dcenergy.report ---------------------------------------------------


def test_report_progress_writes_one_complete_file(tmp_path: Path) -> None:
    path = report_progress("1234", 1500.0, "tokens", tmp_path, time_s=100.0)
    assert path == tmp_path / "1234.json"
    assert json.loads(path.read_text()) == {
        "job_id": "1234",
        "counter": 1500.0,
        "unit": "tokens",
        "time": 100.0,
    }
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # an agent running as another user reads it
    report_progress("1234", 3000.0, "tokens", tmp_path, time_s=101.0)
    assert json.loads(path.read_text())["counter"] == 3000.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1234.json"]  # no temp files left


def test_failed_rename_keeps_the_old_report_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    report_progress("7", 1.0, "steps", tmp_path, time_s=1.0)

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk on fire"):
        report_progress("7", 2.0, "steps", tmp_path, time_s=2.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["7.json"]
    assert json.loads((tmp_path / "7.json").read_text())["counter"] == 1.0


@pytest.mark.parametrize(
    ("job_id", "counter", "unit"),
    [
        ("../etc/passwd", 1.0, "tokens"),
        (".hidden", 1.0, "tokens"),
        ("", 1.0, "tokens"),
        ("1234", math.nan, "tokens"),
        ("1234", -1.0, "tokens"),
        ("1234", 1.0, ""),
    ],
)
def test_report_progress_rejects_bad_input(
    tmp_path: Path, job_id: str, counter: float, unit: str
) -> None:
    with pytest.raises(ValueError):
        report_progress(job_id, counter, unit, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_report_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(REPORT_DIR_ENV, str(tmp_path))
    assert report_progress("1", 1.0) == tmp_path / "1.json"
    assert ThroughputTracker().report_directory == tmp_path


def test_plain_python_client_from_the_docs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The docs' no-dcenergy example writes files the tracker accepts."""
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.S)
    plain = next(b for b in blocks if "def report(" in b)
    assert "from dcenergy" not in plain and "import dcenergy" not in plain
    assert len(plain.strip().splitlines()) <= 10
    monkeypatch.setenv(REPORT_DIR_ENV, str(tmp_path))
    namespace: dict[str, object] = {}
    exec(plain, namespace)
    report = namespace["report"]
    assert callable(report)
    report("555", 100.0, "samples")
    readings = ThroughputTracker(tmp_path).read_reports(
        now_s=float(json.loads((tmp_path / "555.json").read_text())["time"])
    )
    assert readings["555"].counter == 100.0 and readings["555"].unit == "samples"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["555.json"]


# --- the reader: rates from reports ---------------------------------------------------


def write(
    directory: Path, job_id: str, counter: float, time_s: float, unit: str = "tokens"
) -> None:
    report_progress(job_id, counter, unit, directory, time_s=time_s)


def test_rate_between_two_reports(tmp_path: Path) -> None:
    tracker = ThroughputTracker(tmp_path)
    write(tmp_path, "a", 1000.0, 100.0)
    assert tracker.rates(100.5) == {}  # one reading: no rate yet
    write(tmp_path, "a", 5000.0, 102.0)
    assert tracker.rates(102.5) == {"a": Rate(2000.0, "tokens", "report")}


def test_rate_is_held_until_the_next_report(tmp_path: Path) -> None:
    tracker = ThroughputTracker(tmp_path, max_age_s=30.0)
    write(tmp_path, "a", 0.0, 0.0)
    tracker.rates(0.0)
    write(tmp_path, "a", 100.0, 10.0)
    assert tracker.rates(10.0)["a"].value_per_s == 10.0
    for now in (11.0, 15.0, 39.0):  # the job reports every 10 s; the agent samples each second
        assert tracker.rates(now)["a"].value_per_s == 10.0
    write(tmp_path, "a", 100.0, 20.0)  # no work done since: the rate is zero, not held
    assert tracker.rates(20.0)["a"].value_per_s == 0.0


def test_counter_reset_restarts_without_negative_rate(tmp_path: Path) -> None:
    tracker = ThroughputTracker(tmp_path)
    write(tmp_path, "a", 9000.0, 0.0)
    tracker.rates(0.0)
    write(tmp_path, "a", 10000.0, 1.0)
    assert tracker.rates(1.0)["a"].value_per_s == 1000.0
    write(tmp_path, "a", 50.0, 2.0)  # the job restarted
    assert tracker.rates(2.0) == {}
    write(tmp_path, "a", 350.0, 3.0)
    assert tracker.rates(3.0)["a"].value_per_s == 300.0


def test_stale_report_is_ignored(tmp_path: Path) -> None:
    tracker = ThroughputTracker(tmp_path, max_age_s=60.0)
    write(tmp_path, "a", 0.0, 0.0)
    write(tmp_path, "b", 0.0, 0.0)
    tracker.rates(1.0)
    write(tmp_path, "a", 100.0, 10.0)
    write(tmp_path, "b", 100.0, 10.0)
    assert set(tracker.rates(70.0)) == {"a", "b"}  # 60 s old: still fresh
    write(tmp_path, "b", 200.0, 70.0)
    assert set(tracker.rates(70.5)) == {"b"}  # a is 60.5 s old
    assert set(tracker.read_reports(70.5)) == {"b"}


def test_temp_and_foreign_files_are_ignored(tmp_path: Path) -> None:
    (tmp_path / ".a.x1y2.tmp").write_text('{"job_id": "a", "counter": 1')  # writer mid-way
    (tmp_path / "notes.txt").write_text("hello")
    tracker = ThroughputTracker(tmp_path)
    assert tracker.read_reports(0.0) == {}
    assert tracker.errors_total == 0


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[1, 2]",
        '{"job_id": "other", "counter": 1, "unit": "tokens", "time": 0}',
        '{"job_id": "a", "counter": "many", "unit": "tokens", "time": 0}',
        '{"job_id": "a", "counter": true, "unit": "tokens", "time": 0}',
        '{"job_id": "a", "counter": NaN, "unit": "tokens", "time": 0}',
        '{"job_id": "a", "counter": 1, "unit": "", "time": 0}',
        '{"job_id": "a", "counter": 1, "unit": "tokens"}',
    ],
)
def test_bad_report_counted_once_logged_once(
    tmp_path: Path, content: str, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "a.json").write_text(content)
    write(tmp_path, "good", 1.0, 0.0)
    tracker = ThroughputTracker(tmp_path)
    with caplog.at_level(logging.WARNING, logger="agent.throughput"):
        for now in range(3):
            assert set(tracker.read_reports(float(now))) == {"good"}
    assert tracker.errors_total == 1
    assert len(caplog.records) == 1


def test_symlink_and_huge_files_are_refused(tmp_path: Path) -> None:
    secret = tmp_path / "outside"
    secret.write_text('{"job_id": "s", "counter": 1, "unit": "tokens", "time": 0}')
    reports = tmp_path / "jobs"
    reports.mkdir()
    (reports / "s.json").symlink_to(secret)
    (reports / "h.json").write_text(" " * (65 * 1024))
    tracker = ThroughputTracker(reports)
    assert tracker.read_reports(0.0) == {}
    assert tracker.errors_total == 2


def test_missing_directory_is_quiet(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tracker = ThroughputTracker(tmp_path / "nope")
    with caplog.at_level(logging.DEBUG, logger="agent.throughput"):
        assert tracker.rates(0.0) == {}
    assert tracker.errors_total == 0
    assert caplog.records == []


# --- Prometheus text format -----------------------------------------------------------

VLLM_PAGE = r"""# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{model_name="llama-3-8b"} 1500.0
vllm:generation_tokens_total{model_name="mistral \"7b\"\\v0.2"} 500
vllm:generation_tokens_created{model_name="llama-3-8b"} 1.7e9
# a free comment mentioning vllm:generation_tokens_total 99999
vllm:generation_tokens_totally_other 12345
vllm:prompt_tokens_total{model_name="llama-3-8b"} 777

# HELP process_cpu_seconds_total Total user and system CPU time {weird}.
process_cpu_seconds_total 12.5 1700000000000
"""


def test_counter_sums_label_sets_and_skips_comments() -> None:
    assert counter_total(VLLM_PAGE, "vllm:generation_tokens_total") == 2000.0


def test_counter_label_filter_with_escaped_values() -> None:
    value = counter_total(
        VLLM_PAGE, "vllm:generation_tokens_total", {"model_name": 'mistral "7b"\\v0.2'}
    )
    assert value == 500.0


def test_counter_without_total_suffix_finds_the_total_series() -> None:
    page = (
        "# TYPE requests counter\n"
        'requests_total{code="200"} 10\n'
        'requests_total{code="500"} 2\n'
        'requests_created{code="200"} 1.7e9\n'
    )
    assert counter_total(page, "requests") == 12.0
    assert counter_total(page, "requests_total") == 12.0
    assert counter_total(page, "absent_total") is None


def test_timestamp_and_exemplar_are_not_the_value() -> None:
    assert counter_total(VLLM_PAGE, "process_cpu_seconds_total") == 12.5
    om = 'steps_total{a="1"} 42 # {trace_id="abc"} 1.0 1700000000\n# EOF\n'
    assert counter_total(om, "steps_total") == 42.0


@pytest.mark.parametrize(
    ("line", "name", "labels", "value"),
    [
        ("up 1", "up", {}, 1.0),
        ("x{} 2", "x", {}, 2.0),
        ('x{a="1",} 3', "x", {"a": "1"}, 3.0),  # trailing comma is allowed
        ('x { a = "1" , b="2" } 4', "x", {"a": "1", "b": "2"}, 4.0),
        ('x{path="a}b,c=d"} 5', "x", {"path": "a}b,c=d"}, 5.0),
        ('x{msg="line\\nbreak"} 6', "x", {"msg": "line\nbreak"}, 6.0),
        ("x +Inf", "x", {}, math.inf),
        ("x -1.5e3", "x", {}, -1500.0),
    ],
)
def test_parse_sample_line(line: str, name: str, labels: dict[str, str], value: float) -> None:
    sample = parse_sample_line(line)
    assert (sample.name, dict(sample.labels), sample.value) == (name, labels, value)


def test_parse_nan() -> None:
    assert math.isnan(parse_sample_line("x NaN").value)


@pytest.mark.parametrize(
    "line", ['x{a="1"', "x{a=1} 2", 'x{a="1" b="2"} 3', "x", "x 1_000", 'x{="1"} 1', "9x 1"]
)
def test_parse_malformed(line: str) -> None:
    with pytest.raises(ValueError):
        parse_sample_line(line)


def test_malformed_line_of_another_metric_does_not_matter() -> None:
    page = "other{broken 1\nwanted_total 3\n"
    assert counter_total(page, "wanted_total") == 3.0
    with pytest.raises(ValueError):
        counter_total("wanted_total{broken 1\n", "wanted_total")


# --- rates from scrapes -------------------------------------------------------------------


class Endpoint:
    """A scripted /metrics: each request serves the next page (or fails)."""

    def __init__(self, pages: list[str | int | Exception]) -> None:
        self.pages = pages
        self.requests: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(str(request.url))
        page = self.pages.pop(0)
        if isinstance(page, Exception):
            raise page
        if isinstance(page, int):
            return httpx.Response(page, text="oops")
        return httpx.Response(200, text=page)


def counter_page(value: float) -> str:
    return (
        "# TYPE vllm:generation_tokens_total counter\n"
        f'vllm:generation_tokens_total{{model_name="a"}} {value / 2}\n'
        f'vllm:generation_tokens_total{{model_name="b"}} {value / 2}\n'
    )


def tracker_for(
    endpoint: Callable[[httpx.Request], httpx.Response],
    targets: dict[str, ScrapeTarget],
    report_dir: Path,
) -> ThroughputTracker:
    client = httpx.Client(transport=httpx.MockTransport(endpoint))
    return ThroughputTracker(report_dir, targets=targets, client=client)


VLLM = ScrapeTarget("http://node/metrics", "vllm:generation_tokens_total", "tokens")


def test_scraped_counter_becomes_a_rate(tmp_path: Path) -> None:
    endpoint = Endpoint([counter_page(1000), counter_page(4000), counter_page(4000)])
    tracker = tracker_for(endpoint, {"job-1": VLLM}, tmp_path)
    assert tracker.rates(10.0) == {}
    assert tracker.rates(12.0) == {"job-1": Rate(1500.0, "tokens", "prometheus")}
    assert tracker.rates(13.0)["job-1"].value_per_s == 0.0


def test_scrape_counter_reset(tmp_path: Path) -> None:
    endpoint = Endpoint([counter_page(1000), counter_page(10), counter_page(110)])
    tracker = tracker_for(endpoint, {"job-1": VLLM}, tmp_path)
    tracker.rates(0.0)
    assert tracker.rates(1.0) == {}  # restarted server: no negative rate
    assert tracker.rates(2.0)["job-1"].value_per_s == 100.0


def test_scrape_failures_counted_logged_once_and_recovered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    endpoint = Endpoint(
        [
            counter_page(0),
            httpx.ConnectError("refused"),
            503,
            "no such metric here 1\n",
            counter_page(400),
        ]
    )
    tracker = tracker_for(endpoint, {"job-1": VLLM}, tmp_path)
    with caplog.at_level(logging.INFO, logger="agent.throughput"):
        rates = [tracker.rates(float(t)) for t in range(5)]
    assert rates[:4] == [{}, {}, {}, {}]
    # The baseline survived the outage: 400 tokens over 4 s.
    assert rates[4] == {"job-1": Rate(100.0, "tokens", "prometheus")}
    assert tracker.errors_total == 3
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "failed" in m]) == 1
    assert len([m for m in messages if "works again" in m]) == 1


def test_pattern_targets_follow_active_jobs(tmp_path: Path) -> None:
    endpoint = Endpoint([counter_page(0), counter_page(0), counter_page(10), counter_page(20)])
    target = ScrapeTarget("http://{job_id}.svc/metrics", "vllm:generation_tokens", "tokens")
    tracker = tracker_for(endpoint, {"vllm-*": target, "exact": VLLM}, tmp_path)
    tracker.rates(0.0, active_jobs=["vllm-b", "vllm-a", "1234"])
    rates = tracker.rates(1.0, active_jobs=["vllm-a", "vllm-b"])
    assert rates == {
        "vllm-a": Rate(10.0, "tokens", "prometheus"),
        "vllm-b": Rate(20.0, "tokens", "prometheus"),
    }
    # "exact" is not running here, "1234" matches no pattern: never scraped.
    assert endpoint.requests == ["http://vllm-a.svc/metrics", "http://vllm-b.svc/metrics"] * 2


def test_one_request_per_url_per_cycle(tmp_path: Path) -> None:
    page = counter_page(100) + "vllm:prompt_tokens_total 50\n"
    endpoint = Endpoint([page])
    targets = {
        "a": VLLM,
        "b": ScrapeTarget("http://node/metrics", "vllm:prompt_tokens_total", "tokens"),
    }
    tracker_for(endpoint, targets, tmp_path).rates(0.0)
    assert len(endpoint.requests) == 1


def test_report_wins_over_prometheus(tmp_path: Path) -> None:
    endpoint = Endpoint([counter_page(0), counter_page(1000)])
    tracker = tracker_for(endpoint, {"j": VLLM}, tmp_path)
    write(tmp_path, "j", 0.0, 0.0, unit="samples")
    tracker.rates(0.0)
    write(tmp_path, "j", 7.0, 1.0, unit="samples")
    assert tracker.rates(1.0) == {"j": Rate(7.0, "samples", "report")}


@pytest.fixture
def loopback_metrics() -> Iterator[tuple[str, list[float]]]:
    """A real HTTP server on 127.0.0.1 serving a counter the test sets."""
    value = [0.0]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = counter_page(value[0]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/metrics", value
    finally:
        server.shutdown()
        server.server_close()


def test_scrape_over_loopback_with_own_client(
    tmp_path: Path, loopback_metrics: tuple[str, list[float]]
) -> None:
    url, value = loopback_metrics
    target = ScrapeTarget(url, "vllm:generation_tokens_total", "tokens")
    tracker = ThroughputTracker(tmp_path, targets={"j": target}, timeout_s=5.0)
    try:
        tracker.rates(0.0)
        value[0] = 600.0
        assert tracker.rates(2.0) == {"j": Rate(300.0, "tokens", "prometheus")}
    finally:
        tracker.close()
