"""Metrics and the HTTP side, checked against what clients saw, by promtool, and by a real Prometheus
that scrapes a short GRPO run and answers every query of the Grafana dashboard."""
from __future__ import annotations

import dataclasses
import io
import json
import math
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load_file

from conftest import REPO
from debian_tools import require_commands
from fastgrpo.client import RolloutClient, Sampling
from fastgrpo.client.local import ServiceProcess
from fastgrpo.common.http import HttpSide, Startup
from fastgrpo.learner.config import LearnerConfig
from fastgrpo.learner.metrics import exported
from fastgrpo.learner.run import run_training

pytestmark = pytest.mark.system

DASHBOARD = REPO / "docker" / "grafana" / "dashboards" / "fastgrpo.json"


def http_get(url: str, timeout: float = 10.0) -> tuple[int, str, str]:
    """(status, content type, body) of a GET, error statuses included."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("Content-Type", ""), err.read().decode()


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of a /metrics exposition."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------ HTTP side
@pytest.mark.service
def test_http_side_probes_and_port_release():
    registry = CollectorRegistry()
    Counter("fastgrpo_test_events", "events", registry=registry).inc(3)
    ready = threading.Event()
    side = HttpSide(registry, ready.is_set, "127.0.0.1", 0)
    base = f"http://127.0.0.1:{side.port}"
    try:
        assert http_get(base + "/healthz")[0] == 200
        status, _, body = http_get(base + "/readyz")
        assert (status, json.loads(body)) == (503, {"ready": False})
        ready.set()
        assert http_get(base + "/readyz")[0] == 200
        status, ctype, text = http_get(base + "/metrics")
        assert status == 200 and ctype.startswith("text/plain")
        assert samples(text)[("fastgrpo_test_events_total", ())] == 3
        assert http_get(base + "/nope")[0] == 404
    finally:
        side.stop()


@pytest.mark.service
def test_readyz_says_what_a_starting_service_is_doing():
    startup = Startup()
    side = HttpSide(CollectorRegistry(), startup.is_ready, "127.0.0.1", 0, status=startup.body)
    base = f"http://127.0.0.1:{side.port}"
    try:
        startup.begin("loading the model")
        startup.begin("allocating the KV cache and compiling the decode step")
        status, _, body = http_get(base + "/readyz")
        doc = json.loads(body)
        assert status == 503 and doc["ready"] is False
        assert doc["stage"] == "allocating the KV cache and compiling the decode step" and doc["stage_seconds"] >= 0
        assert set(doc["stages_done"]) == {"starting", "loading the model"}
        startup.ready()
        status, _, body = http_get(base + "/readyz")
        doc = json.loads(body)
        assert status == 200 and doc["ready"] is True and doc["stage"] == "serving" and "stage_seconds" not in doc
        assert "allocating the KV cache and compiling the decode step" in doc["stages_done"]
    finally:
        side.stop()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", side.port), timeout=2).close()


@pytest.mark.parametrize("argv", [["fastgrpo.rollout", "serve"], ["fastgrpo.learner.cli", "train"],
                                  ["fastgrpo.learner.cli", "demo"]])
def test_help_documents_the_http_port(argv):
    done = subprocess.run([sys.executable, "-m", *argv, "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "--http-port" in done.stdout


# ------------------------------------------------------------------------------------------ rollout metrics
@pytest.mark.service
def test_rollout_metrics_agree_with_completions_and_status(fixture_dir, draft_dir, start_service):
    """Counters equal the sums of what the client received; scrape-time gauges equal GetStatus."""
    app = start_service(fixture_dir, draft=str(draft_dir), max_running=8, http_port=0, draft_every_n_batches=0,
                        spec_mode="static", spec_sources="head,siblings,history")
    base = f"http://127.0.0.1:{app.http.port}"
    assert http_get(base + "/healthz")[0] == 200 and http_get(base + "/readyz")[0] == 200
    client = RolloutClient(f"127.0.0.1:{app.port}")
    batch = client.generate_batch([[1, 2, 3, 4], [5, 6, 7]], 3, Sampling(temperature=1.0, max_new_tokens=24, seed=3))
    done = batch.flat()
    name = "model.norm.weight"
    pushed = client.push_weights({name: load_file(str(Path(fixture_dir) / "model.safetensors"))[name]}, "full",
                                 verify=False)[0]
    status = client.status()
    m = samples(http_get(base + "/metrics")[2])
    client.close()

    verify = sum(c.spec.verify_steps for c in done)
    accepted = sum(c.spec.accepted_tokens for c in done)
    assert verify > 0 and accepted > 0  # a trained draft: speculation ran and was accepted
    assert m[("fastgrpo_rollout_requests_total", ())] == 1
    assert m[("fastgrpo_rollout_generated_tokens_total", ())] == sum(len(c.token_ids) for c in done)
    assert m[("fastgrpo_rollout_drafted_tokens_total", ())] == sum(c.spec.drafted_tokens for c in done)
    assert m[("fastgrpo_rollout_verify_steps_total", ())] == verify
    depths = max(len(c.spec.accepted_per_depth) for c in done)
    for d in range(1, depths + 1):
        by_depth = sum(c.spec.accepted_per_depth[d - 1] for c in done if len(c.spec.accepted_per_depth) >= d)
        assert m[("fastgrpo_rollout_accepted_tokens_total", (("depth", str(d)),))] == by_depth
    spec = status.speculation
    assert spec.sources == "head,siblings,history"
    for source in ("head", "siblings", "history"):
        total = sum(getattr(c.spec, f"accepted_{source}") for c in done)
        assert m[("fastgrpo_rollout_source_accepted_tokens_total", (("source", source),))] == total, source
        assert getattr(spec, f"accepted_{source}") == total, source
    assert sum(c.spec.accepted_siblings for c in done) > 0  # 3 samples of a prompt drafted from each other
    assert spec.history_prompts == 2 and spec.history_tokens == sum(len(c.token_ids) for c in done)
    assert m[("fastgrpo_rollout_draft_history_tokens", ())] == spec.history_tokens
    # the histogram is fed per step by the engine, the counters per sequence: both count the same steps
    assert m[("fastgrpo_rollout_acceptance_length_count", ())] == verify
    assert m[("fastgrpo_rollout_acceptance_length_sum", ())] == verify + accepted
    reasons = {r: sum(c.finish_reason == r for c in done) for r in ("stop", "length")}
    for r, n in reasons.items():
        assert m[("fastgrpo_rollout_finished_sequences_total", (("reason", r),))] == n
    assert m[("fastgrpo_rollout_time_to_first_token_seconds_count", ())] == len(done)
    assert m[("fastgrpo_rollout_e2e_latency_seconds_count", ())] == len(done)
    assert m[("fastgrpo_rollout_estimated_speedup", ())] > 1
    assert m[("fastgrpo_rollout_weight_update_seconds_count", (("target", "policy"),))] == 1
    assert m[("fastgrpo_rollout_weight_update_bytes_total", (("target", "policy"),))] == pushed.bytes_sent > 0
    for metric, value in [("running_sequences", status.running_sequences), ("queued_sequences", status.queued_sequences),
                          ("max_running_sequences", 8), ("policy_version", 1), ("draft_version", status.draft_version),
                          ("spec_n_verify", spec.n_verify), ("spec_width", spec.width), ("spec_depth", spec.depth),
                          ("spec_c_peak", spec.c_peak), ("spec_c_peak_start", spec.c_peak_start),
                          ("spec_c_peak_updates_total", spec.c_peak_updates), ("spec_batch_size", spec.batch_size),
                          ("spec_alpha", spec.alpha)]:
        assert m[(f"fastgrpo_rollout_{metric}", ())] == value, metric
    assert (spec.n_verify, spec.width, spec.depth) == (16, 4, 5)  # the static tree's defaults
    assert ("fastgrpo_rollout_draft_loss", ()) not in m  # no round ran yet: no loss to show
    assert m[("fastgrpo_rollout_draft_rounds_total", ())] == 0


# ------------------------------------------------------------------------------------------ a short run, scraped
class Prometheus:
    """A Prometheus server of Debian's package on a free 127.0.0.1 port, with its own config and storage."""

    def __init__(self, config: dict, workdir: Path):
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = open(workdir / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address={self.url.removeprefix('http://')}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT)
        try:
            self.wait_for(lambda: http_get(self.url + "/-/ready", timeout=2)[0] == 200, 60, "Prometheus did not get ready")
        except AssertionError:
            self.stop()
            raise

    def query(self, expr: str) -> list[dict]:
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        status, _, body = http_get(url)
        reply = json.loads(body)
        assert status == 200 and reply["status"] == "success", (expr, body)
        return reply["data"]["result"]

    def wait_for(self, ok, timeout: float, message: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if ok():
                    return
            except (OSError, ValueError):
                pass  # not up yet
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.log.flush()
                log = (Path(self.log.name).read_text())[-3000:]
                raise AssertionError(f"{message}\nPrometheus log:\n{log}")
            time.sleep(0.25)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def scrape_config(rollout: str, learner: str) -> dict:
    """docker/prometheus.yml with the compose service names replaced by this run's addresses, and a
    1 s scrape interval so that a short run leaves enough samples."""
    config = yaml.safe_load((REPO / "docker" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    targets = {"rollout": rollout, "learner": learner}
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
    return config


def first_value(result: list[dict]) -> float:
    return float(result[0]["value"][1])


@pytest.fixture(scope="module")
def scraped_run(fixture_dir, draft_dir, tmp_path_factory):
    """Rollout service (own process, adaptive trees, online draft learning) and learner (two GRPO
    steps, its HTTP side exactly as `fastgrpo-learner train --http-port` runs it), both scraped by
    Prometheus every second; yields once Prometheus holds the final step."""
    require_commands("prometheus", "promtool")
    steps = 2
    cfg = LearnerConfig(model=str(fixture_dir), steps=steps, prompts_per_step=6, group_size=4, max_new_tokens=40,
                        eval_size=0, micro_batch=24, lr=2e-4, http_port=0,
                        push_kind="full")  # pushed every step: a dense delta is skipped when every advantage was 0
    out = io.StringIO()  # receives the 'http on HOST:PORT' line, as a script reading the learner's stdout would
    with ServiceProcess(fixture_dir, "--draft", str(draft_dir), "--spec-mode", "adaptive", "--c-peak", "64",
                        "--spec-sources", "head,siblings,history", "--max-running", "24", threads=1,
                        http_port=0) as rollout, \
            exported(cfg.http_host, cfg.http_port, out) as metrics:
        learner_address = re.search(r"http on (\S+)", out.getvalue()).group(1)
        prom = Prometheus(scrape_config(rollout.http_address, learner_address), tmp_path_factory.mktemp("prometheus"))
        try:
            prom.wait_for(lambda: len(prom.query("up == 1")) == 2, 60, "both targets should be up")
            started = time.monotonic()
            run_training(dataclasses.replace(cfg, rollout=rollout.address), out, metrics)
            prom.wait_for(lambda: first_value(prom.query("fastgrpo_learner_steps_total")) == steps
                          and first_value(prom.query("fastgrpo_rollout_draft_rounds_total")) >= 1
                          and first_value(prom.query("sum(fastgrpo_rollout_weight_update_seconds_count)")) >= steps,
                          120, "Prometheus should hold the final step, a draft round and every step's push")
            yield {"prometheus": prom, "rollout": f"http://{rollout.http_address}", "rollout_grpc": rollout.address,
                   "learner": f"http://{learner_address}", "seconds": time.monotonic() - started, "log": out.getvalue()}
        finally:
            prom.stop()


def test_promtool_accepts_the_metrics_of_both_services(scraped_run):
    for service in ("rollout", "learner"):
        status, _, text = http_get(scraped_run[service] + "/metrics")
        assert status == 200 and f"fastgrpo_{service}_" in text
        done = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
        assert (done.returncode, done.stdout, done.stderr) == (0, "", ""), service


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel, rows' nested panels included."""
    def walk(panels):
        for p in panels:
            yield p
            yield from walk(p.get("panels", []))

    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in walk(dash["panels"]) for t in p.get("targets", [])]


def test_every_dashboard_query_returns_data(scraped_run):
    prom = scraped_run["prometheus"]
    # Grafana replaces $__rate_interval by a window of its own choosing; this one spans the whole run
    window = f"{math.ceil(scraped_run['seconds']) + 30}s"
    queries = dashboard_queries()
    assert len(queries) >= 20
    for title, expr in queries:
        result = prom.query(expr.replace("$__rate_interval", window))
        assert result, f"panel {title!r}: no data for {expr}"
        values = [float(r["value"][1]) for r in result]
        assert any(math.isfinite(v) for v in values), f"panel {title!r}: only NaN/Inf for {expr}: {values}"
    # the quantities the dashboard is for came out of this run, not out of initial zeros
    mean_accept = first_value(prom.query(
        f"sum(rate(fastgrpo_rollout_acceptance_length_sum[{window}])) / sum(rate(fastgrpo_rollout_acceptance_length_count[{window}]))"))
    assert mean_accept > 1
    assert first_value(prom.query("fastgrpo_rollout_spec_c_peak_start")) == 64
    assert first_value(prom.query(f"sum(increase(fastgrpo_rollout_weight_update_seconds_count[{window}]))")) >= 1
    assert len(prom.query("fastgrpo_learner_step_phase_seconds > 0")) == 4
    up = prom.query("fastgrpo_learner_replica_up")  # the learner's view of its one rollout replica
    assert [(r["metric"]["replica"], float(r["value"][1])) for r in up] == [(scraped_run["rollout_grpc"], 1.0)]
    assert 0 <= first_value(prom.query("fastgrpo_learner_accuracy")) <= 1
