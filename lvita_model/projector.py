"""Vision projector: pixel shuffle (space-to-depth 2x2) -> LayerNorm -> Linear -> GELU -> Linear.

Shapes: N tiles, g patches per side (32), P = g * g (1024), C vision hidden (1024), E LLM hidden
(5120 for the 14B model).

Long-VITA's ``ResamplerProjector`` (``model.vision_projection.*`` in its Hugging Face checkpoints;
same parameter names here): the P patch features of a tile are laid out as a g x g grid,
`pixel_shuffle` with scale 0.5 merges each 2 x 2 block into one token of 4C channels, giving
(g/2)^2 = 256 tokens, then ``pre_proj_layernorm`` LayerNorm(4C, eps 1e-5), ``mlp.0``
Linear(4C -> C, no bias), GELU (exact), ``mlp.2`` Linear(C -> E, no bias).

`pixel_shuffle` is InternVL's / Long-VITA's view-permute-view-permute (``ps_version`` v2, the
one that swaps the axes back). Worked out, output token (i, j) concatenates the input patches

    (2i, 2j), (2i, 2j + 1), (2i + 1, 2j), (2i + 1, 2j + 1)      (row, column of the g x g grid)

in that channel order, C channels each: a row-major 2 x 2 block, row-major over blocks
(tests/model/test_vision.py checks this against an explicit gather).
"""

from __future__ import annotations

from torch import Tensor, nn

from lvita_model.config import LongVitaConfig
from lvita_model.errors import ConfigError


def pixel_shuffle(x: Tensor, scale: float) -> Tensor:
    """x [n, w, h, c] -> [n, w * scale, h * scale, c / scale^2], exactly as InternVL."""
    n, w, h, c = x.shape
    out_w, out_h = w * scale, h * scale
    out_c, mid_c = c / (scale * scale), c / scale
    if not all(float(v).is_integer() for v in (out_w, out_h, out_c, mid_c)):
        raise ValueError(f"pixel_shuffle: shape {tuple(x.shape)} does not divide by scale {scale}")
    x = x.reshape(n, w, int(out_h), int(mid_c))  # [n, w, h, c] -> [n, w, h*s, c/s]
    x = x.permute(0, 2, 1, 3)  # -> [n, h*s, w, c/s]
    x = x.reshape(n, int(out_h), int(out_w), int(out_c))  # -> [n, h*s, w*s, c/s^2]
    return x.permute(0, 2, 1, 3).contiguous()  # -> [n, w*s, h*s, c/s^2]


class VisionProjector(nn.Module):
    """features [N, P, C] -> vision tokens [N, tokens_per_tile, E]."""

    def __init__(self, config: LongVitaConfig) -> None:
        super().__init__()
        if config.vision is None:
            raise ConfigError("a language-model-only configuration has no vision projector")
        self.grid_size = config.vision.grid_size
        self.downsample_ratio = config.projector.downsample_ratio
        in_size, vision_hidden = config.projector_input_size, config.vision.hidden_size
        self.pre_proj_layernorm = nn.LayerNorm(in_size, eps=config.projector.layer_norm_eps)
        self.mlp = nn.Sequential(
            nn.Linear(in_size, vision_hidden, bias=False),
            nn.GELU(),
            nn.Linear(vision_hidden, config.llm.hidden_size, bias=False),
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """As the original ``init_weights``: linears normal(0, 0.02), LayerNorm ones / zeros."""
        self.pre_proj_layernorm.reset_parameters()
        for index in (0, 2):
            nn.init.normal_(self.mlp[index].weight, std=0.02)

    def forward(self, features: Tensor) -> Tensor:
        num_tiles, num_patches, hidden = features.shape
        if num_patches != self.grid_size**2:
            raise ValueError(
                f"expected {self.grid_size**2} patch features per tile, got {num_patches}"
            )
        grid = features.reshape(num_tiles, self.grid_size, self.grid_size, hidden)  # [N, g, g, C]
        grid = pixel_shuffle(grid, self.downsample_ratio)  # -> [N, g/2, g/2, 4C]
        tokens = grid.reshape(num_tiles, -1, grid.shape[-1])  # -> [N, g^2/4, 4C]
        return self.mlp(self.pre_proj_layernorm(tokens))  # -> [N, g^2/4, E]
