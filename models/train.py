"""Train a multi-label model: ``python -m models.train --model baseline --data scenes ...``.

One process, or many with ``torchrun --nproc_per_node N -m models.train ...`` (DDP; gloo on the
CPU, NCCL on GPUs; across machines with torchrun's ``--nnodes`` and rendezvous options).
``--batch-size`` is per process; gradients are averaged over the processes, so N processes of
batch b take the same step as one process of batch N x b, except that BatchNorm layers in
training mode normalize each process's batch by its own statistics (``--freeze-bn`` makes them
use their running statistics). Validation and test predictions are gathered from every process,
without the sampler's padding.

Each epoch trains on the train split, evaluates on val (mAP and the other metrics of
``mlkernels.metrics``, gathered over every process) and writes ``OUT/last.pt`` (and
``OUT/best.pt`` when val mAP improved) atomically, so that an interrupted run loses at most the
epoch it was in; ``--resume OUT/last.pt`` with the same options continues it exactly (the same
final weights as a run never interrupted). At the end the **best** checkpoint (highest val mAP;
``--test-checkpoint last`` for the last one) is evaluated on the test split: the markdown metrics
table is printed and ``models.report.write_report`` writes ``metrics.json``, ``metrics.md`` and
the plots. CP..OF1 and the recall by size take labels scoring at least ``--threshold`` (0.5), or,
with ``--threshold val``, the threshold of the best val CF1 with that checkpoint (for models whose
scores are not probabilities calibrated around 0.5: RLSD's, label ranking's). Also in OUT:
``metrics.csv`` (one row per epoch), ``tensorboard/`` (TensorBoard logs), ``predictions_test.pt``
(test scores and targets).

Determinism: the same seed and options give the same weights, run to run and with any
``--workers``: the model is initialized from ``--seed``, the sampler's shuffle and every
sample's augmentation are functions of (seed, epoch, sample), and the loader's workers are
seeded from (seed, epoch, rank).

Options may come from a TOML file, ``--config FILE.toml``, whose keys are the options' names
(``batch_size`` or ``batch-size``); options given on the command line override the file.
``models.registry`` documents how a model adds its own options.

Exit status: 0 on success; 2 for bad options, data, checkpoints or a non-finite loss (a message
on stderr, no traceback); 130 when interrupted.
"""

from __future__ import annotations

import argparse
import ast
import csv
import math
import random
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import tomllib
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import mlkernels

from . import distributed
from .atomic import written_atomically
from .checkpoint import (
    CheckpointError,
    load_checkpoint,
    rng_states,
    save_checkpoint,
    set_rng_states,
)
from .registry import build_model, get_model

PROG = "models.train"


class UsageError(Exception):
    """A user error (options, data, checkpoint, diverging loss): reported without a traceback."""


class NonFiniteLossError(UsageError):
    """The training loss became NaN or infinite."""


# ---- data: the training view (subset, flip) and the collate ------------------------------------


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (so nearby (seed, epoch, index) give unrelated streams)."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (value & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        state ^= state >> 31
    return state & 0x7FFFFFFFFFFFFFFF


