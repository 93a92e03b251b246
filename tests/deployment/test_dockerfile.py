"""docker/Dockerfile: the torch variant build argument is used, and its check holds.

No Docker engine runs on the test machines, so the image is never built here. What is tested:
the build arguments the compose file passes are declared in the build stage and used by a RUN
step, and the torch RUN step itself runs under ``sh`` as Docker would run it, with ``pip``
replaced by a stub that records its arguments (nothing is downloaded) and this machine's torch
(a CPU build) standing in for the installed one: the index URL follows ``TORCH_VARIANT``, and a
``cu128`` build given a CPU torch fails, naming both.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

DOCKER = Path(__file__).resolve().parents[2] / "docker"


def instructions() -> list[tuple[str, str]]:
    """(keyword, arguments) of each instruction, continuation lines joined as Docker joins them."""
    joined, parts = [], []
    for line in (DOCKER / "Dockerfile").read_text().splitlines():
        if not parts and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            parts.append(line[:-1])
            continue
        parts.append(line)
        joined.append("".join(parts))
        parts = []
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1]) for text in joined]


def build_stage_args() -> dict[str, str]:
    seen_from, args = False, {}
    for keyword, rest in instructions():
        if keyword == "FROM":
            seen_from = True
        elif keyword == "ARG" and seen_from:
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip().strip('"')
    return args


def torch_step(commands: int = 2) -> str:
    """The RUN step that installs torch (pip, then the variant check), without the provider's own install."""
    run = next(rest for keyword, rest in instructions() if keyword == "RUN" and "torch==" in rest)
    return " && ".join(run.split(" && ")[:commands])


def test_every_build_arg_of_the_compose_file_is_declared_and_used():
    compose = yaml.safe_load((DOCKER / "docker-compose.yaml").read_text())
    passed = set(compose["x-image"]["build"]["args"])
    declared = build_stage_args()
    runs = " ".join(rest for keyword, rest in instructions() if keyword == "RUN")
    assert passed == {"TORCH_VARIANT", "TORCH_INDEX_URL"}
    for name in passed:
        assert name in declared, f"{name} is passed by the compose file but not declared after FROM"
        assert re.search(r"\$\{?" + name + r"\b", runs), f"{name} is used by no RUN step"


def run_torch_step(tmp_path: Path, commands: int = 2, **args: str) -> tuple[subprocess.CompletedProcess, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    record = tmp_path / "pip-args"
    for name, body in (("pip", f'printf "%s\\n" "$@" > "{record}"'), ("python", f'exec "{sys.executable}" "$@"')):
        script = bin_dir / name
        script.write_text(f"#!/bin/sh\n{body}\n")
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path), **build_stage_args(), **args}
    out = subprocess.run(["sh", "-c", torch_step(commands)], env=env, capture_output=True, text=True, timeout=120)
    return out, record.read_text() if record.exists() else ""


def test_the_variant_picks_pytorchs_index_and_a_cpu_torch_passes_the_cpu_check(tmp_path):
    pytest.importorskip("torch")
    out, pip_args = run_torch_step(tmp_path, TORCH_VARIANT="cpu", TORCH_INDEX_URL="")
    assert out.returncode == 0, out.stderr
    assert pip_args.split() == ["install", "--no-cache-dir", "torch==2.13.0", "--index-url", "https://download.pytorch.org/whl/cpu"]
    assert "CUDA None" in out.stdout


def test_a_cuda_variant_asks_pytorchs_cuda_index_and_refuses_a_cpu_torch(tmp_path):
    import torch

    out, pip_args = run_torch_step(tmp_path, TORCH_VARIANT="cu128", TORCH_INDEX_URL="")
    assert "https://download.pytorch.org/whl/cu128" in pip_args.split()
    if torch.version.cuda is None:
        assert out.returncode != 0
        assert f"TORCH_VARIANT=cu128 but torch {torch.__version__} is built for CUDA None" in out.stderr
    else:  # a CUDA torch here: the check passes only for its own CUDA version
        assert (out.returncode == 0) == (torch.version.cuda.replace(".", "") == "128"), out.stderr


def test_a_mirror_replaces_pytorchs_index(tmp_path):
    _, pip_args = run_torch_step(tmp_path, commands=1, TORCH_VARIANT="cu128", TORCH_INDEX_URL="https://mirror.example/whl/cu128")
    assert pip_args.split()[-2:] == ["--index-url", "https://mirror.example/whl/cu128"]
