"""Kubernetes manifests (deploy/k8s/): every one validates against the Kubernetes API schemas
(offline, kubernetes-validate's bundled schemas, strict: unknown fields fail), and they agree with
each other, with the images' entry points and with the real CLIs: GPUs, probes, scrape annotations,
the replica names the learner lists, the files kustomization.yaml applies."""
from __future__ import annotations

import argparse
import copy
import re
import shlex
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from conftest import REPO

pytestmark = pytest.mark.system

K8S = REPO / "deploy" / "k8s"
# The oldest release the manifests are meant for (startupProbe, appProtocol and Job pod-failure
# handling are all GA by then) and the newest whose schemas the validator bundles.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
SCRAPE = ("prometheus.io/scrape", "prometheus.io/port", "prometheus.io/path")


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


@pytest.fixture(scope="module")
def resources() -> dict[tuple[str, str], dict]:
    """(kind, name) -> the resource, over every manifest file."""
    out = {}
    for path in manifest_files():
        for doc in load_all(path):
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in out, f"{path.name}: {key} defined twice"
            out[key] = doc
    return out


def the_one(resources: dict, kind: str) -> dict:
    found = [r for (k, _), r in resources.items() if k == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def container(workload: dict, name: str, init: bool = False) -> dict:
    spec = workload["spec"]["template"]["spec"]
    return next(c for c in spec["initContainers" if init else "containers"] if c["name"] == name)


def env_of(c: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in c.get("env", [])}


def expand(args: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' $(VAR) expansion of command and args (a reference it cannot resolve stays)."""
    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1)) or m.group(0), a) for a in args]


def entrypoint_port(script: str, flag: str) -> int:
    """The port an image's entry point passes with `flag`: a number, or a variable's default
    (`--http-port "$http_port"` after `http_port=${FASTGRPO_HTTP_PORT:-9400}`)."""
    text = (REPO / "docker" / script).read_text()
    value = re.search(rf'{flag} "?([^\s"]+)', text).group(1)
    if value.startswith("$"):
        var = value.strip("${}")
        value = re.search(rf"{var}=\$\{{\w+:-(\d+)\}}", text).group(1)
    return int(value)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_validates_against_the_kubernetes_schemas(version):
    checked = 0
    for path in manifest_files():
        for doc in load_all(path):
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{path.name}: {doc['kind']} {doc['metadata']['name']}: {exc}")
            checked += 1
    assert checked >= 5


@pytest.mark.parametrize("break_it", [
    pytest.param(lambda c: c["ports"][0].update(containerPort="grpc"), id="port-not-a-number"),
    pytest.param(lambda c: c.update(readinesProbe=c.pop("readinessProbe")), id="misspelt-field"),
    pytest.param(lambda c: c["resources"]["limits"].update({"nvidia.com/gpu": [1]}), id="gpu-not-a-quantity"),
])
def test_a_broken_manifest_fails_validation(resources, break_it):
    broken = copy.deepcopy(the_one(resources, "StatefulSet"))
    kubernetes_validate.validate(copy.deepcopy(broken), KUBERNETES_VERSIONS[0], strict=True)  # fine before
    break_it(broken["spec"]["template"]["spec"]["containers"][0])
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[0], strict=True)


def test_kustomization_applies_every_manifest_and_names_every_image(resources):
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == [p.name for p in manifest_files()]
    used = {c["image"] for r in resources.values() if "template" in r.get("spec", {})
            for c in [*r["spec"]["template"]["spec"].get("initContainers", []), *r["spec"]["template"]["spec"]["containers"]]}
    assert used == {"fastgrpo-rollout", "fastgrpo-learner"}  # the images docker-compose.yml builds
    assert {i["name"] for i in kustomization["images"]} == used
    assert (K8S / "README.md").is_file()


