"""The AVX512-BF16 linear kernel (kernels/bf16_linear.py) against the fp32 product of the same
bf16 values: every row count of decoding and prefill, partial output blocks, bias, batched and
strided inputs, threads; and its build and cache."""

import pytest
import torch
import torch.nn.functional as F

from aion_train.kernels import bf16_linear

pytestmark = pytest.mark.skipif(
    not bf16_linear.available(), reason=f"the bf16 linear kernel cannot run here: {bf16_linear.status()[1]}"
)


def _exact(x, w, b=None):
    """The product of the bf16 values in fp32, rounded to bf16 once (what the kernel computes
    up to the order of its fp32 sums)."""
    return F.linear(x.float(), w.float(), None if b is None else b.float())


def _close(got, x, w, b=None):
    want = _exact(x, w, b)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    # within one bf16 rounding of the fp32 product (the sums' order moves it by ~1e-6 relative)
    torch.testing.assert_close(got.float(), want, rtol=2**-8, atol=1e-4)
    # and as close to it as oneDNN's bf16 GEMM on the same values
    err, ref_err = (got.float() - want).abs().max(), (F.linear(x, w, b).float() - want).abs().max()
    assert err <= ref_err + 1e-6, (err, ref_err)


@pytest.mark.parametrize("out_features,in_features", [(48, 32), (40, 34), (2048, 512), (512, 1024), (7, 6), (1000, 96)])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 13, 64])
def test_kernel_is_the_fp32_product_rounded_once(out_features, in_features, rows):
    g = torch.Generator().manual_seed(out_features * 31 + rows)
    w = torch.randn(out_features, in_features, generator=g).bfloat16()
    x = torch.randn(rows, in_features, generator=g).bfloat16()
    _close(bf16_linear.linear(x, bf16_linear.pack(w)), x, w)


def test_bias_batched_strided_and_other_dtypes():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(72, 40, generator=g).bfloat16()
    b = torch.randn(72, generator=g).bfloat16()
    p = bf16_linear.pack(w)
    x = torch.randn(2, 3, 40, generator=g).bfloat16()
    _close(bf16_linear.linear(x, p, b).reshape(6, 72), x.reshape(6, 40), w, b)
    wide = torch.randn(5, 80, generator=g).bfloat16()
    strided = wide[:, ::2]  # not contiguous
    _close(bf16_linear.linear(strided, p), strided.contiguous(), w)
    x32 = torch.randn(4, 40, generator=g)
    got = bf16_linear.linear(x32, p)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, _exact(x32.bfloat16(), w).bfloat16().float(), rtol=2**-8, atol=1e-4)
    assert bf16_linear.linear(x[:0].reshape(0, 40), p).shape == (0, 72)


def test_same_result_on_one_thread_and_two():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(1024, 256, generator=g).bfloat16()
    x = torch.randn(6, 256, generator=g).bfloat16()
    p = bf16_linear.pack(w)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = bf16_linear.linear(x, p)
        torch.set_num_threads(2)
        two = bf16_linear.linear(x, p)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)  # each output is summed by one thread, in order


def test_bad_shapes_are_refused():
    p = bf16_linear.pack(torch.zeros(16, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="input has 6 features, the weight 8"):
        bf16_linear.linear(torch.zeros(2, 6, dtype=torch.bfloat16), p)
    with pytest.raises(ValueError, match="runs on the CPU; the input is on meta"):
        bf16_linear.linear(torch.zeros(2, 8, dtype=torch.bfloat16, device="meta"), p)
    with pytest.raises(ValueError, match="even"):
        bf16_linear.pack(torch.zeros(16, 7, dtype=torch.bfloat16))


def test_the_library_is_built_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(bf16_linear, "cache_dir", lambda: tmp_path / "kernels")
    first = bf16_linear._build()
    assert first.parent == tmp_path / "kernels" and first.name.startswith("bf16_linear-") and first.stat().st_size
    stamp = first.stat().st_mtime_ns
    assert bf16_linear._build() == first and first.stat().st_mtime_ns == stamp  # cached, not rebuilt
    assert sorted(p.name for p in first.parent.iterdir()) == [first.name]  # no temporary file left
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(bf16_linear, "cache_dir", lambda: tmp_path / "other")
    with pytest.raises((RuntimeError, OSError)):
        bf16_linear._build()
