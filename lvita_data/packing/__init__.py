"""Sequence packing: the pure plan (`plan`) and the pack assembler (`assemble`)."""