def test_rollout_replicas_get_a_gpu_probes_scraping_and_the_cache(resources):
    sts, svc = the_one(resources, "StatefulSet"), the_one(resources, "Service")
    pod = sts["spec"]["template"]
    c = container(sts, "rollout")
    http_port = entrypoint_port("rollout-entrypoint.sh", "--http-port")
    grpc_port = entrypoint_port("rollout-entrypoint.sh", "--port")
    assert (grpc_port, http_port) == (50051, 9400)

    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["resources"]["requests"].get("nvidia.com/gpu", 1) == 1  # extended resources: requests == limits
    assert (c["readinessProbe"]["httpGet"]["path"], c["readinessProbe"]["httpGet"]["port"]) == ("/readyz", http_port)
    assert (c["livenessProbe"]["httpGet"]["path"], c["livenessProbe"]["httpGet"]["port"]) == ("/healthz", http_port)
    # the first start builds the fixture and its draft before the server answers: as long as compose waits
    startup = c["startupProbe"]
    compose_start = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["rollout"]["healthcheck"]["start_period"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60 * int(compose_start.removesuffix("m"))
    assert startup["httpGet"]["port"] == http_port
    annotations = pod["metadata"]["annotations"]
    assert [annotations[k] for k in SCRAPE] == ["true", str(http_port), "/metrics"]
    assert {p["containerPort"] for p in c["ports"]} == {grpc_port, http_port}

    # the headless Service that names the replicas, over both ports
    assert sts["spec"]["serviceName"] == svc["metadata"]["name"] and svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert sts["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert {p["port"] for p in svc["spec"]["ports"]} == {grpc_port, http_port}
    assert not any(k in svc["metadata"].get("annotations", {}) for k in SCRAPE)  # pods are scraped, once each

    # /cache is FASTGRPO_CACHE in the image, on the PVC the manifests declare
    assert any("FASTGRPO_CACHE=/cache" in p.read_text() for p in (REPO / "docker").glob("*Dockerfile"))
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v}
    cache_volume = next(name for name, path in mounts.items() if path == "/cache")
    assert ("PersistentVolumeClaim", claims[cache_volume]) in resources

    # the flags the entry point adds and the container's args make a config `fastgrpo-rollout serve` accepts
    from fastgrpo.rollout.service.cli import serve_config

    env = {**env_of(c), "POD_NAME": "rollout-0"}
    cfg = serve_config(["--model", "/cache/model", "--host", "0.0.0.0", "--port", str(grpc_port),
                        "--http-port", str(http_port), *expand(c["args"], env)])
    assert cfg.calibration == "/cache/calibration-rollout-0.json"  # one file per replica


def test_learner_job_runs_torchrun_against_every_replica(resources):
    sts, job = the_one(resources, "StatefulSet"), the_one(resources, "Job")
    pod = job["spec"]["template"]
    c = container(job, "learner")
    grpc_port = entrypoint_port("rollout-entrypoint.sh", "--port")
    replicas = [f"rollout-{i}.{sts['spec']['serviceName']}:{grpc_port}" for i in range(sts["spec"]["replicas"])]

    # sh -c SCRIPT $0 ARGS...: the script execs torchrun over the learner's CLI with the container's args
    assert c["command"][:2] == ["sh", "-c"] and len(c["command"]) == 4
    exec_line = next(line for line in c["command"][2].splitlines() if line.startswith("exec "))
    words = shlex.split(exec_line)
    assert words[1] == "torchrun" and words[words.index("-m") + 1:words.index("-m") + 3] == ["fastgrpo.learner.cli", "train"]
    assert words[-1] == "$@" and "--model" in words
    nproc = words[words.index("--nproc-per-node") + 1]
    gpus = c["resources"]["limits"]["nvidia.com/gpu"]
    assert nproc == "gpu" or int(nproc) == gpus  # one rank per GPU the pod gets
    assert gpus >= 1 and c["resources"]["requests"]["nvidia.com/gpu"] == gpus

    # the args are flags `fastgrpo-learner train` accepts, and --rollout lists every replica
    from fastgrpo.common.config import add_dataclass_args, from_args
    from fastgrpo.learner.config import LearnerConfig

    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, LearnerConfig)
    cfg = from_args(LearnerConfig, parser.parse_args(["--model", "/cache/model", *expand(c["args"], env_of(c))]))
    assert cfg.rollout.split(",") == replicas
    assert env_of(container(job, "wait-for-rollout", init=True))["FASTGRPO_ROLLOUT"].split(",") == replicas
    assert (cfg.http_host, cfg.http_port) == ("0.0.0.0", 9401) and cfg.device == "cuda"

    annotations = pod["metadata"]["annotations"]
    assert [annotations[k] for k in SCRAPE] == ["true", str(cfg.http_port), "/metrics"]
    assert [p["containerPort"] for p in c["ports"]] == [cfg.http_port]
    # checkpoints on a volume, so that a replaced pod resumes
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v}
    assert cfg.resume and ("PersistentVolumeClaim", claims[mounts[cfg.output_dir]]) in resources
    # the learner finds the fixture where the replicas built it
    assert claims[mounts["/cache"]] == next(v["persistentVolumeClaim"]["claimName"] for v in sts["spec"]["template"]["spec"]["volumes"])
