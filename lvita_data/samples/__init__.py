"""RawRecord -> TokenizedSample from media metadata only: reading and tokenizing rows (`read`), the
chat template, tiling, frame indices and vision token counts (`tokenize` puts them together)."""
