"""Datasets, splits and partitions load offline and never overlap."""

from collections import Counter
import gzip
import struct

import numpy as np
import pytest
import torch

from softmerge.simulations.tasks import (
    DatasetUnavailable,
    attacker_sample,
    build_model,
    load_fashion_mnist_arrays,
    load_partition,
    load_task,
    read_idx,
)


def _examples(split):
    """The split's examples as a multiset of (image bytes, label): the dataset repeats some images."""
    return Counter((row.tobytes(), int(label)) for row, label in zip(split.x.reshape(len(split), -1), split.y))


def test_digits_splits_are_disjoint_and_cover_the_dataset(digits_task):
    from softmerge.simulations.tasks import load_digits_arrays

    assert len(digits_task.gate) == 200 and len(digits_task.test) == 360
    assert len(digits_task.gate) + len(digits_task.test) + len(digits_task.pool) == 1797
    # The three splits add up to the dataset example for example: none shares a row with another.
    x, y = load_digits_arrays()
    whole = Counter((row.tobytes(), int(label)) for row, label in zip(x, y))
    assert _examples(digits_task.gate) + _examples(digits_task.test) + _examples(digits_task.pool) == whole


def test_the_attackers_sample_comes_from_the_pool_not_the_servers_split(digits_task):
    sample = attacker_sample(digits_task, 200, seed=0)
    assert len(sample) == 200
    pool_rows = {row.tobytes() for row in digits_task.pool.x.reshape(len(digits_task.pool), -1)}
    assert all(row.tobytes() in pool_rows for row in sample.x.reshape(len(sample), -1))
    # No example of the server's gate split, unless the dataset holds the same image twice.
    assert not (_examples(sample) - _examples(digits_task.pool))
    gate_only = _examples(digits_task.gate) - _examples(digits_task.pool)
    assert not set(gate_only) & set(_examples(sample))
    again = attacker_sample(digits_task, 200, seed=0)
    assert np.array_equal(again.x, sample.x) and np.array_equal(again.y, sample.y)
    assert not np.array_equal(attacker_sample(digits_task, 200, seed=1).y, sample.y)
    assert len(attacker_sample(digits_task, len(digits_task.pool) + 1, seed=0)) == len(digits_task.pool)
    with pytest.raises(ValueError, match="attacker's sample"):
        attacker_sample(digits_task, 0, seed=0)


@pytest.mark.parametrize("partitioning", ["iid", "dirichlet"])
def test_partitions_are_disjoint_and_cover_the_pool(partitioning, digits_task):
    parts = [load_partition("digits", p, 10, partitioning=partitioning, alpha=0.5) for p in range(10)]
    assert sum(len(p) for p in parts) == len(digits_task.pool)
    # Example for example the pool: no client holds another's rows, and none is left out.
    assert sum((_examples(part) for part in parts), Counter()) == _examples(digits_task.pool)
    assert all(len(p) >= 2 for p in parts)
    if partitioning == "dirichlet":
        # Label skew: some partition misses some class, or class shares vary widely.
        shares = np.array([[np.mean(p.y == c) for c in range(10)] for p in parts])
        assert shares.max() > 0.3


def test_partition_id_out_of_range_is_an_error():
    with pytest.raises(ValueError, match="partition-id 10 is outside 0..9"):
        load_partition("digits", 10, 10)


def test_split_sizes_are_checked():
    with pytest.raises(ValueError, match="server-gate-size"):
        load_task("digits", 1000, 900, 0, "")


def _write_idx(path, array):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def _write_fashion_mnist(directory, train_images, train_labels, test_images, test_labels):
    _write_idx(directory / "train-images-idx3-ubyte.gz", train_images)
    _write_idx(directory / "train-labels-idx1-ubyte.gz", train_labels)
    _write_idx(directory / "t10k-images-idx3-ubyte.gz", test_images)
    _write_idx(directory / "t10k-labels-idx1-ubyte.gz", test_labels)


