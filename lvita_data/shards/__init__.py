"""The only owner of a build's on-disk bytes: tar members, the writer, Energon metadata."""
