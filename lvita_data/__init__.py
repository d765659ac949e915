"""lvita_data: Long-VITA data preparation (manifests, sources, exact token planning, shards)."""

__version__ = "0.1.0"
