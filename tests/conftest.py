"""Shared fixtures. Zoo models are trained once per test session into a private cache
(set UNMASK_TEST_CACHE to a folder to reuse trained models across runs while developing)."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session", autouse=True)
def zoo_cache(tmp_path_factory):
    keep = os.environ.get("UNMASK_TEST_CACHE")
    path = keep if keep else str(tmp_path_factory.mktemp("unmask-cache"))
    old = os.environ.get("UNMASK_CACHE")
    os.environ["UNMASK_CACHE"] = path
    yield path
    if old is None:
        os.environ.pop("UNMASK_CACHE", None)
    else:
        os.environ["UNMASK_CACHE"] = old


@pytest.fixture(scope="session")
def mnist_cnn(zoo_cache):
    from unmask.bench import zoo

    return zoo.load("mnist-cnn", device="cpu", progress=False)


@pytest.fixture(scope="session")
def digits_mlp(zoo_cache):
    from unmask.bench import zoo

    return zoo.load("digits-mlp", device="cpu", progress=False)


@pytest.fixture(scope="session")
def mnist_test():
    from unmask.bench import data

    return data.load("mnist5k", "test")


@pytest.fixture(scope="session")
def digits_test():
    from unmask.bench import data

    return data.load("digits", "test")


@pytest.fixture
def gen():
    g = torch.Generator()
    g.manual_seed(0)
    return g