def test_fashion_mnist_reads_standard_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    _write_fashion_mnist(tmp_path, rng.integers(0, 255, (30, 28, 28)), rng.integers(0, 10, (30,)),
                         rng.integers(0, 255, (10, 28, 28)), rng.integers(0, 10, (10,)))
    x, y = load_fashion_mnist_arrays(tmp_path)
    assert x.shape == (40, 1, 28, 28) and y.shape == (40,)
    assert 0.0 <= x.min() and x.max() <= 1.0
    logits = build_model("fashion-mnist")(torch.from_numpy(x[:4]))
    assert logits.shape == (4, 10)


def test_fashion_mnist_missing_files_give_a_clear_error(tmp_path):
    with pytest.raises(DatasetUnavailable, match="dataset-fashion-mnist"):
        load_fashion_mnist_arrays(tmp_path)
    with pytest.raises(DatasetUnavailable, match="does not exist"):
        load_fashion_mnist_arrays(tmp_path / "absent")


def test_corrupt_idx_file_is_rejected(tmp_path):
    path = tmp_path / "bad-idx"
    path.write_bytes(struct.pack(">HBB", 0, 0x08, 1) + struct.pack(">I", 100) + b"\x00" * 10)
    with pytest.raises(ValueError, match="header says"):
        read_idx(path)


def test_a_cut_off_gzipped_idx_file_is_named_in_the_error(tmp_path):
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    whole = gzip.compress(struct.pack(">HBB", 0, 0x08, 1) + struct.pack(">I", 1000) + bytes(1000))
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz cannot be read .*EOFError.*dataset-path"):
        read_idx(path)


def test_an_idx_file_cut_off_inside_its_header_is_named_in_the_error(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(struct.pack(">HBB", 0, 0x08, 3) + struct.pack(">I", 30))
    with pytest.raises(ValueError, match="train-images-idx3-ubyte ends inside its header"):
        read_idx(path)
    path.write_bytes(struct.pack(">HBB", 0, 0x08, 70) + bytes(280))
    with pytest.raises(ValueError, match="train-images-idx3-ubyte claims 70 dimensions"):
        read_idx(path)


@pytest.mark.parametrize(("train_images", "train_labels", "says"), [
    # Images and labels swapped: the lengths agree, so only the shapes tell.
    (np.zeros(30), np.zeros((30, 28, 28)), r"train-images-idx3-ubyte has shape \(30,\), expected \(N, 28, 28\)"),
    (np.zeros((30, 32, 32)), np.zeros(30), r"train-images-idx3-ubyte has shape \(30, 32, 32\)"),
    (np.zeros((30, 28, 28)), np.full(30, 12), r"train-labels-idx1-ubyte has label 12; the classes are 0..9"),
])
def test_fashion_mnist_files_of_the_wrong_shape_or_labels_are_named(tmp_path, train_images, train_labels, says):
    # Before, these passed the length check and failed in numpy's indexing, or trained on labels
    # the model has no output for.
    _write_fashion_mnist(tmp_path, train_images, train_labels, np.zeros((10, 28, 28)), np.zeros(10))
    with pytest.raises(ValueError, match=says):
        load_fashion_mnist_arrays(tmp_path)


@pytest.mark.parametrize(("partitioning", "pool", "clients", "says"), [
    ("iid", 5, 10, "holds 5 digits examples .* too few for 10 clients of at least 2"),
    ("dirichlet", 40, 10, "no dirichlet split of the 40 pool examples into 10 clients .*dirichlet-alpha=0.05"),
])
def test_a_client_pool_too_small_for_its_clients_says_which_setting(partitioning, pool, clients, says):
    # Before, a client failed deep in the datasets library (an IndexError, or the partitioner's
    # "max number of attempts"), and every reply of the run was an error.
    with pytest.raises(ValueError, match=says):
        load_partition("digits", 0, clients, partitioning=partitioning, alpha=0.05, pool_size=pool)
