"""Running shards in a process: the predictor contract and batch conversions, reading a
shard's rows, writing its part, the reader/writer threads around the model, and the
runner that checks, computes and commits one shard at a time."""
