"""``python -m airflow_batch_provider``: the ``airflow-batch`` CLI."""

import sys

from airflow_batch_provider.cli import main

sys.exit(main())
