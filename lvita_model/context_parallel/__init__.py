"""Context parallelism: pure sharding (`sharding`), distributed attention and batch steps."""
