"""`lvita train`: stage recipes, data x context parallel training, checkpoints."""
