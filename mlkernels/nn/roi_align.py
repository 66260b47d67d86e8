"""RoIAlign: drop-in for torchvision.ops.RoIAlign, with gradients to the boxes."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.jit.annotations import BroadcastingList2

from ..ops.roi_align import roi_align

# In a torch.fx graph, RoIAlign's call is one leaf node (as torchvision's), not the op's insides.
torch.fx.wrap("roi_align")


class RoIAlign(nn.Module):
    """Bilinear RoI sampling as a layer; see :func:`mlkernels.ops.roi_align`.

    Args:
        output_size (int or (oh, ow)): bins per box, each way.
        spatial_scale: factor from box coordinates to map pixels.
        sampling_ratio: samples per bin each way; <= 0 means adaptive.
        aligned: pixel-centre convention (shift corners by -0.5).

    Shapes: ``input`` Tensor[N, C, H, W], ``rois`` Tensor[K, 5] or list of Tensor[L, 4]
    -> Tensor[K, C, oh, ow]. Gradients flow to ``input`` and to the box coordinates.

    Scriptable (``torch.jit.script``); a leaf call in ``torch.fx`` graphs.
    """

    def __init__(
        self,
        output_size: BroadcastingList2[int],
        spatial_scale: float,
        sampling_ratio: int,
        aligned: bool = False,
    ):
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned

    def forward(self, input: Tensor, rois: Tensor | list[Tensor]) -> Tensor:
        return roi_align(
            input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned
        )

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}"
        )
