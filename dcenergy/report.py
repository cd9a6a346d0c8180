"""Report a job's cumulative work counter to the dcenergy agent on this host.

Standard library only: jobs import this module without pulling in the rest of
dcenergy (numpy, scipy, NVML). The channel is a directory of small JSON files,
one per job, replaced atomically (write a temporary file, then rename), so the
agent never reads half a file and any language can take part::

    {"job_id": "1234", "counter": 1.5e9, "unit": "tokens", "time": 1700000000.0}

``counter`` is cumulative (total tokens, samples or steps since the job
began), never a rate: the agent computes rates, and a lost or late write only
lengthens the interval. See docs/job-throughput.md.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
import time
from pathlib import Path

DEFAULT_REPORT_DIR = Path("/run/dcenergy/jobs")
REPORT_DIR_ENV = "DCENERGY_JOBS_DIR"

# Safe as a file name, and covers Slurm ids (1234, 1234_7, 1234+0), pod UIDs, container ids.
JOB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,199}$")


def report_dir(directory: str | os.PathLike[str] | None = None) -> Path:
    """The channel directory: the argument, else ``$DCENERGY_JOBS_DIR``, else the default."""
    if directory is not None:
        return Path(directory)
    env = os.environ.get(REPORT_DIR_ENV)
    return Path(env) if env else DEFAULT_REPORT_DIR


def report_progress(
    job_id: str,
    counter: float,
    unit: str = "tokens",
    directory: str | os.PathLike[str] | None = None,
    *,
    time_s: float | None = None,
) -> Path:
    """Atomically publish ``job_id``'s cumulative ``counter`` of ``unit``; returns the file.

    Cheap enough to call every few seconds from a training or serving loop.
    ``time_s`` defaults to ``time.time()`` (the agent reads it as the moment the
    counter had this value). Raises ``ValueError`` for an unusable job id,
    counter or unit, and ``OSError`` if the directory cannot be written: the
    caller decides whether telemetry is worth failing a job over.
    """
    if not JOB_ID_PATTERN.match(job_id):
        raise ValueError(f"job id {job_id!r} must match {JOB_ID_PATTERN.pattern}")
    value = float(counter)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"counter must be a finite, non-negative number, not {counter!r}")
    if not unit:
        raise ValueError("unit must be a non-empty string (tokens, samples, steps)")
    stamp = time.time() if time_s is None else float(time_s)
    body = json.dumps({"job_id": job_id, "counter": value, "unit": unit, "time": stamp})

    target_dir = report_dir(directory)
    target = target_dir / f"{job_id}.json"
    # Same directory, so the rename is atomic; the leading dot hides it from the agent.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{job_id}.", suffix=".tmp", dir=target_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(body)
        os.chmod(tmp_name, 0o644)  # mkstemp makes it 0600; the agent may run as another user
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    return target
