"""Pin DeepSpeed Muon's Newton-Schulz iteration to fp32 for tests that compare two computations.

DeepSpeed runs the iteration in fp16 wherever its accelerator reports fp16 support; its CPU
accelerator does so on CPUs with AVX512-FP16 (the CI machines since 2026-11-24) and not on
older ones. In fp16 the Gram iteration turns a 1-ulp difference in its input (another
summation order of the same gradient, or the identity outer step's rounding) into update
differences of 1e-4 to 1e-2, so two correct implementations no longer agree to 2e-5. Tests
that check our outer loop against a reference pin both sides to fp32 with this; tests about
Muon itself (tests/test_muon_inner.py) and the simulator agreement keep DeepSpeed's choice.
"""
import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def newton_schulz_fp32() -> Iterator[None]:
    """Within the block, DeepSpeed's NS iterations run in fp32 in this process."""
    from deepspeed.runtime.zero.muon import original_muon

    saved = original_muon.ns_compute_dtype
    original_muon.ns_compute_dtype = lambda ns_method="gram": torch.float32
    try:
        yield
    finally:
        original_muon.ns_compute_dtype = saved
