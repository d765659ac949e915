"""Context parallelism: pure sharding (`sharding`, `blocks`, `merge`), the distributed attentions
behind one base (`base`: `ring`, `allgather`, `ulysses`) and the batch step (`batch`)."""
