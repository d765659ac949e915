"""`lvita plan` and `lvita build`: planning a stage (`plan`) and writing its shards (`run`)."""
