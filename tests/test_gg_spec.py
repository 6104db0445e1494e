"""gg_spec: routing, reference (against a brute-force loop and finite differences), configs
and their validity rules, input checks."""

import subprocess
import sys

import numpy as np
import pytest

import gg_spec
from gg_spec import reference as ref
from gg_spec.cases import FUSIONS, Case, cpu_cases, edge_cases, make_inputs, round_to_dtype
from gg_spec.checks import ArgInfo


# ---------------------------------------------------------------- brute force, row by row

def brute_forward(x, w, m_sizes, gather, topk, permute_x, permute_y, topk_weights, mul):
    m = int(np.sum(m_sizes))
    y = np.full((m, w.shape[1]), np.nan)
    e_of = np.repeat(np.arange(len(m_sizes)), m_sizes)
    for p in range(m):
        row = x[gather[p] // topk] if permute_x else x[p]
        out = np.array([np.dot(row.astype(np.float64), w[e_of[p], n].astype(np.float64))
                        for n in range(w.shape[1])])
        if mul:
            out = out * topk_weights[gather[p]]
        y[gather[p] if permute_y else p] = out
    return y


def brute_dX(dy, w, m_sizes, gather, topk, permute_x, permute_y):
    m = int(np.sum(m_sizes))
    dx = np.full((m, w.shape[2]), np.nan)
    e_of = np.repeat(np.arange(len(m_sizes)), m_sizes)
    for p in range(m):
        g = dy[gather[p]] if permute_y else dy[p]
        out = sum(g[n] * w[e_of[p], n].astype(np.float64) for n in range(w.shape[1]))
        dx[gather[p] if permute_x else p] = out
    return dx


def brute_dW(x, dy, m_sizes, gather, topk, permute_x, permute_y):
    dw = np.zeros((len(m_sizes), dy.shape[1], x.shape[1]))
    e_of = np.repeat(np.arange(len(m_sizes)), m_sizes)
    for p in range(int(np.sum(m_sizes))):
        xr = x[gather[p] // topk] if permute_x else x[p]
        g = dy[gather[p]] if permute_y else dy[p]
        dw[e_of[p]] += np.outer(g.astype(np.float64), xr.astype(np.float64))
    return dw


REF_CASES = [c for c in cpu_cases(("float32",)) + edge_cases() if c.tokens <= 24]


@pytest.mark.parametrize("case", REF_CASES, ids=lambda c: c.id)
def test_reference_matches_row_by_row_loop(case):
    d = make_inputs(case)
    f = case.fusion
    args = (d["m_sizes"], d["gather_indices"], case.topk)
    y = ref.forward(d["x"], d["w"], *args, permute_x=f.permute_x, permute_y=f.permute_y,
                    topk_weights=d["topk_weights"], fuse_mul_post=f.fuse_mul_post)
    y_b = brute_forward(d["x"], d["w"], *args, f.permute_x, f.permute_y, d["topk_weights"],
                        f.fuse_mul_post)
    np.testing.assert_allclose(y, y_b, rtol=1e-12, atol=1e-12)
    dx = ref.dX(d["dy"], d["w"], *args, permute_x=f.permute_x, permute_y=f.permute_y)
    np.testing.assert_allclose(dx, brute_dX(d["dy"], d["w"], *args, f.permute_x, f.permute_y),
                               rtol=1e-12, atol=1e-12)
    dw = ref.dW(d["x"], d["dy"], *args, permute_x=f.permute_x, permute_y=f.permute_y)
    np.testing.assert_allclose(dw, brute_dW(d["x"], d["dy"], *args, f.permute_x, f.permute_y),
                               rtol=1e-12, atol=1e-12)
    empty = np.flatnonzero(d["m_sizes"] == 0)
    assert np.all(dw[empty] == 0.0)


@pytest.mark.parametrize("fusion", list(FUSIONS.values()), ids=lambda f: f.name)
@pytest.mark.parametrize("topk", [1, 2, 3, 8])
def test_reference_grads_match_finite_differences(fusion, topk, rng):
    shape = gg_spec.get_shape("tiny_many_w1")
    case = Case(shape, 7, "float32", "empty_experts", fusion, seed=int(rng.integers(1 << 30)))
    case = case.with_topk(topk)
    d = {k: v.astype(np.float64) if v.dtype == np.float32 else v
         for k, v in make_inputs(case).items()}
    kw = dict(permute_x=fusion.permute_x, permute_y=fusion.permute_y,
              topk_weights=d["topk_weights"], fuse_mul_post=fusion.fuse_mul_post)
    args = (d["m_sizes"], d["gather_indices"], topk)
    g = d["dy"]

    def loss(x, w, tw):
        return np.sum(g * ref.forward(x, w, *args, **{**kw, "topk_weights": tw}))

    dx, dw, dtw = ref.grouped_gemm_grads(d["x"], d["w"], *args, g, **kw)
    eps = 1e-6
    for which, grad in (("x", dx), ("w", dw), ("tw", dtw)):
        if grad is None:
            assert which == "tw" and not fusion.fuse_mul_post
            continue
        base = {"x": d["x"], "w": d["w"], "tw": d["topk_weights"]}
        direction = rng.standard_normal(base[which].shape)
        plus = dict(base, **{which: base[which] + eps * direction})
        minus = dict(base, **{which: base[which] - eps * direction})
        numeric = (loss(**plus) - loss(**minus)) / (2 * eps)
        analytic = np.sum(grad * direction)
        assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(analytic)), which
    if fusion.permute_x:
        assert dx.shape == (7, shape.k)


# ---------------------------------------------------------------- routing

@pytest.mark.parametrize("kind", gg_spec.ROUTING_KINDS)
@pytest.mark.parametrize("topk", [1, 2, 4, 8])
def test_routing_kinds(kind, topk, rng):
    tokens, experts = 37, 16
    r = gg_spec.make_routing(kind, tokens, experts, topk, rng)
    assert r.topk_ids.shape == (tokens, topk) and r.topk_ids.dtype == np.int32
    # each token names distinct experts
    assert all(len(set(row)) == topk for row in r.topk_ids.tolist())
    assert r.m_sizes.sum() == tokens * topk and r.m_sizes.dtype == np.int32
    np.testing.assert_allclose(r.topk_weights.reshape(tokens, topk).sum(1), 1.0, rtol=1e-5)
    if kind == "balanced":
        assert r.m_sizes.max() - r.m_sizes.min() <= 1
    if kind == "empty_experts":
        assert (r.m_sizes == 0).any()
    if kind == "one_expert":
        assert r.m_sizes[0] == tokens


def test_route_is_stable_argsort(rng):
    ids = rng.integers(0, 6, size=(50, 3)).astype(np.int32)
    m_sizes, gather = gg_spec.route(ids, 8)
    flat = ids.ravel()
    assert list(m_sizes) == [int((flat == e).sum()) for e in range(8)]
    # expert order, and ascending routed rows within each expert (stability)
    assert np.all(np.diff(flat[gather]) >= 0)
    offs = gg_spec.expert_offsets(m_sizes)
    for e in range(8):
        seg = gather[offs[e]:offs[e + 1]]
        assert np.all(np.diff(seg) > 0) and np.all(flat[seg] == e)
    assert sorted(gather.tolist()) == list(range(150))


def test_route_rejects_bad_ids():
    with pytest.raises(ValueError, match="num_experts=4"):
        gg_spec.route(np.array([[0, 4]]), 4)
    with pytest.raises(ValueError, match=r"\[T, k\]"):
        gg_spec.route(np.array([0, 1]), 4)


def test_round_to_bfloat16_matches_ml_dtypes(rng):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    a = (rng.standard_normal(10_000) * 10).astype(np.float32)
    ours = round_to_dtype(a, "bfloat16")
    theirs = a.astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(ours, theirs)


# ---------------------------------------------------------------- configs and validate

def test_defaults_are_valid():
    for op in gg_spec.configs.OPS:
        gg_spec.validate(op, gg_spec.default_config(op))
        assert gg_spec.valid_candidates(op)


@pytest.mark.parametrize("op,config,kw,match", [
    ("forward", gg_spec.ForwardConfig(), dict(permute_x=True, permute_y=True), "both"),
    ("forward", gg_spec.ForwardConfig(), dict(permute_y=True, is_first_gemm=True), "second"),
    ("forward", gg_spec.ForwardConfig(), dict(permute_x=True, is_first_gemm=False), "first"),
    ("forward", gg_spec.ForwardConfig(tma_load_x=True), dict(permute_x=True), "tma_load_x"),
    ("forward", gg_spec.ForwardConfig(tma_store_y=True), dict(permute_y=True), "tma_store_y"),
    ("dX", gg_spec.DXConfig(tma_load_dy=True), dict(permute_y=True), "tma_load_dy"),
    ("dX", gg_spec.DXConfig(tma_store_dx=True), dict(permute_x=True), "tma_store_dx"),
    ("dW", gg_spec.DWConfig(tma_load_x=True), dict(permute_x=True), "tma_load_x"),
    ("dW", gg_spec.DWConfig(tma_load_dy=True), dict(permute_y=True), "tma_load_dy"),
    ("dW", gg_spec.ForwardConfig(), {}, "DWConfig"),
    ("dX", gg_spec.DXConfig(), dict(fuse_mul_post=True), "fuse_mul_post"),
    ("forward", gg_spec.ForwardConfig(block_m=48), {}, "block_m"),
    ("forward", gg_spec.ForwardConfig(num_warps=3), {}, "num_warps"),
    ("forward", gg_spec.ForwardConfig(num_stages=0), {}, "num_stages"),
    ("fwd", gg_spec.ForwardConfig(), {}, "op must be"),
])
def test_validate_refuses(op, config, kw, match):
    with pytest.raises(ValueError, match=match):
        gg_spec.validate(op, config, **kw)


def test_validate_accepts_tma_on_non_permuted_operands():
    gg_spec.validate("forward", gg_spec.ForwardConfig(tma_load_w=True, tma_store_y=True),
                     permute_x=True)
    gg_spec.validate("forward", gg_spec.ForwardConfig(tma_load_w=True, tma_load_x=True),
                     permute_y=True, fuse_mul_post=True)
    gg_spec.validate("dW", gg_spec.DWConfig(tma_load_dy=True, tma_store_dw=True), permute_x=True)


def test_candidates_respect_fusions():
    for c in gg_spec.valid_candidates("forward", permute_x=True, with_tma=True):
        assert not c.tma_load_x
    assert any(c.tma_load_w for c in gg_spec.valid_candidates("forward", permute_x=True,
                                                              with_tma=True))


def test_config_round_trip_and_key():
    c = gg_spec.DWConfig(block_n=256, tma_load_x=True)
    assert gg_spec.config_from_dict(gg_spec.config_to_dict(c)) == c
    k1 = gg_spec.tuning_key("forward", num_experts=8, n=64, k=32, rows=1000, dtype="bfloat16")
    k2 = gg_spec.tuning_key("forward", num_experts=8, n=64, k=32, rows=1024, dtype="bfloat16")
    assert k1 == k2 and "rows~1024" in k1


def test_presets_have_both_gemms():
    for name in gg_spec.REAL_PRESETS:
        p = gg_spec.get_preset(name)
        assert p.first.k == p.second.n == p.hidden
        assert p.first.n == 2 * p.intermediate and p.second.k == p.intermediate
    assert gg_spec.get_shape("qwen3_w1") == gg_spec.PRESETS["qwen3_30b_a3b"].first
    with pytest.raises(ValueError, match="unknown preset"):
        gg_spec.get_preset("nope")


# ---------------------------------------------------------------- input checks

def A(shape, dtype="float32", device="cpu"):
    return ArgInfo(tuple(shape), dtype, device)


def test_check_forward_shapes():
    ck = gg_spec.checks.check_forward
    kw = dict(permute_x=False, permute_y=False, topk_weights=None, fuse_mul_post=False)
    dims = ck(A((12, 8)), A((3, 5, 8)), A((3,), "int32"), A((12,), "int32"), 2, **kw)
    assert (dims.num_experts, dims.n, dims.k, dims.m) == (3, 5, 8, 12)
    with pytest.raises(ValueError, match=r"X has K=7.*\(3, 5, 8\)"):
        ck(A((12, 7)), A((3, 5, 8)), A((3,), "int32"), None, 2, **kw)
    with pytest.raises(ValueError, match=r"W must be 3-D"):
        ck(A((12, 8)), A((5, 8)), A((3,), "int32"), None, 2, **kw)
    with pytest.raises(ValueError, match=r"dtype float16 but"):
        ck(A((12, 8)), A((3, 5, 8), "float16"), A((3,), "int32"), None, 2, **kw)
    with pytest.raises(ValueError, match="m_sizes has 4 entries"):
        ck(A((12, 8)), A((3, 5, 8)), A((4,), "int32"), None, 2, **kw)
    with pytest.raises(ValueError, match="one device"):
        ck(A((12, 8)), A((3, 5, 8), device="cuda:0"), A((3,), "int32"), None, 2, **kw)
    with pytest.raises(ValueError, match="gather_indices is required with permute_x"):
        ck(A((6, 8)), A((3, 5, 8)), A((3,), "int32"), None, 2, **dict(kw, permute_x=True))
    with pytest.raises(ValueError, match="topk_weights is required"):
        ck(A((12, 8)), A((3, 5, 8)), A((3,), "int32"), A((12,), "int32"), 2,
           **dict(kw, fuse_mul_post=True))
    dims = ck(A((6, 8)), A((3, 5, 8)), A((3,), "int32"), A((12,), "int32"), 2,
              **dict(kw, permute_x=True))
    assert (dims.tokens, dims.m, dims.routed_rows) == (6, 12, 12)


def test_check_values():
    dims = gg_spec.Dims(3, 5, 8, 12, 6, 12)
    gg_spec.checks.check_values(dims, 12, 0, 0, 11)
    with pytest.raises(ValueError, match=r"sum\(m_sizes\)=11"):
        gg_spec.checks.check_values(dims, 11, 0, 0, 11)
    with pytest.raises(ValueError, match="non-negative"):
        gg_spec.checks.check_values(dims, 12, -1, 0, 11)
    with pytest.raises(ValueError, match=r"\[0, 12\)"):
        gg_spec.checks.check_values(dims, 12, 0, 0, 12)


def test_tolerances_and_errors():
    assert gg_spec.tolerance("torch.bfloat16") == 2e-2
    assert gg_spec.rel_error([1.0, np.nan], [1.0, 1.0]) == float("inf")
    assert gg_spec.rel_error(np.zeros(3), np.zeros(3)) == 0.0
    assert gg_spec.rel_error([1.0, 1.0], [1.0, 0.0]) == pytest.approx(1.0)


def test_gg_spec_imports_with_numpy_alone():
    code = ("import sys\n"
            "for m in ('torch', 'triton', 'jax', 'jaxlib'): sys.modules[m] = None\n"
            "import gg_spec, gg_spec.cases, gg_spec.reference\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_tuning_cache_round_trip(tmp_path, monkeypatch):
    from gg_spec import tuning_cache
    monkeypatch.setenv("GG_CACHE_DIR", str(tmp_path))
    key = gg_spec.tuning_key("dW", num_experts=4, n=8, k=8, rows=40, dtype="float32")
    assert tuning_cache.load("triton", key) is None
    cfg = gg_spec.DWConfig(block_n=32)
    tuning_cache.store("triton", key, cfg, ms=1.5)
    assert tuning_cache.load("triton", key) == cfg
    assert tuning_cache.load("pallas", key) is None
    (tmp_path / "tuned_pallas.json").write_text("not json")
    assert tuning_cache.load("pallas", key) is None


def test_tuning_cache_borrow_bucket(tmp_path, monkeypatch):
    """A shape's entries tuned at one row bucket are copied to another (time not copied),
    other shapes and existing entries are left alone."""
    from gg_spec import tuning_cache
    monkeypatch.setenv("GG_CACHE_DIR", str(tmp_path))

    def key(op, rows, n=8, **flags):
        return gg_spec.tuning_key(op, num_experts=4, n=n, k=8, rows=rows, dtype="bfloat16",
                                  device="NVIDIA_H200", **flags)
    fwd, fwd_px = gg_spec.ForwardConfig(block_n=64), gg_spec.ForwardConfig(block_m=64)
    tuning_cache.store("triton", key("forward", 8192), fwd, ms=1.0)
    tuning_cache.store("triton", key("forward", 8192, permute_x=True), fwd_px, ms=1.0)
    tuning_cache.store("triton", key("forward", 8192, n=16), fwd_px, ms=1.0)  # other shape
    tuning_cache.store("triton", key("dW", 8192), gg_spec.DWConfig(block_n=64), ms=1.0)
    tuning_cache.store("triton", key("dW", 500), gg_spec.DWConfig(block_n=32), ms=2.0)
    written = tuning_cache.borrow_bucket("triton", num_experts=4, n=8, k=8, from_rows=8192,
                                         to_rows=500)
    assert written == sorted([key("forward", 500), key("forward", 500, permute_x=True)])
    assert tuning_cache.load("triton", key("forward", 512)) == fwd
    assert tuning_cache.load("triton", key("forward", 512, permute_x=True)) == fwd_px
    assert tuning_cache.load("triton", key("forward", 512, n=16)) is None
    assert tuning_cache.load("triton", key("dW", 512)) == gg_spec.DWConfig(block_n=32)
    entries = tuning_cache._read(tuning_cache.cache_path("triton"))
    assert entries[key("forward", 512)]["ms"] is None
    assert entries[key("forward", 512)]["borrowed_from"] == 8192
    assert entries[key("dW", 512)] == {"config": gg_spec.config_to_dict(
        gg_spec.DWConfig(block_n=32)), "ms": 2.0}  # the tuned entry there is kept
    assert tuning_cache.borrow_bucket("triton", num_experts=4, n=8, k=8, from_rows=8192,
                                      to_rows=8000) == []  # the same bucket


def test_rounds_rotate_the_order_and_drop_failures():
    """gg_spec.rounds.time_in_rounds (both tuners' algorithm): round r starts r places down
    the list, so over as many rounds as callables every one runs first once; a callable
    that fails in warm-up or in a later round is reported as its exception and the others
    finish with the median of their bursts."""
    from gg_spec import rounds
    order, calls = [], {"late": 0}

    def late():
        calls["late"] += 1
        if calls["late"] > 2:  # after warm-up and the first round
            raise RuntimeError("out of memory")

    def early():
        raise RuntimeError("too much shared memory")
    fns = {"a": lambda: 3.0, "b": lambda: 1.0, "late": late, "early": early}
    # round 0: a b late; round 1: b late(fails) a; round 2 (a, b left): a b
    bursts = iter([5.0, 1.0, 0.0, 3.0, 2.0, 4.0, 9.0])

    def burst(fn):
        key = next(k for k, f in fns.items() if f is fn)
        order.append(key)
        fn()
        return next(bursts)
    times = rounds.time_in_rounds(fns, burst=burst, warm=lambda fn: fn(), warmup=1,
                                  rounds=3)
    assert order == ["a", "b", "late", "b", "late", "a", "a", "b"]
    assert times["a"] == 4.0 and times["b"] == 3.0  # medians of (5, 2, 4) and (1, 3, 9)
    assert isinstance(times["late"], RuntimeError) and isinstance(times["early"],
                                                                   RuntimeError)
    assert rounds.rotated(list("abc"), 4) == list("bca") and rounds.rotated([], 1) == []


@pytest.mark.parametrize("op", ["forward", "dX", "dW"])
def test_candidates_are_distinct(op):
    """No config is timed twice: a store-only dW entry turned all-TMA equals the plain
    entry's all-TMA variant, and appears once."""
    for flags in (dict(), dict(permute_x=True), dict(permute_y=True)):
        found = gg_spec.valid_candidates(op, with_tma=True, **flags)
        assert len(found) == len(set(found)), (op, flags)
    assert any(c.tma_store_dw and not c.tma_load_x for c in
               gg_spec.valid_candidates("dW", with_tma=True)), "the store-only dW entries"
