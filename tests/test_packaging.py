"""The distribution as pip builds it: one version, the license file, the Airflow range, one plugin registration.

The metadata is built from this checkout's ``pyproject.toml`` by setuptools' own build hook
(what ``pip install`` / ``python -m build`` call), in a copy, so nothing is left in the tree.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from email.parser import Parser
from pathlib import Path

import pytest

import airflow_batch_provider
from airflow_batch_provider.get_provider_info import get_provider_info

REPO = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """The ``.dist-info`` setuptools prepares for a wheel of this checkout."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "airflow_batch_provider", src / "airflow_batch_provider", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("meta")
    script = textwrap.dedent(f"""
        from setuptools import build_meta
        print("DIST", build_meta.prepare_metadata_for_build_wheel({str(out)!r}))
    """)
    run = subprocess.run([sys.executable, "-c", script], cwd=src, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": ""})
    assert run.returncode == 0, run.stderr[-3000:]
    return out / next(line for line in run.stdout.splitlines() if line.startswith("DIST "))[5:]


def test_the_version_is_written_once_and_read_everywhere(built):
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "airflow_batch_provider.__version__"}
    version = airflow_batch_provider.__version__
    metadata = Parser().parsestr((built / "METADATA").read_text())
    assert metadata["Version"] == version
    assert get_provider_info()["versions"] == [version]
    assert f"## {version}" in (REPO / "CHANGELOG.md").read_text()


def test_the_license_file_ships_with_the_distribution(built):
    metadata = Parser().parsestr((built / "METADATA").read_text())
    assert metadata["License-Expression"] == "Apache-2.0"
    assert metadata.get_all("License-File") == ["LICENSE"]
    text = (built / "licenses" / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text


def test_the_airflow_range(built):
    metadata = Parser().parsestr((built / "METADATA").read_text())
    airflow = [r for r in metadata.get_all("Requires-Dist") if r.startswith("apache-airflow") and not r.startswith("apache-airflow-")]
    assert airflow == ["apache-airflow<4,>=3.3.2"]


def test_the_plugin_has_one_registration_and_the_provider_its_entry_point(built):
    entry_points = (built / "entry_points.txt").read_text()
    assert entry_points.count("BatchSinkStatusPlugin") == 1
    assert "[airflow.plugins]\nbatch_sink_status = airflow_batch_provider.plugins.sink_status:BatchSinkStatusPlugin" in entry_points
    assert "provider_info = airflow_batch_provider.get_provider_info:get_provider_info" in entry_points
    assert "plugins" not in get_provider_info()
