"""The job's own rules: shards and the plan, where everything of a job lives, the per-shard
commit protocol, and the job-level steps (plan with resume, reset, finalize)."""
