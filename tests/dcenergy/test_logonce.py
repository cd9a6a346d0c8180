import logging

import pytest

from dcenergy.logonce import LogOnce


def test_each_key_logs_once_until_forgotten(caplog: pytest.LogCaptureFixture) -> None:
    once = LogOnce(logging.getLogger("t"))
    with caplog.at_level(logging.WARNING, logger="t"):
        assert once("a", logging.WARNING, "down: %s", 1)
        assert not once("a", logging.WARNING, "down: %s", 2)
        assert once("b", logging.WARNING, "other")
        once.forget("a")
        assert once("a", logging.WARNING, "down: %s", 3)
    assert [r.getMessage() for r in caplog.records] == ["down: 1", "other", "down: 3"]
