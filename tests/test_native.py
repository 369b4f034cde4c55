"""The fused CPU kernels (streaming_muloco/native.py, csrc/): statistical encode, table decode,
sparse selection.

The compressors' own tests (test_compression.py, test_sparse.py) run both paths against their
references; these check what is particular to the kernels: they build here, they agree with the
torch path, the threaded split changes nothing, and a missing compiler leaves working compressors.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch

from streaming_muloco import native
from streaming_muloco.compression import Compressor, Payload, unpack_bits
from streaming_muloco.compressors import make_compressor


def stat(bits: int, block: int, clip: float = 1.5):
    return make_compressor("statistical", bits, block, stat_clip=clip)


def both_paths(monkeypatch: pytest.MonkeyPatch, make: Callable[[], Compressor],
               x: torch.Tensor) -> dict[str, tuple[Payload, torch.Tensor, Compressor]]:
    """{path: (payload, its decoded values, the compressor)} of `x` on each path."""
    out = {}
    for path, env in (("native", "1"), ("torch", "0")):
        monkeypatch.setenv(native.ENV, env)
        c = make()
        p = c.compress(x)
        out[path] = (p, c.decompress(p), c)
    return out


def test_the_kernels_build_on_this_machine() -> None:
    """CI has a C compiler, so a missing library here is a bug, not a fallback to accept."""
    assert native.enabled() and native.library() is not None


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("block", [64, 256, 1000])
def test_native_and_torch_paths_agree(bits: int, block: int, monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(bits * block)
    n = 7 * block + block // 3 + 1
    x = torch.randn(n, generator=g) * (torch.rand(n, generator=g) * 3 + 0.1) + 0.5
    x[::13] *= 30
    r = both_paths(monkeypatch, lambda: stat(bits, block), x)
    (pn, yn, _), (pt, yt, _) = r["native"], r["torch"]
    cn, ct = unpack_bits(pn.codes, bits, n), unpack_bits(pt.codes, bits, n)
    assert (cn != ct).float().mean() < 1e-3  # summation order may move a value on a bin edge
    same_blocks = torch.tensor([torch.equal(cn[s:s + block], ct[s:s + block]) for s in range(0, n, block)])
    assert same_blocks.float().mean() > 0.5
    mn, mt = pn.meta.view(-1, 2**bits).float(), pt.meta.view(-1, 2**bits).float()
    torch.testing.assert_close(mn[same_blocks], mt[same_blocks], rtol=2**-7, atol=1e-6)  # bf16 meta
    assert torch.equal(yn, mn[torch.arange(n) // block, cn.long()])  # decode: exactly the bin means
    assert pn.nbytes == pt.nbytes


def test_payloads_decode_alike_on_either_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """A rank with the kernels and a rank without them must read each other's payloads."""
    x = torch.randn(5000)
    r = both_paths(monkeypatch, lambda: stat(2, 256), x)
    p_native, c_torch = r["native"][0], r["torch"][2]
    monkeypatch.setenv(native.ENV, "0")
    assert torch.equal(c_torch.decompress(p_native), r["native"][1])


def test_the_threaded_split_gives_the_same_payload(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(native.THREADED_MIN * 2 + 77)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = stat(4, 256).compress(x)
        torch.set_num_threads(3)  # three ranges of blocks, the last one short
        three = stat(4, 256).compress(x)
        y3 = stat(4, 256).decompress(three)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one.to_flat_bytes(), three.to_flat_bytes())
    assert torch.equal(y3, stat(4, 256).decompress(one))


def test_blocks_that_share_a_byte_use_the_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """250-element blocks of 2-bit codes end mid-byte: the kernels would race on those bytes."""
    x = torch.randn(2000)
    r = both_paths(monkeypatch, lambda: stat(2, 250), x)
    assert torch.equal(r["native"][0].to_flat_bytes(), r["torch"][0].to_flat_bytes())


def test_a_missing_or_failing_compiler_is_reported_not_raised(tmp_path: Path) -> None:
    lib, why = native.build(tmp_path, cc="no-such-compiler-here")
    assert lib is None and "no C compiler" in why
    lib, why = native.build(tmp_path, cc="false")  # exits 1
    assert lib is None and "failed" in why
    assert not list(tmp_path.glob("*.so"))  # no partial library left behind


def test_a_fresh_build_directory_builds_and_loads(tmp_path: Path) -> None:
    lib, why = native.build(tmp_path)
    assert lib is not None and why == ""
    assert len(list(tmp_path.glob("block_codes_*.so"))) == 1
    assert native.build(tmp_path)[0] is not None  # the cached library is reused


@pytest.mark.parametrize("block", [64, 250])
def test_e3m0_decodes_bit_identically_on_either_path(block: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """e3m0 decodes through the table kernel: levels times the block scale, the torch path's products."""
    x = torch.randn(9 * block + 7) * torch.logspace(-3, 1, 9 * block + 7)
    monkeypatch.setenv(native.ENV, "0")
    c = make_compressor("e3m0", 4, block)
    p = c.compress(x)
    want = c.decompress(p)
    monkeypatch.setenv(native.ENV, "1")
    assert torch.equal(make_compressor("e3m0", 4, block).decompress(p), want)


@pytest.mark.parametrize("block,frac,n", [(4096, 0.03, 3 * 4096 + 1000), (1024, 0.01, 5000), (256, 0.5, 700)])
def test_sparse_selection_agrees_with_the_numpy_path(block: int, frac: float, n: int,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Same kept set (continuous data: no ties), same decoded values; the order of the kept values
    inside a chunk differs (ascending here), so the payload bytes may differ."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * torch.rand(n, generator=g).add_(0.1)
    r = both_paths(monkeypatch, lambda: make_compressor("sparse", 2, block, frac), x)
    (pn, yn, _), (pt, yt, _) = r["native"], r["torch"]
    assert pn.nbytes == pt.nbytes
    assert torch.equal(yn != 0, yt != 0)
    torch.testing.assert_close(yn, yt, rtol=2**-7, atol=0.0)  # levels: bf16, summed in another order


def test_sparse_ties_keep_exactly_k_lowest_indices_first() -> None:
    """A constant chunk: every key ties at the threshold; k are kept, the first k."""
    c = make_compressor("sparse", 2, 1024, 0.01)
    x = torch.full((1024,), -0.5)
    y = c.decompress(c.compress(x))
    k = c.k(1024)
    assert torch.equal(y[:k], x[:k]) and not y[k:].any()
