"""Pure-PyTorch implementations of every mlkernels op, with the same contracts.

They are slow and simple on purpose: tests compare the compiled kernels with them, benchmarks
use them as a baseline, and anyone can read them to see what an op computes.
"""

from ._swap import replacing_ops
from .attention import scaled_dot_product_attention
from .beam_search import (
    beam_search,
    beam_search_advance,
    beam_search_backtrack,
    beam_search_step,
)
from .boxes import box_iou, decode_boxes, encode_boxes
from .proposals import batched_nms, generate_anchors, nms, propose
from .roi_align import roi_align, roi_align_grid_sample

__all__ = [
    "batched_nms",
    "beam_search",
    "beam_search_advance",
    "beam_search_backtrack",
    "beam_search_step",
    "box_iou",
    "decode_boxes",
    "encode_boxes",
    "generate_anchors",
    "nms",
    "propose",
    "replacing_ops",
    "roi_align",
    "roi_align_grid_sample",
    "scaled_dot_product_attention",
]
