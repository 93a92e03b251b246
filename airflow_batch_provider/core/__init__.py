"""The Airflow-free core, in rooms that import one way (each only from those listed before it):

* ``spec``, ``errors``, ``failpoints``, ``events``, ``renames``, ``counters``: the job description,
  what can go wrong, the structured events a host logs, the deprecation path of renamed public
  names, and the counters predictors report;
* ``stores/``: where files live (local disk, S3) and the write primitives commits need;
* ``domain/``: shards and the plan, the job's schema, the job's file layout, the commit protocol, plan/finalize;
* ``execution/``: the predictor contract, reading, writing and running one shard in-process;
* ``ray/``: the model replicas on Ray and the pool that leases them (the only room that
  imports Ray);
* ``api``: the one entry point for the Airflow layer.
"""
