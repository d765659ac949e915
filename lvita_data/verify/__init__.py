"""`lvita verify`: structural, per-sample and accounting checks of a finished build."""
