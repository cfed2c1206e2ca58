"""Deployment files, checked as far as a machine without Docker can: docker-compose accepts each GPU
layout and places the services on the GPUs the README says; hadolint passes the Dockerfile and every
file it copies exists; shellcheck passes the scripts; the entry points print their usage without
building anything, and a first start says what it builds and how long it takes, in the log and in
/readyz; docker/smoke.sh reads the dashboard panel it checks; Prometheus, Grafana, the entry points
and compose agree."""
from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import posixpath
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from debian_tools import require_commands
from fastgrpo.rollout.scheduler.engine import EngineConfig

pytestmark = pytest.mark.system

DOCKER = REPO / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "fastgrpo.json"
# docker-compose arguments of each GPU layout the README describes
LAYOUTS = {
    "one-gpu": ["-f", "docker-compose.yml"],
    "two-gpus": ["--env-file", "docker/two-gpus.env", "-f", "docker-compose.yml"],
    "replicas": ["-f", "docker-compose.yml", "-f", "docker-compose.replicas.yml"],
}
GPU_SERVICES = {"one-gpu": {"rollout", "learner"}, "two-gpus": {"rollout", "learner"},
                "replicas": {"rollout", "rollout-2", "learner"}}
VENV_BIN = Path(sys.executable).parent  # hadolint and shellcheck come with the dev extras


def clean_env() -> dict[str, str]:
    """This process's environment without FASTGRPO_* variables, which compose would interpolate."""
    return {k: v for k, v in os.environ.items() if not k.startswith("FASTGRPO_")}


