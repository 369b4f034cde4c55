"""Fixtures shared by several test modules."""
from __future__ import annotations

import pytest

from streaming_muloco import native


@pytest.fixture(params=["native", "torch"])
def kernel_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a compressor test on the fused C kernels (native.py) and on the torch/numpy path."""
    monkeypatch.setenv(native.ENV, "1" if request.param == "native" else "0")
    assert (native.library() is not None) == (request.param == "native")
    return request.param
