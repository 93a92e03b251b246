"""The job's own rules: shards and the plan, the job's one Arrow schema (``schema/``), where
everything of a job lives, the per-shard commit protocol, and the job-level steps (plan with
resume, reset, finalize)."""
