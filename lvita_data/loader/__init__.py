"""Reading packed shards for training: the torch-facing `ShardLoader`."""
