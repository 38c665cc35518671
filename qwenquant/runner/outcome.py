"""What one quantization of the model yields: the loop's results and how the quantized model measures."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qwenquant.recipe import Recipe
from qwenquant.state import QuantState


@dataclass
class Quantized:
    recipe: Recipe  # with the run's search choices written in (what recipe.yaml replays)
    model: torch.nn.Module
    state: QuantState
    ppl: object  # PerplexityResult, or None with --no-ppl
    logp: torch.Tensor  # next-token log-probs on the KL windows
