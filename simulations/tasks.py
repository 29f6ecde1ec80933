"""Tasks: datasets, the server's clean split, client partitions and small models.

Every dataset here loads offline:

- ``digits``: scikit-learn's 8x8 digits (1,797 images), shipped inside the wheel.
- ``fashion-mnist``: the four standard idx files, read from a directory. Debian's
  ``dataset-fashion-mnist`` package installs them under /usr/share/datasets/fashion-mnist.

One seeded permutation splits a dataset into the server's clean set (a *gate* split the
gates learn on, and a *test* split accuracy is reported on) and a client pool. The pool
is partitioned with flwr-datasets partitioners (IID or Dirichlet over labels), so the
server's data never overlaps any client's.
"""

from __future__ import annotations

import functools
import gzip
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

DATASETS = ("digits", "fashion-mnist")
# Known before any data is loaded, so that a run config can be checked against it.
DATASET_CLASSES = {"digits": 10, "fashion-mnist": 10}
PARTITIONINGS = ("iid", "dirichlet")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


class DatasetUnavailable(FileNotFoundError):
    """A dataset's files are not where they were looked for."""


@dataclass(frozen=True)
class ArraySet:
    """Inputs and integer labels, as numpy arrays."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(self.x), torch.from_numpy(self.y)


@dataclass(frozen=True)
class TaskData:
    """A dataset split into the server's clean gate and test splits and a client pool."""

    name: str
    num_classes: int
    gate: ArraySet
    test: ArraySet
    pool: ArraySet


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel intensities are 0..16; scale to [0, 1] like the image tasks.
    return (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int64)


def read_idx(path: Path) -> np.ndarray:
    """Read one idx file (optionally gzipped) into a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError, zlib.error) as error:
        # A cut-off download or a damaged package: name the file, not just the codec's complaint.
        raise ValueError(f"{path} cannot be read ({type(error).__name__}: {error}); reinstall Debian's "
                         "'dataset-fashion-mnist', or set dataset-path to a directory of intact idx files") from error
    if len(data) < 4:
        raise ValueError(f"{path} is too short to be an idx file")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte idx file")
    if ndim == 0 or ndim > 3:
        raise ValueError(f"{path} claims {ndim} dimensions; an idx file of images or labels has 1 to 3")
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f"{path} ends inside its header ({len(data)} bytes for {ndim} dimensions)")
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    values = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if values.size != int(np.prod(shape)):
        raise ValueError(f"{path} holds {values.size} values, its header says {shape}")
    return values.reshape(shape)


def _find_idx(directory: Path, stem: str) -> Path:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    raise DatasetUnavailable(
        f"Fashion-MNIST file {stem}[.gz] not found in {directory}. Install Debian's "
        "'dataset-fashion-mnist' package, or set dataset-path to a directory holding the four idx files."
    )


def load_fashion_mnist_arrays(directory: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All 70,000 Fashion-MNIST images as (N, 1, 28, 28) float32 in [0, 1], and labels."""
    directory = Path(directory) if directory else FASHION_MNIST_DIR
    if not directory.is_dir():
        raise DatasetUnavailable(
            f"Fashion-MNIST directory {directory} does not exist. Install Debian's 'dataset-fashion-mnist' "
            "package, or set dataset-path to a directory holding the four idx files."
        )
    parts = {key: read_idx(_find_idx(directory, stem)) for key, stem in FASHION_MNIST_FILES.items()}
    for key, stem in FASHION_MNIST_FILES.items():
        expected = (28, 28) if key.endswith("images") else ()
        if parts[key].shape[1:] != expected or parts[key].ndim != 1 + len(expected):
            raise ValueError(f"Fashion-MNIST in {directory}: {stem} has shape {parts[key].shape}, expected "
                             f"(N{''.join(f', {size}' for size in expected)})")
    classes = DATASET_CLASSES["fashion-mnist"]
    for key in ("train_labels", "test_labels"):
        if parts[key].size and int(parts[key].max()) >= classes:
            raise ValueError(f"Fashion-MNIST in {directory}: {FASHION_MNIST_FILES[key]} has label "
                             f"{int(parts[key].max())}; the classes are 0..{classes - 1}")
    images = np.concatenate([parts["train_images"], parts["test_images"]])
    labels = np.concatenate([parts["train_labels"], parts["test_labels"]])
    if len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST in {directory}: {len(images)} images but {len(labels)} labels")
    return (images[:, None, :, :].astype(np.float32) / 255.0), labels.astype(np.int64)


