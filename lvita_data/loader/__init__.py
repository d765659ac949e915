"""Reading packed shards for training: `ShardLoader` yields `PackedBatch`es.

Modules: `loader` (ShardLoader: index, DP rank position, resume state), `batch` (PackedBatch,
to_torch), `order` (epoch order, DP split), `reader` (one pack from its shard, checked),
`workers` (DataLoader workers, shared memory), `settings` (PackSettings: a pack from members read
by another reader, e.g. Energon's, checked and decoded as here). Importing the package does not
import torch.
"""

from lvita_data.loader.batch import PackedBatch, assemble_batch
from lvita_data.loader.loader import ShardLoader
from lvita_data.loader.order import epoch_order
from lvita_data.loader.settings import PackSettings

__all__ = ["PackSettings", "PackedBatch", "ShardLoader", "assemble_batch", "epoch_order"]
