"""All container and pixel I/O: image/video probes (`probe`), video decoders (`video`), 448 tiles (`tiles`)."""
