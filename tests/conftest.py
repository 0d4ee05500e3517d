"""The one way to skip CUDA tests: mark them `cuda` (a test, or a `device` parameter); without a GPU
they are skipped at collection, with the reason listed by -ra."""
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request):
    """Every op test runs on CPU, and on CUDA where a GPU is present (skipped otherwise)."""
    return request.param
