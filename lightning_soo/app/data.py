"""Bundled data: scikit-learn's handwritten digits (shipped with the package, no download)."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset


def require(module: str, extra: str = "examples") -> None:
    """Fail with a message naming the extra that provides ``module``."""
    try:
        __import__(module)
    except ImportError as err:
        raise SystemExit(f"this command needs `{module}`: pip install 'lightning-soo[{extra}]'") from err


def digits(test_fraction: float = 0.2, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """(train, test) splits of the 1,797 8x8 digits, features scaled to [0, 1], a fixed shuffle."""
    require("sklearn")
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    n_test = round(test_fraction * len(y))
    return TensorDataset(x[n_test:], y[n_test:]), TensorDataset(x[:n_test], y[:n_test])


def mnist1d(num_samples: int = 10_000, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """(train, test) splits of MNIST-1D, generated locally by the ``mnist1d`` package's procedural generator (no
    download): 40 features, 10 classes, 80% / 20% split. Harder than the digits: a small MLP does not memorise it."""
    require("mnist1d")
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed = num_samples, seed
    data = make_dataset(args)
    x, x_test = (torch.tensor(data[k], dtype=torch.float32) for k in ("x", "x_test"))
    y, y_test = (torch.tensor(data[k], dtype=torch.long) for k in ("y", "y_test"))
    return TensorDataset(x, y), TensorDataset(x_test, y_test)


DATASETS = {"digits": digits, "mnist1d": mnist1d}
