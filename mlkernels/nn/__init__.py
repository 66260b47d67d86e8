"""nn.Module layers built on mlkernels.ops; drop-in where a torch/torchvision module exists."""

from .attention import MultiheadAttention
from .beam_search import LabelBeamSearch
from .proposals import AnchorGenerator, ProposalLayer, Proposals
from .roi_align import RoIAlign

__all__ = [
    "AnchorGenerator",
    "LabelBeamSearch",
    "MultiheadAttention",
    "ProposalLayer",
    "Proposals",
    "RoIAlign",
]
