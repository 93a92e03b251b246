"""A linear or logistic model over numeric columns, given by its coefficients.

Many production scoring models (credit, churn, ranking features) are exported as a weight
per feature plus an intercept. This predictor applies them batch by batch with numpy:
``score = link(intercept + sum(weight * column))``. Needs no extra dependency, so it also
serves as a small, real model for examples and tests.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from airflow_batch_provider.core.errors import PredictorError

LINKS = ("identity", "logistic")


class LinearModel:
    """Score each row with a linear model (``batch_format="numpy"``).

    :param weights: ``{column: weight}``; every column must be numeric.
    :param intercept: added to every score.
    :param link: ``identity`` (regression) or ``logistic`` (probability of the positive class).
    :param output_column: name of the score column.
    :param keep_columns: input columns copied to the output (e.g. an id), in this order.
    """

    def __init__(
        self,
        weights: dict[str, float],
        intercept: float = 0.0,
        link: str = "identity",
        output_column: str = "score",
        keep_columns: list[str] | None = None,
    ):
        if not isinstance(weights, dict) or not weights:
            raise PredictorError("LinearModel: weights must be a non-empty {column: weight} dict")
        bad = {k: v for k, v in weights.items() if isinstance(v, bool) or not isinstance(v, (int, float))}
        if bad:
            raise PredictorError(f"LinearModel: weights must be numbers, got {bad}")
        if link not in LINKS:
            raise PredictorError(f"LinearModel: link={link!r} is not one of {', '.join(LINKS)}")
        self.columns = list(weights)
        self.weights = np.array([float(weights[c]) for c in self.columns], dtype=np.float64)
        self.intercept = float(intercept)
        self.link = link
        self.output_column = output_column
        self.keep_columns = list(keep_columns or [])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [c for c in self.columns + self.keep_columns if c not in batch]
        if missing:
            raise PredictorError(
                f"LinearModel: column(s) {missing} are not in the input batch (it has {sorted(batch)}); "
                "fix predictor_kwargs or BatchSpec.columns"
            )
        try:
            features = np.column_stack([np.asarray(batch[c], dtype=np.float64) for c in self.columns])
        except (TypeError, ValueError) as err:
            raise PredictorError(f"LinearModel: feature columns {self.columns} must be numeric ({err})") from None
        score = features @ self.weights + self.intercept
        if self.link == "logistic":
            score = 1.0 / (1.0 + np.exp(-score))
        out: dict[str, Any] = {c: batch[c] for c in self.keep_columns}
        out[self.output_column] = score
        return out
