"""The job's one Arrow schema, from the type rules up:

* ``arrow_types``: type names, declared schemas and their JSON form, which type holds two others;
* ``conform``: a table made to have the job's schema without changing a value (else a bad row);
* ``input``: the input schema, settled at plan time (file footers, JSONL samples, or declared)
  and kept beside the plan;
* ``output``: the output schema, declared or recorded by the first shard, and its widenings.
"""
