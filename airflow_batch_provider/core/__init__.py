"""The Airflow-free core: spec, planning, storage, the commit protocol, predictors, Ray execution."""
