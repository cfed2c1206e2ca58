"""Deployment files: docker-compose accepts the compose file, every file the compose file and the
Dockerfiles refer to exists, and the Prometheus, Grafana and entry-point settings agree."""
from __future__ import annotations

import fnmatch
import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from debian_tools import require_commands

pytestmark = pytest.mark.system

COMPOSE = REPO / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_docker_compose_accepts_the_compose_file():
    require_commands("docker-compose")
    done = subprocess.run(["docker-compose", "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    # stderr would carry warnings too, e.g. about unset variables
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def test_compose_reserves_a_gpu_for_the_rollout_service(compose):
    devices = compose["services"]["rollout"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert set(compose["services"]) == {"rollout", "learner", "prometheus", "grafana"}


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def copy_sources(args: str) -> list[str]:
    """Source paths of COPY / ADD arguments (shell or JSON form), flags dropped."""
    parts = json.loads(args) if args.startswith("[") else shlex.split(args)
    parts = [p for p in parts if not p.startswith("--")]
    return parts[:-1]


def dockerignored(rel: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(rel, p) or rel.startswith(p.rstrip("/") + "/") for p in patterns)


def test_every_file_the_deployment_refers_to_exists(compose):
    ignore = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")]
    built = 0
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            host = volume.split(":")[0]
            if host.startswith((".", "/")):
                assert (REPO / host).exists(), f"{name}: volume source {host} is missing"
            else:
                assert host in compose["volumes"], f"{name}: named volume {host} is not declared"
        if "build" not in service:
            continue
        context = REPO / service["build"]["context"]
        dockerfile = context / service["build"]["dockerfile"]
        assert context.is_dir() and dockerfile.is_file(), name
        copies = [copy_sources(args) for word, args in dockerfile_instructions(dockerfile) if word in ("COPY", "ADD")]
        assert copies, f"{dockerfile} copies nothing"
        for sources in copies:
            for src in sources:
                assert (context / src).exists(), f"{dockerfile.name}: COPY source {src} is missing"
                assert not dockerignored(src, ignore), f"{dockerfile.name}: COPY source {src} is in .dockerignore"
        built += 1
    assert built == 2


def entrypoint_script(compose: dict, service: str) -> Path:
    dockerfile = REPO / compose["services"][service]["build"]["dockerfile"]
    steps = dockerfile_instructions(dockerfile)
    entry = json.loads(next(args for word, args in steps if word == "ENTRYPOINT"))[0]
    # the script whose COPY destination is the entry point
    for word, args in steps:
        if word == "COPY" and args.split()[-1].endswith("/" + entry):
            return REPO / copy_sources(args)[0]
    raise AssertionError(f"{dockerfile.name}: no COPY installs the entry point {entry}")


def test_entry_points_prometheus_and_compose_agree_on_ports(compose):
    require_commands("promtool")
    prom_file = REPO / "docker" / "prometheus.yml"
    done = subprocess.run(["promtool", "check", "config", str(prom_file)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    jobs = {j["job_name"]: j["static_configs"][0]["targets"] for j in yaml.safe_load(prom_file.read_text())["scrape_configs"]}
    assert set(jobs) == {"rollout", "learner"}
    for service, targets in jobs.items():
        script = entrypoint_script(compose, service)
        assert script.stat().st_mode & 0o111, f"{script} is not executable"
        http_port = re.search(r"--http-port (\d+)", script.read_text()).group(1)
        assert targets == [f"{service}:{http_port}"]
        assert "--http-host 0.0.0.0" in script.read_text() or "--host 0.0.0.0" in script.read_text()
        published = [p.split(":")[-1] for p in compose["services"][service]["ports"]]
        assert http_port in published


def test_grafana_provisioning_serves_the_dashboards(compose):
    grafana = REPO / "docker" / "grafana"
    datasources = yaml.safe_load((grafana / "provisioning" / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert [d["type"] for d in datasources] == ["prometheus"]
    assert datasources[0]["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((grafana / "provisioning" / "dashboards" / "fastgrpo.yml").read_text())["providers"]
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"] if v.startswith("."))
    assert mounts["./docker/grafana/provisioning"] == "/etc/grafana/provisioning"
    dashboards_host = next(h for h, c in mounts.items() if c == providers[0]["options"]["path"])
    dashboards = sorted((REPO / dashboards_host).glob("*.json"))
    assert dashboards
    for path in dashboards:
        dash = json.loads(path.read_text())
        for panel in dash["panels"]:
            for target in [panel, *panel["targets"]]:
                assert target["datasource"]["uid"] == datasources[0]["uid"], (path.name, panel["title"])