@functools.lru_cache(maxsize=4)
def load_task(name: str, gate_size: int, test_size: int, seed: int, path: str = "", pool_size: int = 0) -> TaskData:
    """Load a dataset and split it into gate, test and client-pool sets (cached per process).

    ``pool_size`` > 0 keeps only that many examples for the clients (a seeded subsample),
    which sizes a benchmark grid to the machine.
    """
    if name == "digits":
        x, y = load_digits_arrays()
    elif name == "fashion-mnist":
        x, y = load_fashion_mnist_arrays(path or None)
    else:
        raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")
    if gate_size < 1 or test_size < 1 or gate_size + test_size >= len(y):
        raise ValueError(
            f"server-gate-size ({gate_size}) and server-test-size ({test_size}) must be >= 1 and leave "
            f"examples for the clients; {name} has {len(y)}"
        )
    order = np.random.default_rng(seed).permutation(len(y))
    gate_idx, test_idx, pool_idx = np.split(order, [gate_size, gate_size + test_size])
    if pool_size < 0:
        raise ValueError(f"client-pool-size must be >= 0, got {pool_size}")
    if pool_size > len(pool_idx):
        raise ValueError(f"client-pool-size {pool_size} is more than the {len(pool_idx)} {name} examples the gate "
                         f"and test splits leave for the clients (0 takes them all)")
    if pool_size:
        pool_idx = pool_idx[:pool_size]
    return TaskData(
        name=name,
        num_classes=int(y.max()) + 1,
        gate=ArraySet(x[gate_idx], y[gate_idx]),
        test=ArraySet(x[test_idx], y[test_idx]),
        pool=ArraySet(x[pool_idx], y[pool_idx]),
    )


def attacker_sample(task: TaskData, size: int, seed: int) -> ArraySet:
    """An adaptive attacker's own clean data: ``size`` examples drawn from the client pool.

    The pool and the server's splits come from one random permutation of the dataset, so
    this is a sample of the distribution the server validates on, disjoint from the
    server's own examples. A pool smaller than ``size`` is taken whole.
    """
    if size < 1:
        raise ValueError(f"the attacker's sample needs at least 1 example; got {size}")
    chosen = np.random.default_rng([seed, 1]).choice(len(task.pool), size=min(size, len(task.pool)), replace=False)
    return ArraySet(task.pool.x[chosen], task.pool.y[chosen])


# The fewest examples a client may hold; Flower's Dirichlet partitioner redraws until every
# client has this many.
MIN_PARTITION_SIZE = 2


@functools.lru_cache(maxsize=8)
def _partitioner(name: str, gate_size: int, test_size: int, seed: int, path: str, pool_size: int,
                 partitioning: str, num_partitions: int, alpha: float):
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    task = load_task(name, gate_size, test_size, seed, path, pool_size)
    if partitioning == "iid":
        partitioner = IidPartitioner(num_partitions=num_partitions)
    elif partitioning == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions, partition_by="label", alpha=alpha,
            min_partition_size=MIN_PARTITION_SIZE, self_balancing=False, seed=seed,
        )
    else:
        raise ValueError(f"unknown partitioning {partitioning!r}; choose one of {PARTITIONINGS}")
    # The partitioner only needs labels; indices map back into the pool arrays.
    partitioner.dataset = Dataset.from_dict({"index": np.arange(len(task.pool)), "label": task.pool.y})
    return partitioner


def forget_loaded_data() -> None:
    """Drop the cached datasets and partitioners (a process that checked splits it will not use)."""
    load_task.cache_clear()
    _partitioner.cache_clear()


