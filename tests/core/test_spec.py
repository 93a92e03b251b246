from __future__ import annotations

import pytest

from airflow_batch_provider.core.errors import BatchSpecError
from airflow_batch_provider.core.spec import JobSpec

BASE = {"source": "/data/in/*.jsonl", "sink": "/data/out", "predictor": "pkg.mod:Model"}


def make(**overrides):
    return JobSpec(**{**BASE, **overrides})


def test_defaults_and_inferred_format():
    spec = make()
    assert spec.source_format == "jsonl"
    assert spec.sink_format == "parquet"
    assert spec.resume is True
    assert spec.checkpoint_root == "/data/out/_checkpoint"
    assert make(source="s3://b/x.parquet").source_format == "parquet"


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"predictor": "pkg.mod.Model"}, "predictor"),
        ({"predictor": "pkg.mod:"}, "predictor"),
        ({"source": "/data/in"}, "source_format"),
        ({"source_format": "csv"}, "source_format"),
        ({"sink_format": "csv"}, "sink_format"),
        ({"batch_format": "torch"}, "batch_format"),
        ({"batch_size": 0}, "batch_size"),
        ({"rows_per_shard": -1}, "rows_per_shard"),
        ({"rows_per_shard": True}, "rows_per_shard"),
        ({"num_gpus": -1}, "num_gpus"),
        ({"num_cpus": 0, "num_gpus": 0}, "num_cpus"),
        ({"max_retries": -1}, "max_retries"),
        ({"resume": "yes"}, "resume"),
        ({"predictor_kwargs": {"f": object()}}, "predictor_kwargs"),
        ({"columns": "text"}, "columns"),
        ({"sink": ""}, "sink"),
        ({"num_replicas": 0}, "num_replicas"),
    ],
)
def test_validation_names_the_field(overrides, field):
    with pytest.raises(BatchSpecError, match=field):
        make(**overrides)


def test_validation_says_what_is_allowed():
    with pytest.raises(BatchSpecError, match="allowed: numpy, pandas, pyarrow"):
        make(batch_format="torch")


def test_fingerprint_covers_output_not_speed():
    spec = make(predictor_kwargs={"k": 1})
    same = [make(predictor_kwargs={"k": 1}, batch_size=7), make(predictor_kwargs={"k": 1}, num_gpus=1, num_cpus=4),
            make(predictor_kwargs={"k": 1}, rows_per_shard=5), make(predictor_kwargs={"k": 1}, max_retries=0)]
    assert {s.fingerprint for s in same} == {spec.fingerprint}
    different = [make(predictor_kwargs={"k": 2}), make(predictor="pkg.mod:Other", predictor_kwargs={"k": 1}),
                 make(predictor_kwargs={"k": 1}, sink_format="jsonl"), make(predictor_kwargs={"k": 1}, columns=["text"]),
                 make(predictor_kwargs={"k": 1}, batch_format="pandas")]
    assert spec.fingerprint not in {s.fingerprint for s in different}


def test_round_trip_through_dict():
    spec = make(columns=["a", "b"], predictor_kwargs={"x": [1, 2]})
    assert JobSpec.from_dict(spec.to_dict()) == spec


def test_unknown_field_in_dict():
    with pytest.raises(BatchSpecError, match="unknown BatchSpec field"):
        JobSpec.from_dict({**BASE, "shard_size": 5})


def test_one_format_table_for_inference_scans_and_part_names():
    from airflow_batch_provider.core.domain.layout import is_part_name, part_name

    assert JobSpec(source="/in/x.json", sink="/o", predictor="m:C").source_format == "jsonl"
    assert JobSpec(source="/in/*.ndjson", sink="/o", predictor="m:C").source_format == "jsonl"
    assert JobSpec(source="/in/x.pq", sink="/o", predictor="m:C").source_format == "parquet"
    assert part_name("abc", "parquet") == "part-abc.parquet" and part_name("abc", "jsonl") == "part-abc.jsonl"
    assert is_part_name("part-abc.jsonl") and not is_part_name("part-abc.json") and not is_part_name("_SUCCESS")


