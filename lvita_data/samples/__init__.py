"""RawRecord -> TokenizedSample from media metadata only: chat template, tiling, frame indices, vision token counts."""
