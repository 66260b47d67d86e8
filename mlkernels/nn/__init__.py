"""nn.Module layers built on mlkernels.ops; drop-in where a torch/torchvision module exists."""

from .boxes import AnchorGenerator, ProposalLayer, Proposals

__all__ = ["AnchorGenerator", "ProposalLayer", "Proposals"]
