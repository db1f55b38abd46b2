"""The Grafana dashboard and alert rules, checked against a real Prometheus.

Deterministic: series for every metric the code defines (streams/metrics.py, introspected, so a
renamed metric or label breaks this test) are written as OpenMetrics with fixed timestamps,
turned into a TSDB block by promtool, served by a real Prometheus, and every panel's query must
succeed and return data at the fixture's end.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import Counter, Gauge, Histogram

from streams import metrics

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "ops/grafana/promptcot.json"
PROM_DIR = ROOT / "ops/prometheus"
needs_prometheus = pytest.mark.skipif(
    shutil.which("prometheus") is None or shutil.which("promtool") is None,
    reason="Debian prometheus not installed (bash ops/setup.sh --dev installs it)",
)

# One realistic value per label; the dashboard's label matchers must find these.
LABEL_VALUES = {
    "stage": ["generate", "verify"],
    "topic": ["candidates"],
    "reason": ["near_duplicate"],
    "domain": ["math"],
    "role": ["solver"],
    "kind": ["completion"],
    "outcome": ["ok"],
    "measure": ["mean_pairwise_distance"],
    "group": ["promptcot-generate"],
    "partition": ["0", "1"],
    "step": ["m_step"],
    "benchmark": ["gsm8k"],
    "version": ["solver/v0002-dpo"],
    "verdict": ["same"],
}


def _panels(dashboard: dict) -> list[dict]:
    out = []
    for p in dashboard["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # collapsed rows nest their panels
    return [p for p in out if p.get("type") != "row"]


def _exprs(dashboard: dict) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in _panels(dashboard) for t in p.get("targets", [])]


def test_dashboard_json_is_what_the_builder_writes():
    spec = importlib.util.spec_from_file_location(
        "build_dashboard", ROOT / "ops/grafana/build_dashboard.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert json.loads(DASHBOARD.read_text()) == module.dashboard(), (
        "run ops/grafana/build_dashboard.py"
    )


def test_every_panel_has_a_query_and_names_only_defined_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    defined = {c._name for c in _collectors()}
    exprs = _exprs(dashboard)
    assert len(exprs) >= 10
    for title, expr in exprs:
        names = set(re.findall(r"\b(promptcot_[a-z_]+?)(?:_total|_bucket|_sum|_count)?\b", expr))
        assert names, title
        assert names <= defined, f"{title}: unknown metrics {names - defined}"


def _collectors():
    return [v for v in vars(metrics).values() if isinstance(v, (Counter, Gauge, Histogram))]


def _label_sets(names: tuple[str, ...]) -> list[dict[str, str]]:
    sets: list[dict[str, str]] = [{}]
    for name in names:
        sets = [{**s, name: v} for s in sets for v in LABEL_VALUES[name]]
    return sets


def _fmt(labels: dict[str, str]) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else ""


def openmetrics_fixture(end: int, minutes: int = 30, step: int = 15) -> str:
    lines: list[str] = []
    times = list(range(end - minutes * 60, end + 1, step))
    for c in _collectors():
        name, labelnames = c._name, tuple(c._labelnames)
        kind = {Counter: "counter", Gauge: "gauge", Histogram: "histogram"}[type(c)]
        lines.append(f"# TYPE {name} {kind}")
        for labels in _label_sets(labelnames):
            for i, ts in enumerate(times):
                if kind == "counter":
                    lines.append(f"{name}_total{_fmt(labels)} {i * 3} {ts}")
                elif kind == "gauge":
                    lines.append(f"{name}{_fmt(labels)} {1 + i % 5} {ts}")
                else:
                    buckets = [*c._upper_bounds[:-1]]
                    for j, le in enumerate(buckets):
                        lines.append(
                            f"{name}_bucket{_fmt({**labels, 'le': str(float(le))})} "
                            f"{i * (j + 1)} {ts}"
                        )
                    lines.append(
                        f"{name}_bucket{_fmt({**labels, 'le': '+Inf'})} "
                        f"{i * (len(buckets) + 1)} {ts}"
                    )
                    lines.append(f"{name}_sum{_fmt(labels)} {i * 2.5} {ts}")
                    lines.append(f"{name}_count{_fmt(labels)} {i * (len(buckets) + 1)} {ts}")
    # OpenMetrics wants each family's samples contiguous and in time order per series: sort by
    # family then series then time, keeping TYPE lines first.
    out, family = [], None
    body: dict[str, list[str]] = {}
    for line in lines:
        if line.startswith("# TYPE"):
            family = line
            body[family] = []
        else:
            body[family].append(line)
    for fam, samples in body.items():
        out.append(fam)
        samples.sort(key=lambda s: (s.rsplit(" ", 2)[0], int(s.rsplit(" ", 1)[1])))
        out.extend(samples)
    return "\n".join(out) + "\n# EOF\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory):
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus not installed")
    work = tmp_path_factory.mktemp("prom")
    end = int(time.time()) - 120
    (work / "fixture.om").write_text(openmetrics_fixture(end))
    subprocess.run(
        [
            "promtool",
            "tsdb",
            "create-blocks-from",
            "openmetrics",
            str(work / "fixture.om"),
            str(work / "data"),
        ],
        check=True,
        capture_output=True,
    )
    (work / "prometheus.yml").write_text("global:\n  scrape_interval: 15s\nscrape_configs: []\n")
    port = _free_port()
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={work / 'prometheus.yml'}",
            f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=30d",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{base}/-/ready", timeout=1)
            break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("prometheus did not become ready")
    yield base, end
    proc.terminate()
    proc.wait(timeout=10)


def _query(base: str, expr: str, at: int) -> dict:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr, "time": at})
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


@needs_prometheus
def test_every_dashboard_query_returns_data_from_real_prometheus(prometheus):
    base, end = prometheus
    for title, expr in _exprs(json.loads(DASHBOARD.read_text())):
        concrete = expr.replace("$__rate_interval", "2m").replace("$__interval", "1m")
        assert "$" not in concrete, f"{title}: unresolved variable in {expr}"
        answer = _query(base, concrete, end)
        assert answer["status"] == "success", (title, answer)
        assert answer["data"]["result"], f"{title}: no data for {concrete}"


@needs_prometheus
def test_a_misspelled_metric_returns_nothing(prometheus):
    """The check above can fail: a query for a metric that does not exist comes back empty."""
    base, end = prometheus
    answer = _query(base, "sum(rate(promptcot_acepted_total[2m]))", end)
    assert answer["status"] == "success" and answer["data"]["result"] == []


@needs_prometheus
def test_alert_rules_check_and_unit_tests_pass():
    subprocess.run(
        ["promtool", "check", "rules", str(PROM_DIR / "alerts.yml")],
        check=True,
        capture_output=True,
    )
    result = subprocess.run(
        ["promtool", "test", "rules", "alerts_test.yml"],
        cwd=PROM_DIR,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