class SplitView(Dataset):
    """A split as the trainer sees it: an optional subset, an optional random horizontal flip.

    ``view[i]`` is the sample ``dataset[indices[i]]`` with ``"index"`` set to ``i`` (the position
    in the view, so that predictions line up with :attr:`labels`), flipped left-right (image and
    boxes) when ``flip_seed`` is given and a coin drawn from (flip_seed, epoch, i) says so. The
    coin uses no global generator, so a sample is flipped alike with any number of workers or
    processes.

    Args:
        dataset: a ``models.data`` dataset.
        indices: the positions of the subset in ``dataset`` (None: all).
        flip_seed: None for no augmentation.
    """

    def __init__(
        self, dataset: Dataset, indices: list[int] | None = None, flip_seed: int | None = None
    ) -> None:
        self.dataset = dataset
        self.indices = list(range(len(dataset))) if indices is None else list(indices)
        self.flip_seed = flip_seed
        self.epoch = 0
        self.classes: list[str] = list(dataset.classes)
        self.num_classes = len(self.classes)

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose flips ``__getitem__`` draws (set before each epoch's loader starts)."""
        self.epoch = epoch

    @property
    def labels(self) -> Tensor:
        """``Tensor[len, C]`` the view's labels, in view order."""
        return self.dataset.labels[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        sample = dict(self.dataset[self.indices[i]])
        sample["index"] = i
        if self.flip_seed is not None:
            generator = torch.Generator().manual_seed(_mix(self.flip_seed, self.epoch, i))
            if bool(torch.rand((), generator=generator) < 0.5):
                sample["image"], sample["boxes"] = hflip(sample["image"], sample["boxes"])
        return sample


def hflip(image: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
    """Mirror ``image`` Tensor[3, H, W] left-right and its ``boxes`` Tensor[N, 4] (x1, y1, x2,
    y2 in pixels) with it: x becomes W - x, and x1, x2 swap so that x1 <= x2 still holds."""
    width = image.shape[-1]
    flipped = boxes.clone()
    flipped[:, 0] = width - boxes[:, 2]
    flipped[:, 2] = width - boxes[:, 0]
    return image.flip(-1), flipped


class Collate:
    """Batch samples of any sizes: each image resized to ``image_size`` x ``image_size``.

    Returns a dict: ``"images"`` Tensor[B, 3, S, S] float32 in [0, 1] (bilinear, antialiased),
    ``"labels"`` Tensor[B, C] float32, ``"boxes"`` a list of B Tensor[N_i, 4] scaled to the S x S
    image, ``"box_classes"`` a list of B Tensor[N_i] int64, ``"index"`` Tensor[B] int64.
    """

    def __init__(self, image_size: int) -> None:
        if image_size < 1:
            raise ValueError(f"Collate: image_size must be >= 1, got {image_size}")
        self.image_size = image_size

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        size = self.image_size
        images, boxes = [], []
        for sample in samples:
            image = sample["image"]
            if image.dim() != 3 or image.shape[0] != 3:
                raise ValueError(
                    f"Collate: sample {sample.get('index')} image must be Tensor[3, H, W], "
                    f"got {tuple(image.shape)}"
                )
            height, width = image.shape[1:]
            pixels = image.unsqueeze(0).float().div_(255.0)
            if (height, width) != (size, size):
                pixels = F.interpolate(
                    pixels, size=(size, size), mode="bilinear", align_corners=False, antialias=True
                ).clamp_(0.0, 1.0)
            images.append(pixels[0])
            scale = torch.tensor([size / width, size / height, size / width, size / height])
            boxes.append(sample["boxes"].float().reshape(-1, 4) * scale)
        return {
            "images": torch.stack(images),
            "labels": torch.stack([s["labels"].float() for s in samples]),
            "boxes": boxes,
            "box_classes": [s["box_classes"].long() for s in samples],
            "index": torch.tensor([int(s["index"]) for s in samples], dtype=torch.int64),
        }


def _seed_worker(worker_id: int) -> None:
    """Seed Python's and NumPy's generators in a loader worker from its torch seed (which the
    loader derives from its own generator, re-seeded from (seed, epoch, rank) each epoch)."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


# ---- options -----------------------------------------------------------------------------------


def _threshold(value: str) -> float | str:
    if value == "val":
        return value
    try:
        threshold = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'val', got {value!r}") from None
    if math.isnan(threshold):
        raise argparse.ArgumentTypeError(f"expected a number or 'val', got {value!r}")
    return threshold


def _pretrained(value: str) -> bool | str:
    lowered = value.lower()
    if lowered in ("true", "yes", "1"):
        return True
    if lowered in ("false", "no", "0", "none"):
        return False
    return value


def build_parser() -> argparse.ArgumentParser:
    """The trainer's options (without the model's own, which :func:`parse_args` adds)."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Train a multi-label image classifier (see the module docstring).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", help="a TOML file of options (the command line overrides it)")
    p.add_argument("--model", default="baseline", help="a model of models.registry")
    p.add_argument(
        "--data", default="scenes", help="scenes[:DIR] | voc2007:PATH | coco:PATH | nuswide:PATH"
    )
    p.add_argument(
        "--data-option",
        dest="data_options",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="passed to the dataset (repeatable; VALUE a Python literal), e.g. difficult='ignore'",
    )
    p.add_argument("--backbone", default="efficientnet_lite0", help="a models.backbones name")
    p.add_argument(
        "--pretrained",
        nargs="?",
        const=True,
        default=True,
        type=_pretrained,
        metavar="WEIGHTS",
        help="ImageNet weights (the packaged ones, or a local weights file)",
    )
    p.add_argument(
        "--no-pretrained",
        dest="pretrained",
        action="store_false",
        default=argparse.SUPPRESS,
        help="random init",
    )
    p.add_argument("--epochs", type=int, default=10, help="epochs in all (with --resume too)")
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--eval-batch-size", type=int, default=None, help="default: 2 x batch size")
    p.add_argument("--train-images", type=int, default=None, help="a random subset of train")
    p.add_argument("--val-images", type=int, default=None, help="a random subset of val")
    p.add_argument("--steps-per-epoch", type=int, default=None, help="cut each epoch short")
    p.add_argument("--image-size", type=int, default=128, help="images are resized to S x S")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True, help="flips")
    p.add_argument(
        "--freeze-bn",
        action="store_true",
        help="BatchNorm layers use their running statistics while training (their scale and "
        "shift still learn): needed for small per-process batches, and for a DDP step to equal "
        "a single-process step of the whole batch",
    )
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default="adamw", help="optimizer")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD only")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="not on biases and norms")
    p.add_argument(
        "--schedule", choices=("cosine", "step", "none"), default="cosine", help="per step"
    )
    p.add_argument("--warmup-epochs", type=float, default=0.0, help="linear warmup")
    p.add_argument("--step-epochs", type=int, default=30, help="step schedule: period")
    p.add_argument("--step-gamma", type=float, default=0.1, help="step schedule: factor")
    p.add_argument("--seed", type=int, default=0, help="weights, shuffling, augmentation")
    p.add_argument("--workers", type=int, default=0, help="data loader processes")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--out", default="runs/train", help="checkpoints, logs, report")
    p.add_argument(
        "--amp",
        nargs="?",
        const="auto",
        default="none",
        choices=("auto", "bf16", "fp16", "none"),
        help="mixed precision (auto: bf16 on CPU, fp16 with a grad scaler on CUDA)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:K (None: cuda if any)")
    p.add_argument("--resume", default=None, help="a checkpoint (or run folder) to continue")
    p.add_argument(
        "--test-checkpoint", choices=("best", "last"), default="best", help="for the test split"
    )
    p.add_argument(
        "--threshold",
        type=_threshold,
        default=0.5,
        help="test CP..OF1 predict scores >= this; 'val': the threshold of the best val CF1",
    )
    p.add_argument(
        "--reference-ops", action="store_true", help="mlkernels.reference instead of the kernels"
    )
    p.add_argument(
        "--keep-freed-memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="glibc malloc keeps freed memory (much faster CPU training; see keep_freed_memory)",
    )
    p.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--report", action=argparse.BooleanOptionalAction, default=True, help="plots")
    return p


