"""Reading packed shards for training: `ShardLoader` yields `PackedBatch`es.

Modules: `loader` (ShardLoader: index, DP rank position, resume state), `batch` (PackedBatch,
to_torch), `order` (epoch order, DP split), `reader` (one pack from its shard, checked),
`workers` (DataLoader workers, shared memory). Importing the package does not import torch.
"""

from lvita_data.loader.batch import PackedBatch
from lvita_data.loader.loader import ShardLoader
from lvita_data.loader.order import epoch_order

__all__ = ["PackedBatch", "ShardLoader", "epoch_order"]
