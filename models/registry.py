"""The trainer's model registry: ``--model NAME`` picks a model registered here.

Protocol (what a registered model must provide)
------------------------------------------------
A model is registered by decorating its *builder*::

    @register_model("baseline")
    def build_baseline(num_classes: int, backbone: Backbone, args: argparse.Namespace) -> nn.Module:
        return Baseline(num_classes, backbone, dropout=args.dropout)

    def add_arguments(parser: argparse.ArgumentParser) -> None:  # optional
        parser.add_argument("--dropout", type=float, default=0.0)

    build_baseline.add_arguments = add_arguments  # or: @register_model("baseline", add_arguments)

- ``builder(num_classes, backbone, args) -> nn.Module``: ``backbone`` comes from
  ``models.backbones.build_backbone`` (``channels``, ``stride`` attributes; ``forward(images
  float Tensor[B, 3, H, W] in [0, 1], RGB) -> Tensor[B, channels, H / stride, W / stride]``);
  ``args`` is the trainer's whole parsed namespace, including the model's own options, and
  ``args.class_names`` (the dataset's class names, in label order; also set by models.predict).
- The module's ``forward(images: Tensor[B, 3, H, W]) -> outputs`` (anything: a tensor, a tuple,
  a dict), ``loss(outputs, batch) -> Tensor[]`` (a scalar; ``batch`` is the collated dict of
  ``models.train.collate``: ``"images"`` Tensor[B, 3, S, S] float in [0, 1], ``"labels"``
  Tensor[B, C] float with 1 / 0 / -1 = ignore, ``"boxes"`` list of B Tensor[N_i, 4] in pixels
  of the S x S image, ``"box_classes"`` list of B Tensor[N_i] int64, ``"index"`` Tensor[B]) and
  ``scores(outputs) -> Tensor[B, C]`` probability-like scores in [0, 1], which the metrics rank.
- Optionally an ``add_arguments(parser)`` hook that adds the model's own command-line options
  (they may also be set from the ``--config`` TOML file, by their ``dest`` name). The trainer
  calls it only for the model picked by ``--model``, so two models may use the same option name.

Modules register themselves when imported; :data:`MODEL_MODULES` lists the modules the trainer
imports before it looks a name up (add a new model's module there).
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

Builder = Callable[[int, nn.Module, argparse.Namespace], nn.Module]
ArgumentsHook = Callable[[argparse.ArgumentParser], None]

# The modules that register models; imported lazily by get_model / model_names.
MODEL_MODULES = (
    "models.baseline",
    "models.cadm",
    "models.cmsg",
    "models.label_ranking",
    "models.order_free_rnn",
    "models.rlsd",
)


@dataclass(frozen=True)
class ModelEntry:
    """One registered model: its name, builder and optional ``add_arguments`` hook."""

    name: str
    builder: Builder
    add_arguments: ArgumentsHook | None = None


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(
    name: str, add_arguments: ArgumentsHook | None = None
) -> Callable[[Builder], Builder]:
    """Decorator registering ``builder`` as the model ``name`` (see the module docstring).

    ``add_arguments`` may be given here or as an ``add_arguments`` attribute of the builder.

    Raises:
        ValueError: ``name`` is already registered by another builder.
    """

    def decorate(builder: Builder) -> Builder:
        existing = _REGISTRY.get(name)
        if existing is not None and existing.builder is not builder:
            qualname = getattr(existing.builder, "__qualname__", existing.builder)
            raise ValueError(f"register_model: model {name!r} is already registered by {qualname}")
        hook = add_arguments or getattr(builder, "add_arguments", None)
        _REGISTRY[name] = ModelEntry(name, builder, hook)
        return builder

    return decorate


def _import_model_modules() -> None:
    for module in MODEL_MODULES:
        importlib.import_module(module)


def model_names() -> list[str]:
    """The registered model names, sorted."""
    _import_model_modules()
    return sorted(_REGISTRY)


def get_model(name: str) -> ModelEntry:
    """The registry entry of ``name``.

    Raises:
        KeyError: no model of that name; the message lists the registered ones.
    """
    _import_model_modules()
    if name not in _REGISTRY:
        raise KeyError(
            f"--model: unknown model {name!r}; registered models: {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[name]


def build_model(
    name: str, num_classes: int, backbone: nn.Module, args: argparse.Namespace
) -> nn.Module:
    """Build the registered model ``name`` and check that it follows the protocol.

    Raises:
        KeyError: unknown ``name``.
        TypeError: the builder returned something without ``forward``, ``loss`` and ``scores``.
    """
    model = get_model(name).builder(num_classes, backbone, args)
    missing = [m for m in ("forward", "loss", "scores") if not callable(getattr(model, m, None))]
    if not isinstance(model, nn.Module) or missing:
        raise TypeError(
            f"build_model: the builder of {name!r} must return an nn.Module with forward, loss "
            f"and scores, got {type(model).__name__} (missing: {', '.join(missing) or 'none'})"
        )
    return model
