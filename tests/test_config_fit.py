"""Configs against Hopper's shared memory per dtype (issue 16: fp32 forward needed 262160
bytes of 232448 with the bf16-sized default): gg_spec.shared_memory_bytes / fits /
default_config(op, dtype) / valid_candidates(dtype=) / validate(dtype=), numpy-free, and
triton_gg refusing a user's oversize config before launch."""

import dataclasses

import pytest

import gg_spec
from gg_spec import configs as C

DTYPES = ("bfloat16", "float16", "float32")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", C.OPS)
def test_defaults_fit(op, dtype):
    config = gg_spec.default_config(op, dtype)
    assert gg_spec.fits(op, config, dtype)
    assert gg_spec.shared_memory_bytes(op, config, dtype) <= gg_spec.SHARED_MEMORY_LIMIT
    gg_spec.validate(op, config, dtype=dtype)


@pytest.mark.parametrize("op", C.OPS)
def test_two_byte_defaults_unchanged(op):
    for dtype in ("bfloat16", "float16", None):
        assert gg_spec.default_config(op, dtype) == C.CONFIG_TYPES[op]()
    assert gg_spec.default_config(op) == C.CONFIG_TYPES[op]()


def test_fp32_defaults_are_the_small_fma_tiles():
    """fp32 dots run on the FMA units: small tiles (C._FP32_DEFAULTS, measured 40-70x faster
    than the 2-byte tiles there); they fit, keep the TMA switches and tile order, and come
    first among the fp32 candidates."""
    for op in C.OPS:
        base = C.CONFIG_TYPES[op]()
        fp32 = gg_spec.default_config(op, "float32")
        assert fp32 == C._FP32_DEFAULTS[op]
        assert gg_spec.fits(op, fp32, "float32")
        changed = {f.name for f in dataclasses.fields(base)
                   if getattr(base, f.name) != getattr(fp32, f.name)}
        assert changed <= {"num_stages", "block_k", "block_n", "block_m", "num_warps"}, changed
        assert gg_spec.valid_candidates(op, dtype="float32")[0] == fp32
    # the case: the bf16-sized forward does not fit in fp32
    assert not gg_spec.fits("forward", gg_spec.ForwardConfig(), "float32")


def test_estimate_scales_with_dtype_and_stages():
    cfg = gg_spec.ForwardConfig()
    bf16 = gg_spec.shared_memory_bytes("forward", cfg, "bfloat16")
    assert bf16 == gg_spec.shared_memory_bytes("forward", cfg, "float16")
    # the real compile (sm_90, Triton 3.6) needs 180248 bf16 and 262160 fp32 bytes
    assert 180248 <= bf16 < 1.3 * 180248
    assert 262160 <= gg_spec.shared_memory_bytes("forward", cfg, "float32") < 1.3 * 262160
    deeper = cfg.replace(num_stages=4)
    assert gg_spec.shared_memory_bytes("forward", deeper, "bfloat16") > bf16
    # dW's TMA store stages the output tile
    dw = gg_spec.DWConfig()
    assert (gg_spec.shared_memory_bytes("dW", dw.replace(tma_store_dw=True), "bfloat16")
            == gg_spec.shared_memory_bytes("dW", dw, "bfloat16") + dw.block_n * dw.block_k * 2)


def test_dtype_names():
    for name in DTYPES:
        assert C.dtype_name(name) == name
    assert C.dtype_name("torch.float32") == "float32"
    with pytest.raises(ValueError, match="dtype"):
        C.dtype_name("float64")
    with pytest.raises(ValueError, match="dtype"):
        gg_spec.default_config("forward", "int8")