def test_num_workers_is_the_deprecated_name_of_num_replicas():
    with pytest.warns(DeprecationWarning, match="'num_workers' is deprecated, use 'num_replicas'") as warned:
        assert make(num_workers=2).num_replicas == 2
    assert warned[0].filename == __file__  # it points at the author's line
    with pytest.warns(DeprecationWarning, match="use 'num_replicas'"):
        assert JobSpec.from_dict({**BASE, "num_workers": 3}) == make(num_replicas=3)
    assert "num_workers" not in make(num_replicas=2).to_dict()


@pytest.mark.parametrize("build", [lambda: make(num_workers=2, num_replicas=2),
                                   lambda: JobSpec.from_dict({**BASE, "num_workers": 2, "num_replicas": 2})],
                         ids=["keywords", "dict"])
def test_num_workers_and_num_replicas_together_are_refused(build):
    with pytest.raises(BatchSpecError, match="'num_workers' is the deprecated name of 'num_replicas'; give only 'num_replicas'"):
        build()


def test_the_cores_old_name_batchspec_still_works_with_a_warning():
    import pytest

    from airflow_batch_provider.core import api
    from airflow_batch_provider.core import spec as spec_module

    with pytest.warns(DeprecationWarning, match="'BatchSpec' is deprecated, use 'JobSpec'"):
        assert spec_module.BatchSpec is JobSpec
    with pytest.warns(DeprecationWarning, match="'BatchSpec' is deprecated, use 'JobSpec'"):
        assert api.BatchSpec is JobSpec


def test_a_replica_asks_for_its_whole_shape_as_rays_scheduler_counts_it():
    spec = make(num_gpus=0.5, num_cpus=2, memory=4 << 30, accelerator_type="H100", resources={"nvlink_slot": 1})
    assert spec.replica_resources() == {
        "CPU": 2.0, "GPU": 0.5, "memory": float(4 << 30), "nvlink_slot": 1.0, "accelerator_type:H100": 0.001,
    }
    assert make().replica_resources() == {"CPU": 1.0}


@pytest.mark.parametrize(
    "overrides, named",
    [
        ({"resources": {"GPU": 1}}, "num_cpus, num_gpus or memory"),
        ({"resources": {"tpu": 0}}, "amounts > 0"),
        ({"resources": ["tpu"]}, "amounts > 0"),
        ({"memory": 0}, "memory"),
        ({"accelerator_type": ""}, "accelerator_type"),
        ({"runtime_env": "pip"}, "runtime_env must be a dict"),
        ({"runtime_env": {"env_vars": {"X": object()}}}, "JSON-serialisable"),
        ({"min_replicas": 3, "num_replicas": 2}, "min_replicas=3 is above num_replicas=2"),
    ],
)
def test_a_resource_shape_ray_would_refuse_is_refused_when_the_spec_is_built(overrides, named):
    with pytest.raises(BatchSpecError, match=named):
        make(**overrides)


def test_shape_and_code_shipping_are_not_fingerprinted():
    """They change where and how a replica runs, not the rows it writes."""
    shaped = make(num_gpus=1, accelerator_type="L4", resources={"x": 1}, memory=1 << 30, runtime_env={"pip": ["numpy"]}, min_replicas=1)
    assert shaped.fingerprint == make().fingerprint
    assert JobSpec.from_dict(shaped.to_dict()) == shaped


def test_redrive_rejected_takes_a_rendered_template_value():
    assert make(redrive_rejected="True").redrive_rejected is True
    assert make(redrive_rejected="false").redrive_rejected is False
    assert make(redrive_rejected="{{ params.redrive }}").redrive_rejected == "{{ params.redrive }}"  # rendered at run time
    with pytest.raises(BatchSpecError, match="redrive_rejected must be true or false"):
        make(redrive_rejected="maybe")
    # not fingerprinted: a re-drive runs under the spec that committed the shards
    assert make(redrive_rejected=True).fingerprint == make().fingerprint
