"""Docker cannot run here: parse the compose file and images and check what deployment relies on."""

import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def test_services_and_shared_volume() -> None:
    services = _compose()["services"]
    assert set(services) >= {"redis", "api", "worker", "flower"}
    api_vols = {v.split(":")[0] for v in services["api"]["volumes"]}
    worker_vols = {v.split(":")[0] for v in services["worker"]["volumes"]}
    shared = api_vols & worker_vols
    assert shared and shared <= set(_compose()["volumes"]), "api and worker must share one named volume"
    assert services["api"]["environment"]["LORA_BASE_PATH"] == services["worker"]["environment"]["LORA_BASE_PATH"]


def test_redis_persists_and_never_evicts() -> None:
    redis = _compose()["services"]["redis"]
    cmd = " ".join(redis["command"])
    assert "--appendonly yes" in cmd and "--maxmemory-policy noeviction" in cmd
    assert redis["healthcheck"]["test"]


def test_every_service_has_a_healthcheck_and_waits_for_healthy_redis() -> None:
    services = _compose()["services"]
    for name, svc in services.items():
        assert svc.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        if name != "redis":
            assert svc["depends_on"]["redis"]["condition"] == "service_healthy", name


def test_worker_reserves_a_pinned_gpu() -> None:
    devices = _compose()["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert devices[0]["device_ids"] == ["0"], "each worker pins one GPU; --scale would share one"


def test_flower_requires_auth_and_is_not_public() -> None:
    flower = _compose()["services"]["flower"]
    assert "FLOWER_BASIC_AUTH" in flower["environment"]
    for port in flower.get("ports", []):
        assert str(port).startswith("127.0.0.1:"), f"flower published publicly: {port}"


def test_api_image_has_no_torch_and_worker_image_starts_from_cuda_pytorch() -> None:
    api = (ROOT / "Dockerfile.api").read_text()
    worker = (ROOT / "Dockerfile.worker").read_text()
    installs = [line for line in api.splitlines() if line.startswith("RUN")]
    assert installs and not any("torch" in line or "[worker" in line for line in installs)
    assert "FROM python:" in api
    assert worker.splitlines()[1].startswith("FROM pytorch/pytorch:") and "cuda" in worker.splitlines()[1]


def test_the_api_image_holds_every_package_its_programs_import() -> None:
    """The API image ships `uvicorn api.main:create_app` and the `lora-server` command."""
    code = "import sys, api.main, cli.main; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    ours = {m.split(".")[0] for m in out.split()} & {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    copied = {line.split()[1].split("/")[0] for line in (ROOT / "Dockerfile.api").read_text().splitlines()
              if line.startswith("COPY ") and "/__init__.py" not in line}  # fmt: skip
    assert ours >= {"api", "shared", "cli", "client", "launcher"}
    assert ours <= copied, ours - copied
