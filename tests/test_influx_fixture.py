from tests.influx_server import InfluxServer


def test_influxd_answers_and_keeps_a_point(influxd: InfluxServer, influx_db: str) -> None:
    import httpx

    r = httpx.post(
        f"{influxd.url}/write", params={"db": influx_db, "precision": "ns"}, content=b"m v=1 1000"
    )
    assert r.status_code == 204
    res = influxd.query("SELECT v FROM m", db=influx_db)
    series = res["results"][0]["series"][0]  # type: ignore[index]
    assert series["values"] == [[1000, 1]]
