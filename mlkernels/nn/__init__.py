"""nn.Module layers built on mlkernels.ops; drop-in where a torch/torchvision module exists."""

from .roi_align import RoIAlign

__all__ = ["RoIAlign"]