def venv_tool(name: str) -> str:
    path = shutil.which(name, path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if path is None:
        pytest.fail(f"{name} is missing: it comes with the dev extras (pip install -c constraints.txt -e '.[dev]')")
    return path


# ---- compose


@pytest.fixture(scope="module")
def layouts() -> dict[str, dict]:
    """Each layout as docker-compose resolves it: files merged, variables interpolated."""
    require_commands("docker-compose")
    resolved = {}
    for name, args in LAYOUTS.items():
        done = subprocess.run(["docker-compose", *args, "config"], capture_output=True, text=True, timeout=120,
                              cwd=REPO, env=clean_env())
        # stderr would carry warnings too, e.g. about unset variables
        assert (done.returncode, done.stderr) == (0, ""), (name, done.stderr)
        resolved[name] = yaml.safe_load(done.stdout)
    return resolved


def gpu_ids(service: dict) -> list[str]:
    """The GPU ids a service reserves. One entry only: Compose merges an override's device list into
    the base's, so a second entry would mean a service holding more GPUs than meant."""
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1, devices
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    return devices[0]["device_ids"]


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_gpu_service_reserves_one_gpu(layouts, layout):
    services = layouts[layout]["services"]
    assert {name for name, s in services.items() if "deploy" in s} == GPU_SERVICES[layout]
    for name in GPU_SERVICES[layout]:
        assert len(gpu_ids(services[name])) == 1, name


def test_one_gpu_rollout_and_learner_share_gpu_0_and_split_its_memory(layouts):
    services = layouts["one-gpu"]["services"]
    assert set(services) == {"rollout", "learner", "prometheus", "grafana"}
    assert gpu_ids(services["rollout"]) == gpu_ids(services["learner"]) == ["0"]
    shared = float(flag(services["rollout"]["command"], "--kv-cache-fraction"))
    # the learner starts once the rollout service is ready, its KV cache allocated
    assert services["learner"]["depends_on"]["rollout"]["condition"] == "service_healthy"
    assert shared <= EngineConfig.kv_cache_fraction / 2


def test_two_gpus_give_rollout_and_learner_one_each(layouts):
    services = layouts["two-gpus"]["services"]
    assert gpu_ids(services["rollout"]) == ["0"] and gpu_ids(services["learner"]) == ["1"]
    assert float(flag(services["rollout"]["command"], "--kv-cache-fraction")) == EngineConfig.kv_cache_fraction


def test_replicas_layout_serves_the_learner_from_both_and_scrapes_both(layouts):
    services = layouts["replicas"]["services"]
    replicas = ["rollout", "rollout-2"]
    assert [gpu_ids(services[r]) for r in replicas] == [["0"], ["1"]] and gpu_ids(services["learner"]) == ["0"]
    # the shared GPU gets the one-GPU split; the replica alone on its GPU the service's default
    fractions = [float(flag(services[r]["command"], "--kv-cache-fraction")) for r in replicas]
    assert fractions == [float(flag(layouts["one-gpu"]["services"]["rollout"]["command"], "--kv-cache-fraction")),
                         EngineConfig.kv_cache_fraction]
    calibrations = {flag(services[r]["command"], "--calibration") for r in replicas}
    assert len(calibrations) == 2, "replicas profiling at once must not rewrite one calibration file"
    grpc_port = entrypoint_port(entrypoint_script("rollout"), "--port")
    assert services["learner"]["environment"]["FASTGRPO_ROLLOUT"].split(",") == [f"{r}:{grpc_port}" for r in replicas]
    assert all(services["learner"]["depends_on"][r]["condition"] == "service_healthy" for r in replicas)
    prometheus = mounted(services["prometheus"], "/etc/prometheus/prometheus.yml")
    jobs = scrape_jobs(prometheus)
    http_port = entrypoint_port(entrypoint_script("rollout"), "--http-port")
    assert jobs["rollout"] == [f"{r}:{http_port}" for r in replicas]


def mounted(service: dict, container_path: str) -> Path:
    """The host file docker-compose config mounts at container_path (absolute in its output)."""
    host = next(v.split(":")[0] for v in service["volumes"] if v.split(":")[1] == container_path)
    return Path(host)


# ---- Dockerfile


@dataclass(frozen=True)
class Stage:
    name: str
    parent: str  # the FROM image, or an earlier stage's name
    steps: list[tuple[str, str]]  # (INSTRUCTION, arguments)


def dockerfile_stages(path: Path) -> dict[str, Stage]:
    """Stages by name, their instructions with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    stages: list[Stage] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            image, _, name = rest.partition(" AS ")
            stages.append(Stage(name.strip() or str(len(stages)), image.strip(), []))
        else:
            stages[-1].steps.append((word.upper(), rest.strip()))
    return {s.name: s for s in stages}


def stage_steps(stages: dict[str, Stage], target: str) -> list[tuple[str, str]]:
    """The instructions that make `target`: its ancestor stages' first."""
    stage = stages[target]
    return (stage_steps(stages, stage.parent) if stage.parent in stages else []) + stage.steps


def copy_sources(args: str) -> list[str]:
    """Source paths of COPY / ADD arguments (shell or JSON form), flags dropped."""
    parts = json.loads(args) if args.startswith("[") else shlex.split(args)
    parts = [p for p in parts if not p.startswith("--")]
    return parts[:-1]


def installed_files(steps: list[tuple[str, str]]) -> dict[str, str]:
    """Image path -> build-context path of each COPY source."""
    workdir, out = "/", {}
    for word, args in steps:
        if word == "WORKDIR":
            workdir = posixpath.join(workdir, args)
        elif word == "COPY":
            sources = copy_sources(args)
            dest = posixpath.join(workdir, shlex.split(args)[-1])
            for src in sources:
                into_dir = dest.endswith("/") or len(sources) > 1
                out[posixpath.normpath(posixpath.join(dest, posixpath.basename(src)) if into_dir else dest)] = src
    return out


def dockerignored(rel: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(rel, p) or rel.startswith(p.rstrip("/") + "/") for p in patterns)


def dockerfiles() -> list[Path]:
    found = sorted({*DOCKER.rglob("Dockerfile"), *DOCKER.rglob("*.Dockerfile")})
    assert DOCKERFILE in found
    return found


def entrypoint_script(target: str) -> Path:
    """The repository file the image of `target` runs as its entry point."""
    steps = stage_steps(dockerfile_stages(DOCKERFILE), target)
    entry = json.loads([args for word, args in steps if word == "ENTRYPOINT"][-1])[0]
    files = installed_files(steps)
    assert entry in files, f"{target}: no COPY installs the entry point {entry}"
    return REPO / files[entry]


def entrypoint_port(script: Path, option: str) -> str:
    return re.search(rf"{option} (\d+)", script.read_text()).group(1)


def test_hadolint_passes_every_dockerfile():
    done = subprocess.run([venv_tool("hadolint"), *map(str, dockerfiles())], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_file_the_deployment_refers_to_exists(layouts):
    ignore = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")]
    for path in dockerfiles():
        copies = [copy_sources(args) for stage in dockerfile_stages(path).values() for word, args in stage.steps
                  if word in ("COPY", "ADD")]
        assert copies, f"{path} copies nothing"
        for src in (s for sources in copies for s in sources):
            assert (REPO / src).exists(), f"{path.name}: COPY source {src} is missing"
            assert not dockerignored(src, ignore), f"{path.name}: COPY source {src} is in .dockerignore"
    for layout, config in layouts.items():
        for name, service in config["services"].items():
            for volume in service.get("volumes", []):
                host = volume.split(":")[0]
                if host.startswith("/"):
                    assert Path(host).exists(), f"{layout} {name}: volume source {host} is missing"
                else:
                    assert host in config["volumes"], f"{layout} {name}: named volume {host} is not declared"
            if "build" in service:
                build = service["build"]
                assert Path(build["context"]) == REPO and Path(build["context"], build["dockerfile"]) == DOCKERFILE
                assert build["target"] == service["image"].removeprefix("fastgrpo-"), (layout, name)
                assert entrypoint_script(build["target"]).is_file()


def test_both_images_share_the_base_stage_with_its_torch():
    stages = dockerfile_stages(DOCKERFILE)
    assert stages["rollout"].parent == stages["learner"].parent == "base"
    # torch and the package are installed in the base alone: one wheel for both images
    for target in ("rollout", "learner"):
        assert not [args for word, args in stages[target].steps if word == "RUN"], target
    assert any(word == "RUN" and "torch" in args for word, args in stages["base"].steps)


# ---- scripts


def test_shellcheck_passes_the_scripts():
    scripts = [*sorted(DOCKER.glob("*.sh")), REPO / "scripts" / "install-test-deps"]
    done = subprocess.run([venv_tool("shellcheck"), "-x", *(str(p.relative_to(REPO)) for p in scripts)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr


def stub_commands(bin_dir: Path, scripts: dict[str, str]) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, body in scripts.items():
        (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body)
        (bin_dir / name).chmod(0o755)


RECORD_CALL = 'touch "$STUB_DIR/called-$(basename "$0")"\n'


@pytest.mark.parametrize("target", ["rollout", "learner"])
def test_entry_point_help_prints_usage_and_builds_nothing(target, tmp_path):
    stub_commands(tmp_path / "bin", {name: RECORD_CALL for name in
                                     ("fastgrpo-fixture", "fastgrpo-rollout", "fastgrpo-learner", "python3", "python")})
    env = {**clean_env(), "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", "STUB_DIR": str(tmp_path)}
    script = entrypoint_script(target)
    done = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, timeout=30, env=env)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.startswith(f"usage: {script.name}") and "first start" in done.stdout
    assert not list(tmp_path.glob("called-*"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.mark.parametrize("target, service, fixture", [("rollout", "fastgrpo-rollout", "draft"),
                                                      ("learner", "fastgrpo-learner", "build")])
def test_first_start_says_what_it_builds_in_the_log_and_in_readyz(target, service, fixture, tmp_path):
    """The entry point on an empty cache, its fastgrpo-fixture and service stubbed: the first stdout
    line says what is built and about how long it takes; while the build runs /readyz answers 503
    with that text; the stand-in is gone before the service starts on the port."""
    script = entrypoint_script(target)
    http_port = entrypoint_port(script, "--http-port")
    port = free_port()
    # a copy of the entry point and what it sources, on a free port instead of the image's
    for name in ("first-start.sh", "first_start.py"):
        shutil.copy(DOCKER / name, tmp_path / name)
    (tmp_path / script.name).write_text(script.read_text().replace(http_port, str(port)))
    stub_commands(tmp_path / "bin", {
        # the build waits for the test's go; the path is the last stdout line, as the real one prints it
        "fastgrpo-fixture": 'echo "$1" >>"$STUB_DIR/fixture-calls"\n'
                            'if [ "$1" = build ]; then for _ in $(seq 600); do [ -e "$STUB_DIR/go" ] && break; '
                            'sleep 0.1; done; fi\necho "training..."\necho "/cache/fake-$1"\n',
        # the service: its arguments, then a bind of the port the stand-in must have left
        service: 'printf "%s\\n" "$@" >"$STUB_DIR/service-args"\n'
                 "exec python3 -c 'import socket, sys; socket.create_server((\"0.0.0.0\", int(sys.argv[1])))' "
                 f"{port}\n",
    })
    env = {**clean_env(), "STUB_DIR": str(tmp_path), "FASTGRPO_CACHE": str(tmp_path / "cache"),
           "PATH": os.pathsep.join([str(tmp_path / "bin"), str(VENV_BIN), os.environ["PATH"]])}
    # a session of its own, so that whatever the entry point leaves running is ended with it
    proc = subprocess.Popen(["bash", str(tmp_path / script.name), "--extra", "arg"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        status, body = 0, ""
        while time.monotonic() < deadline and status != 503:
            time.sleep(0.2)
            assert proc.poll() is None, proc.communicate()
            if (tmp_path / "fixture-calls").exists():
                try:
                    status, body = http_get(f"http://127.0.0.1:{port}/readyz")
                except OSError:
                    pass  # the stand-in is still starting
        assert status == 503, "/readyz should answer 503 while the fixture builds"
        assert http_get(f"http://127.0.0.1:{port}/healthz")[0] == 200
        (tmp_path / "go").touch()
        out, err = proc.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err
    readyz = json.loads(body)
    stage = readyz["stage"]
    assert readyz["ready"] is False and out.splitlines()[0] == stage
    assert stage.startswith("first start: building the default fixture policy (about ")
    assert ("draft head" in stage) == (fixture == "draft") and "min" in stage and str(tmp_path / "cache") in stage
    assert (tmp_path / "fixture-calls").read_text().split() == (["build", "draft"] if fixture == "draft" else ["build"])
    args = (tmp_path / "service-args").read_text().split()
    assert args[-2:] == ["--extra", "arg"] and flag(args, "--model") == "/cache/fake-build"
    assert flag(args, "--http-port") == str(port)
    if target == "rollout":
        assert flag(args, "--draft") == "/cache/fake-draft"
    else:
        assert flag(args, "--device") == "cuda"  # the learner trains on the GPU compose gives it


def test_smoke_script_reads_the_dashboards_acceptance_length_panel(tmp_path):
    smoke = DOCKER / "smoke.sh"
    assert smoke.stat().st_mode & 0o111
    done = subprocess.run(["bash", str(smoke), "--help"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and "--two-gpus" in done.stdout and "--replicas" in done.stdout, done.stderr
    title = re.search(r'^panel_title="([^"]+)"', smoke.read_text(), re.M).group(1)
    window = re.search(r"^rate_window=(\S+)", smoke.read_text(), re.M).group(1)
    panels = [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["title"].startswith(title)]
    assert len(panels) == 1, f"the dashboard should have one panel titled {title!r}..."
    expected = [t["expr"].replace("$__rate_interval", window) for t in panels[0]["targets"]]
    assert all("fastgrpo_rollout_acceptance_length" in e for e in expected)
    done = subprocess.run(["bash", str(smoke), "--print-queries"], capture_output=True, text=True, timeout=30)
    assert (done.returncode, done.stdout.splitlines()) == (0, expected), done.stderr


def test_smoke_script_stops_before_building_where_no_docker_daemon_answers(tmp_path):
    # a docker whose daemon is down, on a machine that seems to have a GPU: nothing is built or started
    stub_commands(tmp_path / "bin", {"docker": 'echo "$*" >>"$STUB_DIR/docker-calls"\n[ "$1" != info ]\n',
                                     "nvidia-smi": "echo 'GPU 0: stub'\n", "curl": RECORD_CALL})
    env = {**clean_env(), "STUB_DIR": str(tmp_path), "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(DOCKER / "smoke.sh")], capture_output=True, text=True, timeout=30, env=env)
    assert done.returncode == 1 and "no Docker daemon answers" in done.stderr, done.stderr
    assert (tmp_path / "docker-calls").read_text().split() == ["info"] and not list(tmp_path.glob("called-*"))


# ---- Prometheus, Grafana, README


def scrape_jobs(path: Path) -> dict[str, list[str]]:
    require_commands("promtool")
    done = subprocess.run(["promtool", "check", "config", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return {j["job_name"]: j["static_configs"][0]["targets"] for j in yaml.safe_load(path.read_text())["scrape_configs"]}


def test_entry_points_prometheus_and_compose_agree_on_ports(layouts):
    services = layouts["one-gpu"]["services"]
    jobs = scrape_jobs(mounted(services["prometheus"], "/etc/prometheus/prometheus.yml"))
    assert set(jobs) == {"rollout", "learner"}
    for service, targets in jobs.items():
        script = entrypoint_script(service)
        assert script.stat().st_mode & 0o111, f"{script} is not executable"
        http_port = entrypoint_port(script, "--http-port")
        assert targets == [f"{service}:{http_port}"]
        assert "--http-host 0.0.0.0" in script.read_text() or "--host 0.0.0.0" in script.read_text()
        assert http_port in [str(p["target"]) for p in services[service]["ports"]]
    # the compose healthcheck probes the port the rollout serves /readyz on
    assert f":{entrypoint_port(entrypoint_script('rollout'), '--http-port')}/readyz" in \
        " ".join(services["rollout"]["healthcheck"]["test"])


def test_grafana_provisioning_serves_the_dashboards(layouts):
    grafana = DOCKER / "grafana"
    datasources = yaml.safe_load((grafana / "provisioning" / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert [d["type"] for d in datasources] == ["prometheus"]
    assert datasources[0]["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((grafana / "provisioning" / "dashboards" / "fastgrpo.yml").read_text())["providers"]
    service = layouts["one-gpu"]["services"]["grafana"]
    assert mounted(service, "/etc/grafana/provisioning") == grafana / "provisioning"
    dashboards = sorted(mounted(service, providers[0]["options"]["path"]).glob("*.json"))
    assert dashboards
    for path in dashboards:
        dash = json.loads(path.read_text())
        for panel in dash["panels"]:
            for target in [panel, *panel["targets"]]:
                assert target["datasource"]["uid"] == datasources[0]["uid"], (path.name, panel["title"])


def test_readme_gpu_section_names_each_layout_and_the_smoke_script():
    section = REPO.joinpath("README.md").read_text().split("## Run on a GPU node", 1)[1].split("\n## ", 1)[0]
    for needed in ("docker compose up", "--env-file docker/two-gpus.env", "-f docker-compose.replicas.yml",
                   "docker/smoke.sh", "--two-gpus", "--replicas", "first start", "/readyz"):
        assert needed in section, needed