def load_config(path: str) -> dict[str, Any]:
    """The options of a TOML file, keys with ``-`` spelled ``_``.

    Raises:
        UsageError: the file is missing or not valid TOML.
    """
    try:
        with open(path, "rb") as file:
            config = tomllib.load(file)
    except FileNotFoundError:
        raise UsageError(f"--config {path}: no such file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise UsageError(f"--config {path}: not valid TOML ({error})") from None
    return {key.replace("-", "_"): value for key, value in config.items()}


def _data_options(values: Any) -> dict[str, Any]:
    if isinstance(values, dict):
        items = list(values.items())
    else:
        items = []
        for value in values:
            key, sep, text = str(value).partition("=")
            if not sep or not key:
                raise UsageError(f"--data-option: expected KEY=VALUE, got {value!r}")
            try:
                parsed = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                parsed = text
            items.append((key, parsed))
    return {key: tuple(v) if isinstance(v, list) else v for key, v in items}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options from the command line over those of ``--config``, with the model's own options.

    Raises:
        UsageError: an unknown model, config file problems or unknown config keys.
        SystemExit: argparse's own errors (usage on stderr, status 2) and ``--help``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    pre.add_argument("--model")
    known, _ = pre.parse_known_args(argv)
    config = load_config(known.config) if known.config else {}
    model_name = known.model or config.get("model", "baseline")
    try:
        entry = get_model(model_name)
    except KeyError as error:
        raise UsageError(error.args[0]) from None
    parser = build_parser()
    if entry.add_arguments is not None:
        entry.add_arguments(parser)
    dests = {action.dest for action in parser._actions} - {"help", "config"}
    unknown = sorted(set(config) - dests)
    if unknown:
        raise UsageError(
            f"--config {known.config}: unknown keys {', '.join(unknown)}; known: "
            f"{', '.join(sorted(dests))}"
        )
    parser.set_defaults(**config)
    args = parser.parse_args(argv)
    args.data_options = _data_options(args.data_options)
    for name in ("epochs", "batch_size", "image_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.eval_batch_size is None:
        args.eval_batch_size = 2 * args.batch_size
    return args


# ---- the optimizer and the schedule ------------------------------------------------------------


def build_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov off) or AdamW over the trainable parameters; weight decay on
    weights only (tensors of 2+ dimensions), not on biases and normalization scales."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.dim() >= 2 else no_decay).append(parameter)
    groups = [
        {"params": decay, "weight_decay": args.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum)
    return torch.optim.AdamW(groups, lr=args.lr)


def lr_factor(args: argparse.Namespace, steps_per_epoch: int) -> Callable[[int], float]:
    """The learning-rate factor of optimizer step ``step`` (0-based): linear warmup over
    ``--warmup-epochs``, then cosine to 0 over the remaining steps, steps of ``--step-gamma``
    every ``--step-epochs``, or constant."""
    total = max(1, args.epochs * steps_per_epoch)
    warmup = int(round(args.warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if args.schedule == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if args.schedule == "step":
            return args.step_gamma ** (step // max(1, args.step_epochs * steps_per_epoch))
        return 1.0

    return factor


# ---- one epoch, evaluation ---------------------------------------------------------------------


def _autocast(device: torch.device, amp: str):
    if amp == "none":
        return nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    moved = {}
    for key, value in batch.items():
        if isinstance(value, Tensor):
            moved[key] = value.to(device, non_blocking=True)
        elif isinstance(value, list):
            moved[key] = [v.to(device, non_blocking=True) for v in value]
        else:
            moved[key] = value
    return moved


def _progress(iterable, *, enabled: bool, total: int, desc: str):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, dynamic_ncols=True, leave=False)


def train_one_epoch(
    state: dict[str, Any], loader: DataLoader, epoch: int, steps: int
) -> dict[str, float]:
    """One epoch of ``steps`` optimizer steps; returns {"loss", "images_per_s", "lr"}.

    Raises:
        NonFiniteLossError: the loss of a step (on any process) is NaN or infinite.
    """
    args, context = state["args"], state["context"]
    model, wrapped = state["model"], state["wrapped"]
    optimizer, scheduler, scaler = state["optimizer"], state["scheduler"], state["scaler"]
    writer = state["writer"]
    model.train()
    if args.freeze_bn:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    total_loss, seen, start = 0.0, 0, time.perf_counter()
    bar = _progress(
        loader, enabled=args.progress and context.main, total=steps, desc=f"epoch {epoch + 1}"
    )
    for step, batch in enumerate(bar):
        if step >= steps:
            break
        batch = _to_device(batch, context.device)
        with _autocast(context.device, state["amp"]):
            outputs = wrapped(batch["images"])
            loss = model.loss(outputs, batch)
        if distributed.any_true(context, not bool(torch.isfinite(loss.detach()))):
            raise NonFiniteLossError(
                f"the training loss is not finite ({loss.item()} on rank {context.rank}) at "
                f"epoch {epoch + 1}, step {step + 1}: lower --lr, check the data, or try "
                "without --amp"
            )
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
        images = batch["images"].shape[0] * context.world_size
        total_loss += loss.item()
        seen += images
        rate = seen / max(1e-9, time.perf_counter() - start)
        global_step = epoch * steps + step
        if writer is not None:
            writer.add_scalar("train/loss", loss.item(), global_step)
        if bar is not loader:
            bar.set_postfix(loss=f"{total_loss / (step + 1):.4f}", img_s=f"{rate:.1f}")
    if bar is not loader:
        bar.close()
    elapsed = time.perf_counter() - start
    return {
        "loss": distributed.all_mean(context, total_loss / max(1, steps)),
        "images_per_s": seen / max(1e-9, elapsed),
        "lr": optimizer.param_groups[0]["lr"],
    }


@torch.no_grad()
def predict_split(state: dict[str, Any], loader: DataLoader, size: int) -> tuple[Tensor, Tensor]:
    """Scores and targets of a whole split, ``(Tensor[size, C], Tensor[size, C])`` in view
    order, gathered from every process (the sampler's padding dropped)."""
    model, context = state["model"], state["context"]
    model.eval()
    indices, scores, targets = [], [], []
    for batch in loader:
        batch = _to_device(batch, context.device)
        with _autocast(context.device, state["amp"]):
            outputs = model(batch["images"])
        scores.append(model.scores(outputs).float().cpu())
        targets.append(batch["labels"].cpu())
        indices.append(batch["index"].cpu())
    num_classes = state["num_classes"]
    cat = lambda parts, **kw: torch.cat(parts) if parts else torch.zeros((0, num_classes), **kw)  # noqa: E731
    return distributed.gather_predictions(
        context, cat(indices, dtype=torch.int64).reshape(-1), cat(scores), cat(targets), size
    )


def _scalar_metrics(metrics: Any) -> dict[str, float]:
    """The float entries of ``metrics.as_dict()`` (per-class lists left out)."""
    out = {}
    for key, value in metrics.as_dict().items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
    return out


def _write_csv(path: Path, history: list[dict[str, Any]]) -> None:
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    with written_atomically(path) as temporary, open(temporary, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)


# ---- the run -----------------------------------------------------------------------------------


def _open_split(args: argparse.Namespace, split: str):
    from .data import open_dataset

    try:
        return open_dataset(args.data, split, **args.data_options)
    except (ValueError, OSError, RuntimeError, KeyError, TypeError) as error:
        message = str(error.args[0]) if error.args else str(error)
        if not message.startswith("--data"):
            message = f"--data {args.data} ({split}): {message}"
        raise UsageError(message) from None


def _subset(length: int, count: int | None, seed: int, what: str) -> list[int] | None:
    if count is None or count >= length:
        return None
    if count < 1:
        raise UsageError(f"--{what}: must be >= 1, got {count}")
    generator = torch.Generator().manual_seed(_mix(seed, 0x5EB5E7))
    return sorted(torch.randperm(length, generator=generator)[:count].tolist())


def _loader(
    view: SplitView, args: argparse.Namespace, context, *, train: bool, batch_size: int
) -> tuple[DataLoader, DistributedSampler]:
    sampler = DistributedSampler(
        view, num_replicas=context.world_size, rank=context.rank, shuffle=train, seed=args.seed
    )
    generator = torch.Generator()
    loader = DataLoader(
        view,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=args.workers,
        collate_fn=Collate(args.image_size),
        worker_init_fn=_seed_worker,
        generator=generator,
        drop_last=train and len(sampler) >= batch_size,
        pin_memory=context.device.type == "cuda",
    )
    return loader, sampler


def _resolve_amp(amp: str, device: torch.device) -> str:
    if amp == "auto":
        return "bf16" if device.type == "cpu" else "fp16"
    if amp == "fp16" and device.type == "cpu":
        raise UsageError("--amp fp16 needs CUDA; on the CPU use --amp bf16")
    return amp


def _build(args: argparse.Namespace, num_classes: int, device: torch.device) -> nn.Module:
    from .backbones import build_backbone

    torch.manual_seed(args.seed)
    try:
        backbone = build_backbone(args.backbone, pretrained=args.pretrained)
    except (KeyError, ValueError, FileNotFoundError) as error:
        message = str(error.args[0]) if error.args else str(error)
        raise UsageError(f"--backbone {args.backbone}: {message}") from None
    return build_model(args.model, num_classes, backbone, args).to(device)


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse (Linux): no ``mmap`` per large block,
    no trimming of the heap below 1 GiB of free memory.

    By default glibc serves every block above its mmap threshold (at most 32 MiB) with a fresh
    ``mmap`` and returns it on ``free``, so each CPU activation of a batch is page-faulted in
    anew: measured on 2 cores, EfficientNet-Lite0 inference at batch 64 spent as much time in
    the kernel as in PyTorch, and ran 3x faster with this. The peak memory is unchanged; up to
    1 GiB freed stays mapped. Returns whether the settings were applied (False off glibc).
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 1 << 30))


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train, validate every epoch, test; returns {"history", "test" (metrics), "paths"}.

    Raises:
        UsageError: bad data, backbone, checkpoint or a non-finite loss.
    """
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        keep_freed_memory()
    context = distributed.setup(args.device)
    try:
        # --reference-ops: every mlkernels op and layer runs its pure-PyTorch twin.
        swap = mlkernels.reference.replacing_ops() if args.reference_ops else nullcontext()
        with swap:
            return _run(args, context)
    finally:
        distributed.cleanup(context)


def _run(args: argparse.Namespace, context: distributed.Context) -> dict[str, Any]:
    import mlkernels.metrics as mlmetrics

    out = Path(args.out)
    random.seed(args.seed)
    np.random.seed(args.seed % 2**32)
    torch.manual_seed(args.seed)
    if context.device.type == "cuda":
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    amp = _resolve_amp(args.amp, context.device)

    # Rank 0 first: the scenes benchmark is generated and cached on first use.
    splits: dict[str, Any] = {}
    for turn in (True, False):
        if context.main == turn:
            splits = {split: _open_split(args, split) for split in ("train", "val", "test")}
        distributed.barrier(context)
    class_names = list(splits["train"].classes)
    for split in ("val", "test"):
        if list(splits[split].classes) != class_names:
            raise UsageError(f"--data {args.data}: the {split} split has other classes than train")
    train_view = SplitView(
        splits["train"],
        _subset(len(splits["train"]), args.train_images, args.seed, "train-images"),
        flip_seed=args.seed if args.augment else None,
    )
    val_view = SplitView(
        splits["val"], _subset(len(splits["val"]), args.val_images, args.seed, "val-images")
    )
    test_view = SplitView(splits["test"])
    if len(train_view) == 0 or len(val_view) == 0 or len(test_view) == 0:
        raise UsageError(f"--data {args.data}: a split is empty")

    args.class_names = list(class_names)  # for builders that need them (CMSG's label graph)
    model = _build(args, len(class_names), context.device)
    wrapped: nn.Module = model
    if context.distributed:
        device_ids = [context.device] if context.device.type == "cuda" else None
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    train_loader, train_sampler = _loader(
        train_view, args, context, train=True, batch_size=args.batch_size
    )
    val_loader, _ = _loader(val_view, args, context, train=False, batch_size=args.eval_batch_size)
    test_loader, _ = _loader(test_view, args, context, train=False, batch_size=args.eval_batch_size)
    steps = len(train_loader)
    if args.steps_per_epoch is not None:
        steps = max(1, min(steps, args.steps_per_epoch))
    optimizer = build_optimizer(model, args)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(args, steps))
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None

    start_epoch, history, best_map, rng = 0, [], -math.inf, None
    if args.resume:
        start_epoch, history, best_map, rng = _resume(
            args, model, optimizer, scheduler, scaler, class_names
        )

    writer = None
    if context.main:
        out.mkdir(parents=True, exist_ok=True)
        if args.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out / "tensorboard"), purge_step=start_epoch * steps)
    state = {
        "args": args,
        "context": context,
        "model": model,
        "wrapped": wrapped,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "scaler": scaler,
        "writer": writer,
        "amp": amp,
        "num_classes": len(class_names),
    }
    if context.main:
        print(
            f"{PROG}: {args.model} on {args.backbone} "
            f"(pretrained={args.pretrained}), {args.data}: {len(train_view)} train / "
            f"{len(val_view)} val / {len(test_view)} test images, {len(class_names)} classes, "
            f"{args.image_size}px, {steps} steps/epoch x {context.world_size} process(es), "
            f"device {context.device}, amp {amp}"
            + (", reference ops" if args.reference_ops else ""),
            flush=True,
        )
    if rng is not None:
        set_rng_states(rng)
    try:
        for epoch in range(start_epoch, args.epochs):
            started = time.perf_counter()
            train_sampler.set_epoch(epoch)
            train_view.set_epoch(epoch)
            train_loader.generator.manual_seed(_mix(args.seed, epoch, context.rank))
            train_stats = train_one_epoch(state, train_loader, epoch, steps)
            scores, targets = predict_split(state, val_loader, len(val_view))
            val = mlmetrics.evaluate(scores, targets)
            row = {
                "epoch": epoch + 1,
                "train_loss": train_stats["loss"],
                "lr": train_stats["lr"],
                "images_per_s": train_stats["images_per_s"],
                "seconds": time.perf_counter() - started,
                **{f"val_{k}": v for k, v in _scalar_metrics(val).items()},
            }
            history.append(row)
            improved = val.mAP > best_map
            best_map = max(best_map, val.mAP)
            if context.main:
                print(
                    f"epoch {epoch + 1}/{args.epochs}: loss {row['train_loss']:.4f}, "
                    f"val mAP {100 * val.mAP:.2f}{' (best)' if improved else ''}, "
                    f"{row['images_per_s']:.1f} images/s, {row['seconds']:.0f} s",
                    flush=True,
                )
                if writer is not None:
                    for key, value in row.items():
                        if key != "epoch":
                            writer.add_scalar(f"epoch/{key}", value, epoch + 1)
                    writer.flush()
                _write_csv(out / "metrics.csv", history)
                checkpoint = {
                    "model": model.state_dict(),
                    "model_name": args.model,
                    "class_names": class_names,
                    "args": vars(args),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "epoch": epoch + 1,
                    "rng": rng_states(),
                    "metrics": history,
                    "best_map": best_map,
                }
                # best.pt first: a run killed between the two writes resumes from the older
                # last.pt and redoes the epoch, never finding a best.pt older than its best_map.
                if improved:
                    save_checkpoint(out / "best.pt", checkpoint)
                save_checkpoint(out / "last.pt", checkpoint)
            distributed.barrier(context)
    finally:
        if writer is not None:
            writer.close()

    # The test split, with the best (or last) checkpoint's weights.
    chosen = out / f"{args.test_checkpoint}.pt"
    if not chosen.exists():
        chosen = out / "last.pt"
    test_state = load_checkpoint(chosen, model_name=args.model)
    model.load_state_dict(test_state["model"])
    threshold = args.threshold
    if threshold == "val":  # chosen with the same weights, on val
        val_scores, val_targets = predict_split(state, val_loader, len(val_view))
        threshold = mlmetrics.best_threshold(val_scores, val_targets, metric="CF1")
    scores, targets = predict_split(state, test_loader, len(test_view))
    objects = getattr(splits["test"], "objects", None)
    test = mlmetrics.evaluate(scores, targets, objects=objects, threshold=threshold)
    paths: dict[str, Path] = {}
    if context.main:
        torch.save(
            {"scores": scores, "targets": targets, "class_names": class_names},
            out / "predictions_test.pt",
        )
        chosen_by = " (best val CF1)" if args.threshold == "val" else ""
        print(
            f"\ntest split, {test_state['epoch']}-epoch checkpoint {chosen} "
            f"(val mAP {100 * test_state.get('best_map', math.nan):.2f} best), "
            f"threshold {threshold:g}{chosen_by}:\n",
            flush=True,
        )
        print(test.markdown_table(class_names), flush=True)
        if args.report:
            from .report import write_report

            paths = write_report(
                out,
                scores=scores,
                targets=targets,
                class_names=class_names,
                metrics=test,
                objects=objects,
                dataset=splits["test"],
            )
        paths = {"checkpoint": chosen, "metrics.csv": out / "metrics.csv", **paths}
        print("\nwritten:")
        for name, path in paths.items():
            print(f"  {name}: {path}")
    # Every process done before any leaves the group (a process tearing gloo down while another
    # still uses it can abort).
    distributed.barrier(context)
    return {"history": history, "test": test, "paths": paths}


def _resume(args, model, optimizer, scheduler, scaler, class_names):
    """Load ``--resume`` into the model and optimizer state; returns (epoch, history,
    best_map, rng states)."""
    try:
        state = load_checkpoint(args.resume, model_name=args.model)
    except CheckpointError as error:
        raise UsageError(f"--resume: {error}") from None
    if list(state["class_names"]) != class_names:
        raise UsageError(
            f"--resume: checkpoint {state['path']} was trained on other classes "
            f"({len(state['class_names'])}) than --data {args.data} ({len(class_names)})"
        )
    saved = state["args"]
    for key in ("backbone", "image_size", "batch_size", "seed", "optimizer", "schedule"):
        if key in saved and saved[key] != getattr(args, key):
            print(
                f"{PROG}: warning: --resume: the checkpoint was trained with {key}={saved[key]!r}, "
                f"this run has {getattr(args, key)!r}; it will not match an uninterrupted run",
                file=sys.stderr,
            )
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        first = str(error).splitlines()[0]
        raise UsageError(
            f"--resume: checkpoint {state['path']} does not fit this model ({first}); was it "
            "trained with another --backbone or model options?"
        ) from None
    try:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])
    except (ValueError, KeyError, RuntimeError) as error:
        raise UsageError(
            f"--resume: checkpoint {state['path']}: optimizer state does not fit ({error})"
        ) from None
    history = list(state.get("metrics", []))
    return state["epoch"], history, state.get("best_map", -math.inf), state.get("rng")


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (see the module docstring)."""
    args = None
    try:
        args = parse_args(argv)
        run(args)
    except SystemExit as exit_:
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else 2
    except UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"{PROG}: interrupted; the last finished epoch is in "
            f"{getattr(args, 'out', '?')}/last.pt (continue with the same options and --resume)",
            file=sys.stderr,
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
