"""All container and pixel I/O: image and video probes (`probe`), video decoders (`video`),
448x448 tiles and their normalisation (`tiles`)."""
