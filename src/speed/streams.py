"""The two backbones on two CUDA streams (``branch_streams=true``): at batch 64 each branch alone leaves much of a
large GPU idle, so the dermoscopic branch runs on a side stream while the clinical branch runs on the current one
(autograd runs each backward op on its forward op's stream, so the backward overlaps too)."""
from __future__ import annotations

import torch
from torch import nn


class TwoStreams:
    """Runs ``clin_net(clin)`` and ``derm_net(derm)`` concurrently on CUDA; one side stream per device, reused."""

    def __init__(self):
        self._side: torch.cuda.Stream | None = None

    def __deepcopy__(self, memo) -> "TwoStreams":  # a model copy (e.g. the EMA) gets its own side stream
        return TwoStreams()

    def __call__(self, clin_net: nn.Module, derm_net: nn.Module, clin: torch.Tensor,
                 derm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        main = torch.cuda.current_stream(clin.device)
        if self._side is None or self._side.device != clin.device:
            self._side = torch.cuda.Stream(clin.device)
        side = self._side
        side.wait_stream(main)
        with torch.cuda.stream(side):
            derm.record_stream(side)
            f_derm = derm_net(derm)
        f_clin = clin_net(clin)
        main.wait_stream(side)
        f_derm.record_stream(main)
        return f_clin, f_derm
