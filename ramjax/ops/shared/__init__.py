"""What the op families share: argument checks (`checks`), numerics (`numerics`) and running a kernel per device
shard (`per_shard`). Imports nothing else of ramjax.ops."""
