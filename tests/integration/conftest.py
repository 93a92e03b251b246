from __future__ import annotations

import pytest

from tests.integration.dagtest import DagTester


@pytest.fixture(scope="session")
def dag_tester(tmp_path_factory):
    return DagTester(str(tmp_path_factory.mktemp("airflow_home")))