def load_partition(name: str, partition_id: int, num_partitions: int, *, partitioning: str = "iid",
                   alpha: float = 0.5, gate_size: int = 200, test_size: int = 360, seed: int = 0,
                   path: str = "", pool_size: int = 0) -> ArraySet:
    """The client pool's partition ``partition_id`` of ``num_partitions``."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
    task = load_task(name, gate_size, test_size, seed, path, pool_size)
    if len(task.pool) < MIN_PARTITION_SIZE * num_partitions:
        raise ValueError(f"the client pool holds {len(task.pool)} {name} examples (client-pool-size={pool_size}, "
                         f"0 = all that the gate and test splits leave), too few for {num_partitions} clients of at "
                         f"least {MIN_PARTITION_SIZE}")
    partitioner = _partitioner(name, gate_size, test_size, seed, path, pool_size, partitioning, num_partitions,
                               float(alpha))
    try:
        indices = np.asarray(partitioner.load_partition(partition_id)["index"], dtype=np.int64)
    except ValueError as error:
        # Flower's Dirichlet partitioner gives up after ten draws with a client below the minimum.
        raise ValueError(f"no {partitioning} split of the {len(task.pool)} pool examples into {num_partitions} "
                         f"clients of at least {MIN_PARTITION_SIZE} each (dirichlet-alpha={alpha}, "
                         f"client-pool-size={pool_size}): raise client-pool-size or dirichlet-alpha, or use fewer "
                         f"clients ({error})") from error
    return ArraySet(task.pool.x[indices], task.pool.y[indices])


def apply_trigger(x: np.ndarray) -> np.ndarray:
    """Stamp the backdoor trigger: the bottom-right corner patch set to full intensity.

    A 2x2 patch on 8x8 digits (stored flat, 64 values) and a 3x3 patch on 28x28 images.
    """
    stamped = np.array(x, copy=True)
    if stamped.ndim == 2 and stamped.shape[1] == 64:
        view = stamped.reshape(-1, 8, 8)
        view[:, -2:, -2:] = 1.0
    elif stamped.ndim == 4:
        stamped[:, :, -3:, -3:] = 1.0
    else:
        raise ValueError(f"no trigger defined for inputs of shape {stamped.shape}")
    return stamped


def poison_with_backdoor(data: ArraySet, target: int, fraction: float, seed: int) -> ArraySet:
    """Training data with a fraction of examples triggered and relabelled to ``target``."""
    rng = np.random.default_rng(seed)
    chosen = rng.random(len(data)) < fraction
    x, y = np.array(data.x, copy=True), np.array(data.y, copy=True)
    x[chosen] = apply_trigger(x[chosen])
    y[chosen] = target
    return ArraySet(x, y)


def attack_success_rate(model: nn.Module, data: ArraySet, target: int) -> float:
    """Share of triggered test images, whose true label is not ``target``, classified as ``target``."""
    keep = data.y != target
    if not keep.any():
        return 0.0
    x = torch.from_numpy(apply_trigger(data.x[keep]))
    model.eval()
    with torch.no_grad():
        predictions = model(x).argmax(-1)
    return float((predictions == target).float().mean())


class DigitsMLP(nn.Module):
    """A three-layer perceptron for 8x8 digits."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 64)
        self.fc2 = nn.Linear(64, 32)
        self.fc3 = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


class SmallCNN(nn.Module):
    """Two conv blocks and two dense layers for 1x28x28 images (about 0.2M parameters)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 5, padding=2)
        self.conv2 = nn.Conv2d(16, 32, 5, padding=2)
        self.fc1 = nn.Linear(32 * 7 * 7, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


def build_model(dataset: str, seed: int = 0) -> nn.Module:
    """The task's model, with seeded initial weights."""
    torch.manual_seed(seed)
    if dataset == "digits":
        return DigitsMLP()
    if dataset == "fashion-mnist":
        return SmallCNN()
    raise ValueError(f"unknown dataset {dataset!r}; choose one of {DATASETS}")


def train_model(model: nn.Module, data: ArraySet, *, epochs: int, learning_rate: float, batch_size: int,
                seed: int) -> float:
    """Local SGD; returns the mean training loss of the last epoch."""
    x, y = data.tensors()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=0.9)
    model.train()
    last = float("nan")
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        total, count = 0.0, 0
        for start in range(0, len(y), batch_size):
            batch = order[start:start + batch_size]
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch)
            count += len(batch)
        last = total / max(count, 1)
    return last


def evaluate_model(model: nn.Module, data: ArraySet, batch_size: int = 1024) -> tuple[float, float]:
    """Mean cross-entropy and accuracy; a non-finite model scores its real (nan/inf) loss."""
    x, y = data.tensors()
    model.eval()
    total, correct = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(y), batch_size):
            logits = model(x[start:start + batch_size])
            total += float(nn.functional.cross_entropy(logits, y[start:start + batch_size], reduction="sum"))
            correct += int((logits.argmax(-1) == y[start:start + batch_size]).sum())
    return total / max(len(y), 1), correct / max(len(y), 1)
