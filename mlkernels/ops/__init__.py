"""The public ops. Each validates its arguments, documents shapes, and dispatches to
torch.ops.mlkernels.* (CPU or CUDA kernels); each has a pure-PyTorch twin in mlkernels.reference."""

from .attention import scaled_dot_product_attention
from .beam_search import (
    BeamAdvance,
    BeamSearchResult,
    BeamStep,
    beam_search,
    beam_search_advance,
    beam_search_backtrack,
    beam_search_step,
)
from .boxes import box_iou, decode_boxes, encode_boxes
from .proposals import ProposeConfig, batched_nms, generate_anchors, nms, propose
from .roi_align import roi_align

__all__ = [
    "BeamAdvance",
    "BeamSearchResult",
    "BeamStep",
    "ProposeConfig",
    "beam_search",
    "beam_search_advance",
    "beam_search_backtrack",
    "beam_search_step",
    "batched_nms",
    "box_iou",
    "decode_boxes",
    "encode_boxes",
    "generate_anchors",
    "nms",
    "propose",
    "roi_align",
    "scaled_dot_product_attention",
]
