"""Deployment files parse and say what they must: no container engine runs here, so the files are
checked as data (YAML, Dockerfile instructions, systemd unit) against what the server expects."""

from __future__ import annotations

import configparser
import dataclasses
import re
from pathlib import Path
from typing import Any

import yaml

from api.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
SETTING_VARIABLES = {f"TASKORCH_{f.name.upper()}" for f in dataclasses.fields(Settings)}


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys silently; a deployment file must not have any."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
        duplicates = {key for key in keys if keys.count(key) > 1}
        assert not duplicates, f"duplicate keys {duplicates} at {node.start_mark}"
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: Path) -> list[dict[str, Any]]:
    text = path.read_text()
    assert "\t" not in text, f"{path} has a tab"
    documents = [doc for doc in yaml.load_all(text, Loader=UniqueKeyLoader) if doc is not None]
    assert documents, f"{path} is empty"
    return documents


def check_settings(environment: dict[str, str]) -> None:
    """Every TASKORCH_* variable a deployment sets is a real setting with a value it accepts."""
    ours = {k: v for k, v in environment.items() if k.startswith("TASKORCH_")}
    assert set(ours) <= SETTING_VARIABLES, set(ours) - SETTING_VARIABLES
    Settings.load(environ=ours)


def test_compose_runs_postgres_the_server_and_jupyter_on_the_same_data() -> None:
    (compose,) = load_yaml(ROOT / "docker-compose.yml")
    services = compose["services"]
    assert {"postgres", "taskorch", "jupyter"} <= set(services)

    postgres = services["postgres"]
    assert str(postgres["image"]).startswith("postgres:")
    assert "pg_isready" in " ".join(map(str, postgres["healthcheck"]["test"]))

    server = services["taskorch"]
    assert "build" in server
    server_env = environment_of(server)
    assert server_env["TASKORCH_DATABASE_URL"].startswith("postgresql://")
    assert "@postgres:5432/" in server_env["TASKORCH_DATABASE_URL"]
    check_settings(server_env)
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert any("8080" in str(port) for port in server["ports"])
    grace = str(server["stop_grace_period"])
    assert grace.endswith("s")
    assert int(grace[:-1]) > Settings().shutdown_timeout

    jupyter = services["jupyter"]
    jupyter_env = environment_of(jupyter)
    # the notebooks read the very database the server writes
    assert jupyter_env["TASKORCH_DATABASE_URL"] == server_env["TASKORCH_DATABASE_URL"]
    assert jupyter["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert any("notebooks" in str(volume) for volume in jupyter.get("volumes", []))


def environment_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def k8s_objects() -> dict[str, dict[str, Any]]:
    objects: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in load_yaml(path):
            assert {"apiVersion", "kind"} <= set(doc), path
            objects[doc["kind"]] = doc
    return objects


def test_k8s_deployment_probes_health_and_keeps_sqlite_on_one_replica() -> None:
    objects = k8s_objects()
    assert {"Deployment", "Service", "PersistentVolumeClaim", "Kustomization"} <= set(objects)
    deployment = objects["Deployment"]
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"]["type"] == "Recreate"
    pod = spec["template"]["spec"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    port = container["ports"][0]
    assert port["containerPort"] == 8080
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
        assert container[probe]["httpGet"]["port"] in (port["name"], 8080)
    env = {item["name"]: item["value"] for item in container["env"]}
    check_settings(env)
    assert env["TASKORCH_HOST"] == "0.0.0.0"
    assert pod["terminationGracePeriodSeconds"] > int(env["TASKORCH_SHUTDOWN_TIMEOUT"])

    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    database = env["TASKORCH_DATABASE_URL"].removeprefix("sqlite:///")
    assert database.startswith(mounts["data"] + "/")  # the database lives on the volume
    claims = {v["name"]: v.get("persistentVolumeClaim", {}) for v in pod["volumes"]}
    pvc = objects["PersistentVolumeClaim"]
    assert claims["data"]["claimName"] == pvc["metadata"]["name"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]

    service = objects["Service"]
    assert service["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["targetPort"] in (port["name"], 8080)
    listed = set(objects["Kustomization"]["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        if instruction.upper() == "FROM":
            match = re.match(r"(\S+)(?:\s+AS\s+(\S+))?", rest, re.IGNORECASE)
            assert match is not None
            current = [("FROM", match.group(1))]
            stages[match.group(2) or f"stage{len(stages)}"] = current
        else:
            current.append((instruction.upper(), rest.strip()))
    return stages


def test_dockerfile_is_slim_non_root_with_a_health_check() -> None:
    stages = dockerfile_stages()
    assert stages["base"][0] == ("FROM", "python:3.11-slim")
    final = list(stages.values())[-1]  # the default build target
    instructions = dict(final)
    assert instructions["USER"] not in ("root", "0")
    assert "/health" in instructions["HEALTHCHECK"]
    assert "8080" in instructions["EXPOSE"]
    assert "/data" in instructions["VOLUME"]
    assert instructions["STOPSIGNAL"] == "SIGTERM"
    env = dict(
        re.findall(r"(TASKORCH_\w+)=(\S+)", " ".join(v for k, v in stages["base"] if k == "ENV"))
    )
    check_settings(env)
    assert env["TASKORCH_HOST"] == "0.0.0.0"
    assert env["TASKORCH_DATABASE_URL"].startswith("sqlite:////data/")
    assert "jupyter" in stages
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored
    assert "*.db" in ignored


def test_systemd_unit_runs_serve_as_its_own_user_and_stops_gracefully() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(ROOT / "deploy" / "taskorch.service")
    service = unit["Service"]
    assert service["ExecStart"].endswith("taskorch serve")
    assert service["User"] not in ("root", "")
    assert service["KillSignal"] == "SIGTERM"
    assert int(service["TimeoutStopSec"]) > Settings().shutdown_timeout
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    lines = (ROOT / "deploy" / "taskorch.service").read_text().splitlines()
    env = dict(
        line.removeprefix("Environment=").split("=", 1)
        for line in lines
        if line.startswith("Environment=")
    )
    check_settings(env)
