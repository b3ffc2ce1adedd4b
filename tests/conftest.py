import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """GPU cases run where CUDA is present; elsewhere they are reported as skipped (see -ra)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marker: gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
