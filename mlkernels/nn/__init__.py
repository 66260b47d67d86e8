"""nn.Module layers built on mlkernels.ops; drop-in where a torch/torchvision module exists."""

__all__: list[str] = []