def test_validate_refuses_oversize_fp32_config():
    cfg = gg_spec.ForwardConfig()  # the bf16 default, 262160 bytes compiled in fp32
    gg_spec.validate("forward", cfg)  # without a dtype: no shared-memory rule
    gg_spec.validate("forward", cfg, dtype="bfloat16")
    needed = gg_spec.shared_memory_bytes("forward", cfg, "float32")
    with pytest.raises(ValueError) as info:
        gg_spec.validate("forward", cfg, dtype="float32")
    msg = str(info.value)
    for part in ("ForwardConfig(", "block_n=256", "float32", str(needed),
                 str(gg_spec.SHARED_MEMORY_LIMIT), "shared memory"):
        assert part in msg, (part, msg)
    # a smaller limit refuses more; a larger one accepts it
    gg_spec.validate("forward", cfg, dtype="float32", limit=needed)
    with pytest.raises(ValueError, match="shared memory"):
        gg_spec.validate("dW", gg_spec.DWConfig(), dtype="bfloat16", limit=1024)
    assert gg_spec.fits("forward", cfg, "float32", limit=needed)
    assert not gg_spec.fits("forward", cfg, "float32", limit=needed - 1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("flags", [{}, {"permute_x": True}, {"permute_y": True}])
@pytest.mark.parametrize("op", C.OPS)
def test_valid_candidates_fit(op, flags, dtype):
    found = gg_spec.valid_candidates(op, with_tma=True, dtype=dtype, **flags)
    assert found
    for config in found:
        assert gg_spec.fits(op, config, dtype), config
        gg_spec.validate(op, config, dtype=dtype, **flags)
    every = gg_spec.valid_candidates(op, with_tma=True, **flags)
    fitting = [c for c in every if gg_spec.fits(op, c, dtype)]
    if dtype == "float32":  # the small FMA tile (and its TMA variant) come first
        assert found[0] == C._FP32_DEFAULTS[op]
        assert [c for c in found if c in every] == fitting
    else:
        assert found == fitting
    if dtype != "float32":  # the search space is sized for 2-byte operands: all fit
        assert found == every


def test_fp32_candidates_drop_the_oversize_ones():
    every = gg_spec.valid_candidates("forward", with_tma=True)
    fp32 = gg_spec.valid_candidates("forward", with_tma=True, dtype="float32")
    assert 0 < len(fp32) < len(every)
    assert all(c.block_n * c.block_m * c.block_k < 128 * 256 * 64 or c.num_stages < 3
               for c in fp32)


def test_shrunk_order_prefers_fewer_stages():
    steps = list(C._shrunk(gg_spec.ForwardConfig()))
    assert steps[0] == gg_spec.ForwardConfig()
    assert steps[1] == gg_spec.ForwardConfig(num_stages=2)
    assert steps[2] == gg_spec.ForwardConfig(block_k=32)
    assert all(s.num_stages >= 2 and s.block_k >= 32 and s.block_m >= 64 for s in steps)


def test_tuning_key_dtype():
    key = gg_spec.tuning_key("dW", num_experts=4, n=8, k=8, rows=5, dtype="float32")
    assert C.key_dtype(key) == "float32"
    assert C.key_dtype("not|a|key") is None


def test_configs_module_is_pure_python():
    import inspect
    source = inspect.getsource(C)
    assert "import numpy" not in source and "from numpy" not in source


# ---------------------------------------------------------------------- triton_gg (CPU)

torch = pytest.importorskip("torch")
triton_gg = pytest.importorskip("triton_gg")


def _inputs(dtype):
    e, n, k, tokens, topk = 3, 16, 16, 4, 2
    x = torch.randn(tokens * topk, k, dtype=dtype)
    w = torch.randn(e, n, k, dtype=dtype)
    ids = torch.arange(tokens * topk).reshape(tokens, topk) % e
    m_sizes, gather = triton_gg.route(ids, e)
    return x, w, m_sizes, gather, topk


def test_triton_gg_refuses_oversize_fp32_config_before_launch():
    x, w, m_sizes, gather, topk = _inputs(torch.float32)
    big = gg_spec.ForwardConfig()
    with pytest.raises(ValueError, match=r"shared memory.*float32|float32.*shared memory"):
        triton_gg.grouped_gemm_forward(x, w, m_sizes, gather, topk, config=big)
    with pytest.raises(ValueError, match="shared memory"):
        triton_gg.grouped_gemm(x, w, m_sizes, gather, topk,
                               dx_config=gg_spec.DXConfig(block_m=128, block_n=128,
                                                          block_k=128))
    with pytest.raises(ValueError, match="shared memory"):
        triton_gg.grouped_mm(x, w.transpose(1, 2), torch.cumsum(m_sizes, 0).to(torch.int32),
                             forward_config=big)


def test_triton_gg_fp32_default_path_runs():
    x, w, m_sizes, gather, topk = _inputs(torch.float32)
    y = triton_gg.grouped_gemm_forward(x, w, m_sizes, gather, topk)
    starts = torch.cumsum(m_sizes, 0) - m_sizes
    for e in range(w.shape[0]):
        rows = slice(int(starts[e]), int(starts[e] + m_sizes[e]))
        torch.testing.assert_close(y[rows], x[rows] @ w[e].T, rtol=1e-5, atol=1e-5)
    # bf16 accepts the bf16-sized default as a user config
    xb, wb, *_ = _inputs(torch.bfloat16)
    triton_gg.grouped_gemm_forward(xb, wb, m_sizes, gather, topk,
                                   config=gg_spec.ForwardConfig(block_m=16, block_n=16,
                                                                block_k=16))


def test_triton_gg_default_choice_passes_dtype():
    from triton_gg import autotune
    x, w, m_sizes, gather, topk = _inputs(torch.float32)
    dims = triton_gg._validate.check_forward(x, w, m_sizes, gather, topk, permute_x=False,
                                             permute_y=False, topk_weights=None,
                                             fuse_mul_post=False, config=None)
    key = autotune.key_for("forward", dims, x.dtype, x.device)
    chosen = autotune.choose("forward", None, False, lambda: key, None, x.device)
    assert gg_spec.fits("forward", chosen, "float32"), chosen
    chosen = autotune.choose("forward", None, True, lambda: key, None, x.device)
    assert gg_spec.fits("forward", chosen, "float32"), chosen


def test_tune_candidates_fit_the_key_dtype(tmp_path, monkeypatch):
    from triton_gg import autotune
    monkeypatch.setenv("GG_CACHE_DIR", str(tmp_path))
    key = gg_spec.tuning_key("forward", num_experts=2, n=8, k=8, rows=4, dtype="float32",
                             device="test_fp32_device")
    seen = []

    def timer(fn):
        seen.append(fn)
        raise RuntimeError("do not run")  # every candidate 'fails': the default is kept

    tried = []
    best = autotune.tune("forward", key, lambda c: tried.append(c), timer=timer)
    assert best == gg_spec.default_config("forward", "float32")
    assert len(seen) == len(gg_spec.valid_candidates("forward", with_tma=True,
                                                     dtype="float32"))
    autotune._memory.pop(key, None)
