"""docker/: the compose file resolves (``docker compose config``) and wires the services together.

There is no Docker engine on the test machines, so only ``config`` runs; it needs the
``docker compose`` plugin (or the standalone ``docker-compose``), else the CLI test skips.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

DOCKER = Path(__file__).resolve().parents[2] / "docker"
COMPOSE = DOCKER / "docker-compose.yaml"
SECRETS = {
    "RAY_AUTH_TOKEN": "test-ray-token",
    "AIRFLOW_JWT_SECRET": "test-jwt",
    "AIRFLOW_API_SECRET_KEY": "test-api",
    "AIRFLOW_FERNET_KEY": "test-fernet",
    "POSTGRES_PASSWORD": "test-pg",
    "S3_SECRET_KEY": "test-s3",
}
SERVICES = {
    "postgres", "s3", "ray-head", "ray-worker", "airflow-init",
    "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer",
}


def compose_cli() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def run_config(env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    cli = compose_cli()
    if cli is None:
        pytest.skip("the docker compose CLI is not installed (neither `docker compose` nor `docker-compose`)")
    env = {k: v for k, v in os.environ.items() if k not in SECRETS}
    env.update(env_extra)
    # run outside docker/ so a developer's docker/.env does not fill the secrets in
    return subprocess.run(
        [*cli, "-f", str(COMPOSE), "--project-directory", str(DOCKER), "config"],
        capture_output=True, text=True, env=env, cwd=DOCKER.parent, timeout=120,
    )


def check_wiring(config: dict) -> None:
    services = config["services"]
    assert SERVICES <= set(services)
    for name in ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer"):
        env = services[name]["environment"]
        assert env["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
        assert "@postgres:5432/airflow" in env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
        ray = json.loads(env["AIRFLOW_CONN_RAY_BATCH_DEFAULT"])
        assert ray["conn_type"] == "ray_batch" and ray["host"] == "ray://ray-head:10001"  # Airflow's containers are no Ray nodes
        aws = json.loads(env["AIRFLOW_CONN_AWS_DEFAULT"])
        assert aws["extra"]["endpoint_url"] == "http://s3:8333"
        assert "airflow-init" in services[name]["depends_on"]
    assert services["airflow-scheduler"]["command"] == ["scheduler"]
    assert services["airflow-triggerer"]["command"] == ["triggerer"]
    worker = services["ray-worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"] and devices[0]["driver"] == "nvidia"
    assert "--address=ray-head:6379" in worker["command"]
    assert "--ray-client-server-port=10001" in services["ray-head"]["command"]
    assert services["ray-head"]["environment"]["RAY_AUTH_MODE"] == "token"
    assert services["airflow-init"]["build"]["dockerfile"] == "docker/Dockerfile"


def test_compose_config_resolves_and_wires_services():
    out = run_config(SECRETS)
    assert out.returncode == 0, out.stderr
    config = yaml.safe_load(out.stdout)
    check_wiring(config)
    env = config["services"]["airflow-triggerer"]["environment"]
    assert json.loads(env["AIRFLOW_CONN_RAY_BATCH_DEFAULT"])["password"] == "test-ray-token"


def test_compose_config_requires_the_secrets():
    out = run_config({k: v for k, v in SECRETS.items() if k != "RAY_AUTH_TOKEN"})
    assert out.returncode != 0
    assert "RAY_AUTH_TOKEN" in out.stderr


def test_compose_file_structure_without_the_cli():
    """The same wiring checks on the raw YAML (anchors resolved by the YAML loader)."""
    raw = yaml.safe_load(COMPOSE.read_text())
    assert SERVICES <= set(raw["services"])
    assert raw["services"]["ray-worker"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    example = (DOCKER / ".env.example").read_text()
    for name in SECRETS:
        assert f"{name}=" in example


def test_dockerfile_copies_existing_paths():
    root = DOCKER.parent
    for line in (DOCKER / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY"):
            for src in line.split()[2:-1]:
                assert (root / src).exists(), src
