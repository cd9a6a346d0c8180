"""The store the configuration names: InfluxDB when ``store.influx_url`` is set, else embedded.

Every command and service opens its store through here, so the agent, the
optimizer and the CLI always agree on where telemetry and plans live.
"""

from __future__ import annotations

from dcenergy.config import Config, store_password, store_token
from dcenergy.store import EmbeddedStore, InfluxStore, open_store


def open_configured_store(cfg: Config) -> InfluxStore | EmbeddedStore:
    s = cfg.store
    if s.embedded:
        cfg.embedded_store_path.parent.mkdir(parents=True, exist_ok=True)
        return open_store(None, s.database, embedded_path=cfg.embedded_store_path)
    return open_store(
        s.influx_url,
        s.database,
        embedded_path=cfg.embedded_store_path,
        token=store_token(cfg),
        username=s.username or None,
        password=store_password(cfg),
        ca_file=s.ca_file or None,
        verify_tls=s.verify_tls,
        timeout_s=s.timeout_s,
        create_database=s.create_database,
    )
