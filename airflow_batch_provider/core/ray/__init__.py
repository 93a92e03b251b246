"""Everything that talks to Ray: the model replica actor (``replica``), the client that
leases replicas and runs shards on them (``pool``), the connection (``connection``) and the
states a shard's Ray call reports (``states``). No module outside this package imports Ray."""
