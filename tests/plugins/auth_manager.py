"""An auth manager for the status page's access tests: Airflow's SimpleAuthManager, except that
the user ``outsider`` may read no DAG but ``OUTSIDER_DAG`` (per-DAG access, as the FAB or
Keycloak auth managers give it). The api-server loads it through ``[core] auth_manager``."""

from __future__ import annotations

from typing import Any

from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager

OUTSIDER_DAG = "abp_someone_elses"


class OneDagAuthManager(SimpleAuthManager):
    def is_authorized_dag(self, *, method: Any, user: Any, access_entity: Any = None, details: Any = None) -> bool:
        if user.get_name() == "outsider" and (details is None or details.id != OUTSIDER_DAG):
            return False
        return super().is_authorized_dag(method=method, user=user, access_entity=access_entity, details=details)
