"""Run a batch_inference DAG for a given spec with `airflow dags test` (SQLite, local Ray).

The DAG file reads the spec from the JSON file named by ``ABP_TEST_SPEC``, so one file
serves every test; each run is a separate `airflow dags test` process, as a user would run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from airflow_batch_provider import BatchSpec
from airflow_batch_provider.core.events import EventKind, parse_events
from tests.helpers import ROOT

DAG_ID = "abp_integration"

# An empty spec file (a run of another DAG in the same folder) still parses, with a dummy spec.
DAG_FILE = '''
import json, os
import pendulum
from airflow.sdk import dag
from airflow_batch_provider import BatchSpec, batch_inference

spec = BatchSpec.from_dict(
    json.load(open(os.environ["ABP_TEST_SPEC"])) or {{"source": "-", "sink": "-", "predictor": "m:C", "source_format": "jsonl"}}
)


@dag(dag_id="{dag_id}", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False)
def test_dag():
    batch_inference(spec, shard_retries=int(os.environ.get("ABP_TEST_SHARD_RETRIES", "0")){group_kwargs})


test_dag()
'''


@dataclass
class DagRun:
    returncode: int
    output: str

    @property
    def state(self) -> str:
        found = re.findall(r"DagRun Finished: .*?state=(\w+)", self.output)
        return found[-1] if found else "unknown"

    def events(self, kind: EventKind | str | None = None) -> list[dict[str, Any]]:
        """The provider's structured events in the run's output (``core/events.py``)."""
        return parse_events(self.output, kind)

    def plan_counts(self) -> tuple[int, int, int]:
        """(shards, already committed, to compute) from the plan task's event."""
        plans = self.events(EventKind.PLAN)
        assert plans, self.output[-4000:]
        return plans[0]["shards"], plans[0]["committed"], plans[0]["pending"]


class DagTester:
    """``airflow dags test`` runner: own AIRFLOW_HOME (SQLite), one generated DAG file.

    :param dag_id: id of the generated DAG.
    :param group_kwargs: more ``batch_inference`` arguments, as source text (``", max_active_shards=2"``).
    :param connections: Airflow connections by id, as ``AIRFLOW_CONN_*`` values.
    """

    def __init__(
        self, home: str, *, dag_id: str = DAG_ID, group_kwargs: str = "", connections: dict[str, str] | None = None
    ):
        self.home = home
        self.dag_id = dag_id
        self.dags = os.path.join(home, "dags")
        os.makedirs(self.dags, exist_ok=True)
        with open(os.path.join(self.dags, f"{dag_id}.py"), "w") as handle:
            handle.write(DAG_FILE.format(dag_id=dag_id, group_kwargs=group_kwargs))
        self.env = {
            **os.environ,
            "AIRFLOW_HOME": home,
            "AIRFLOW__CORE__DAGS_FOLDER": self.dags,
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "RAY_ADDRESS": "local",
            "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
            **{f"AIRFLOW_CONN_{name.upper()}": value for name, value in (connections or {}).items()},
        }
        self.env.pop("ABP_FAILPOINTS", None)
        subprocess.run([self._airflow, "db", "migrate"], env=self.env, check=True, capture_output=True)

    @property
    def _airflow(self) -> str:
        return os.path.join(os.path.dirname(sys.executable), "airflow")

    def run(
        self,
        spec: BatchSpec | dict | None,
        *,
        shard_retries: int = 0,
        extra_env: dict[str, str] | None = None,
        dag_id: str | None = None,
        logical_date: str | None = None,
        conf: dict[str, Any] | None = None,
    ) -> DagRun:
        """One ``airflow dags test``; the same ``logical_date`` again is the same DAG run (its
        run id comes from the date), as a cleared run is. ``conf``: the DAG run's conf, as a
        user triggering the DAG gives it."""
        spec_path = os.path.join(self.home, "spec.json")
        with open(spec_path, "w") as handle:
            json.dump(spec.to_dict() if hasattr(spec, "to_dict") else spec or {}, handle)  # either spec: the DAG builds the Airflow one
        env = {**self.env, "ABP_TEST_SPEC": spec_path, "ABP_TEST_SHARD_RETRIES": str(shard_retries), **(extra_env or {})}
        proc = subprocess.run(
            [self._airflow, "dags", "test", *(["--conf", json.dumps(conf)] if conf else []), dag_id or self.dag_id,
             *([logical_date] if logical_date else [])],
            env=env, capture_output=True, text=True, cwd=ROOT, timeout=600,
        )
        return DagRun(proc.returncode, proc.stdout + proc.stderr)

    def files_containing(self, needle: str) -> list[str]:
        """Every file under AIRFLOW_HOME (SQLite DB with XComs and rendered fields, task logs)
        whose bytes contain ``needle``."""
        hits = []
        for folder, _, names in os.walk(self.home):
            for name in names:
                path = os.path.join(folder, name)
                with open(path, "rb") as handle:
                    if needle.encode() in handle.read():
                        hits.append(path)
        return hits
