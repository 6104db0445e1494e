"""triton_gg against the float64 reference: the seed's matrix on CPU (Triton interpreter),
edge cases, validation, torch.compile, gradcheck; real model shapes under `-m gpu`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gg_spec
from gg_spec.cases import Case, cpu_cases, edge_cases, gpu_cases, make_inputs

triton_gg = pytest.importorskip("triton_gg")
from parity import reference as tref  # noqa: E402  (float64 torch; tested against gg_spec in test_parity)

SMALL_FWD = gg_spec.ForwardConfig(block_m=16, block_n=16, block_k=16, num_warps=4,
                                  num_stages=2)
SMALL_DX = gg_spec.DXConfig(block_m=16, block_n=16, block_k=32, num_warps=4, num_stages=2)
SMALL_DW = gg_spec.DWConfig(block_m=16, block_n=32, block_k=16, num_warps=4, num_stages=2)
POISON = float("nan")


class Inputs:
    """One case's inputs as torch tensors on `device`.

    On CPU they are gg_spec's numpy inputs; on a GPU (real model shapes, where host RNG and
    float64 numpy would take minutes) they are drawn on the device with a seeded generator.
    Either way: fresh random values, never zeros, already in the case's dtype."""

    def __init__(self, case: Case, device="cpu"):
        self.case = case
        dt = getattr(torch, case.dtype)
        if device == "cpu":
            d = make_inputs(case)
        else:
            rng = np.random.default_rng(case.seed)
            s = case.shape
            r = gg_spec.make_routing(case.routing, case.tokens, s.num_experts, s.topk, rng)
            gen = torch.Generator(device=device).manual_seed(case.seed)
            m = case.tokens * s.topk
            x_rows = case.tokens if case.fusion.permute_x else m

            def randn(*shape, scale=1.0):
                return torch.randn(shape, generator=gen, device=device, dtype=dt) * scale
            d = dict(x=randn(x_rows, s.k), w=randn(s.num_experts, s.n, s.k, scale=s.k ** -0.5),
                     dy=randn(m, s.n), topk_weights=r.topk_weights, m_sizes=r.m_sizes,
                     gather_indices=r.gather_indices)

        def t(a, dtype=dt):
            if isinstance(a, torch.Tensor):
                return a.to(dtype)
            return torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dtype)
        self.x, self.w, self.dy = t(d["x"]), t(d["w"]), t(d["dy"])
        self.topk_weights = t(d["topk_weights"])
        self.m_sizes = t(d["m_sizes"], torch.int32)
        self.gather = t(d["gather_indices"], torch.int32)
        f = case.fusion
        self.flags = dict(permute_x=f.permute_x, permute_y=f.permute_y)
        self.fwd_flags = dict(self.flags, topk_weights=self.topk_weights,
                              fuse_mul_post=f.fuse_mul_post)
        self.routing = (self.m_sizes, self.gather, case.topk)


def assert_close(out: torch.Tensor, expected: torch.Tensor, dtype: str, what: str):
    """rel error ||out - ref|| / ||ref|| within gg_spec's tolerance; NaN (unwritten) fails."""
    assert tuple(out.shape) == tuple(expected.shape), (what, tuple(out.shape), expected.shape)
    got = out.detach().double()
    assert bool(torch.isfinite(got).all()), f"{what}: non-finite values (unwritten rows?)"
    norm = torch.linalg.vector_norm(expected)
    diff = torch.linalg.vector_norm(got - expected)
    err = float(diff / norm) if norm > 0 else float(diff)
    assert err <= gg_spec.tolerance(dtype), f"{what}: rel error {err:.3e} ({dtype})"


def poison_new_outputs(monkeypatch):
    """Every floating-point tensor from torch.empty starts as NaN (POISON): a kernel that
    leaves any element of its output unwritten fails the finiteness check of assert_close."""
    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        if out.is_floating_point():
            out.fill_(POISON)
        return out
    monkeypatch.setattr(torch, "empty", poisoned_empty)


def spy_descriptors(monkeypatch, module) -> list:
    """Record the block shape of every TMA descriptor `module` builds (with ``descriptor``),
    so a test can tell the TMA path ran rather than a silent fallback."""
    real = module.descriptor
    built = []

    def spy(t, block):
        built.append(tuple(block))
        return real(t, block)
    monkeypatch.setattr(module, "descriptor", spy)
    return built


def run_direct(inp: Inputs, op: str, mode: str):
    """Direct kernel call of `op`; mode "manual" (small configs), "default" or "autotune"."""
    manual, tune = mode == "manual", mode == "autotune"
    if op == "forward":
        return triton_gg.grouped_gemm_forward(inp.x, inp.w, *inp.routing, **inp.fwd_flags,
                                              config=SMALL_FWD if manual else None,
                                              autotune=tune)
    if op == "dX":
        return triton_gg.grouped_gemm_dX(inp.dy, inp.w, *inp.routing, **inp.flags,
                                         config=SMALL_DX if manual else None, autotune=tune)
    return triton_gg.grouped_gemm_dW(inp.x, inp.dy, *inp.routing, **inp.flags,
                                     config=SMALL_DW if manual else None, autotune=tune)


def expected_direct(inp: Inputs, op: str):
    """float64 reference on the inputs' device (parity.reference: gg_spec's math in torch,
    checked against gg_spec's numpy reference in tests/test_parity.py)."""
    if op == "forward":
        return tref.forward(inp.x, inp.w, *inp.routing, **inp.fwd_flags)
    if op == "dX":
        return tref.dX(inp.dy, inp.w, *inp.routing, **inp.flags)
    return tref.dW(inp.x, inp.dy, *inp.routing, **inp.flags)


def check_autograd(inp: Inputs, mode: str):
    """grouped_gemm's output and every gradient against the reference."""
    case = inp.case
    check = assert_rows_close if inp.x.is_cuda else assert_close  # per-row on real shapes
    x = inp.x.clone().requires_grad_(True)
    w = inp.w.clone().requires_grad_(True)
    tw = inp.topk_weights.clone().requires_grad_(case.fusion.fuse_mul_post)
    configs = {"manual": dict(forward_config=SMALL_FWD, dx_config=SMALL_DX,
                              dw_config=SMALL_DW),
               "default": {}, "autotune": dict(autotune=True)}[mode]
    y = triton_gg.grouped_gemm(x, w, *inp.routing, **dict(inp.fwd_flags, topk_weights=tw),
                               **configs)
    check(y, expected_direct(inp, "forward"), case.dtype, "Y")
    y.backward(inp.dy)
    dx, dw, dtw = tref.grouped_gemm_grads(inp.x, inp.w, *inp.routing, inp.dy, **inp.fwd_flags)
    check(x.grad, dx, case.dtype, "grad X")
    check(w.grad, dw, case.dtype, "grad W")
    if case.fusion.fuse_mul_post:
        assert_close(tw.grad, dtw, case.dtype, "grad topk_weights")


# -------------------------------------------------------------------- the seed's matrix, CPU

MATRIX = cpu_cases()


@pytest.mark.parametrize("mode", ["manual", "autotune"])
@pytest.mark.parametrize("op", ["forward", "dX", "dW"])
@pytest.mark.parametrize("case", MATRIX, ids=lambda c: c.id)
def test_direct(case, op, mode, monkeypatch):
    inp = Inputs(case)
    poison_new_outputs(monkeypatch)
    assert_close(run_direct(inp, op, mode), expected_direct(inp, op), case.dtype, op)


@pytest.mark.parametrize("mode", ["manual", "autotune"])
@pytest.mark.parametrize("case", MATRIX, ids=lambda c: c.id)
def test_autograd(case, mode, monkeypatch):
    inp = Inputs(case)
    poison_new_outputs(monkeypatch)
    check_autograd(inp, mode)


@pytest.mark.parametrize("case", edge_cases(), ids=lambda c: c.id)
def test_edge_cases(case, monkeypatch):
    inp = Inputs(case)
    poison_new_outputs(monkeypatch)
    for op in ("forward", "dX", "dW"):
        out = run_direct(inp, op, "manual")
        assert_close(out, expected_direct(inp, op), case.dtype, op)
        if op == "dW":
            assert torch.all(out[inp.m_sizes == 0] == 0), "dW of an empty expert"
    check_autograd(inp, "manual")


TMA_CASES = [c for c in cpu_cases(("float32", "bfloat16")) if c.topk != 4][::2] + edge_cases()[::3]


@pytest.mark.parametrize("case", TMA_CASES, ids=lambda c: c.id)
def test_tma_configs(case, monkeypatch):
    """Every legal TMA load switch on (tiles that straddle experts or run past N must not
    change the result); shapes TMA cannot serve fall back to pointer loads."""
    inp = Inputs(case)
    poison_new_outputs(monkeypatch)
    f = case.fusion
    fwd = gg_spec.configs.with_legal_tma("forward", SMALL_FWD, **inp.flags)
    dx = gg_spec.configs.with_legal_tma("dX", SMALL_DX, **inp.flags)
    assert fwd.tma_load_w
    assert fwd.tma_load_x == (not f.permute_x) and fwd.tma_store_y == (not f.permute_y)
    y = triton_gg.grouped_gemm_forward(inp.x, inp.w, *inp.routing, **inp.fwd_flags, config=fwd)
    assert_close(y, expected_direct(inp, "forward"), case.dtype, "Y")
    d = triton_gg.grouped_gemm_dX(inp.dy, inp.w, *inp.routing, **inp.flags, config=dx)
    assert_close(d, expected_direct(inp, "dX"), case.dtype, "dX")
    dw_cfg = gg_spec.configs.with_legal_tma("dW", SMALL_DW, **inp.flags)
    d = triton_gg.grouped_gemm_dW(inp.x, inp.dy, *inp.routing, **inp.flags, config=dw_cfg)
    assert_close(d, expected_direct(inp, "dW"), case.dtype, "dW")


def test_tma_loads_with_experts_longer_than_a_tile(monkeypatch):
    """TMA-loaded X (forward) and dY (dX) where experts span several M-tiles: each tile
    reads its own rows (the tile's offset inside its expert), the last one a partial tile;
    outputs poisoned, against the float64 reference. (The matrix's TMA cases have experts
    of at most one tile.)"""
    from triton_gg.kernels import tma
    gen = torch.Generator().manual_seed(13)
    m_sizes = torch.tensor([37, 0, 16, 23], dtype=torch.int32)  # 3 + 0 + 1 + 2 tiles of 16
    m, e, n, k = int(m_sizes.sum()), 4, 24, 32
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(e, n, k, generator=gen)
    dy = torch.randn(m, n, generator=gen)
    order = torch.arange(m, dtype=torch.int32)
    poison_new_outputs(monkeypatch)
    described = []  # the tensors that got a TMA descriptor
    real = tma.descriptor
    monkeypatch.setattr(tma, "descriptor", lambda t, block: described.append(t.data_ptr())
                        or real(t, block))
    fwd = SMALL_FWD.replace(tma_load_w=True, tma_load_x=True)
    y = triton_gg.grouped_gemm_forward(x, w, m_sizes, order, 1, config=fwd)
    assert_close(y, tref.forward(x, w, m_sizes, order, 1), "float32", "Y")
    dx = triton_gg.grouped_gemm_dX(dy, w, m_sizes, order, 1,
                                   config=SMALL_DX.replace(tma_load_w=True, tma_load_dy=True))
    assert_close(dx, tref.dX(dy, w, m_sizes, order, 1), "float32", "dX")
    assert x.data_ptr() in described and dy.data_ptr() in described, \
        "X or dY was not loaded through a TMA descriptor"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dw_tma_store(dtype, monkeypatch):
    """dW stored through TMA (a [1, BLOCK_N, BLOCK_K] tile of dW viewed [E, N, K], clipped
    by the engine at N and K): N and K not multiples of the tile, empty experts, an output
    poisoned with NaN, and rows past sum(m_sizes) (an expert-parallel rank's dropped slots)
    left out of every sum."""
    dt = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(3)
    sizes = [32, 17, 0, 48, 16, 5]
    m_used, dropped, n, k = sum(sizes), 7, 40, 24   # SMALL_DW tiles: 32 x 16
    x = torch.randn(m_used + dropped, k, generator=gen).to(dt)
    dy = torch.randn(m_used + dropped, n, generator=gen).to(dt)
    m_sizes = torch.tensor(sizes, dtype=torch.int32)
    config = SMALL_DW.replace(tma_load_x=True, tma_load_dy=True, tma_store_dw=True)
    from triton_gg.kernels import dw as dw_kernel
    built = spy_descriptors(monkeypatch, dw_kernel)
    dw = torch.full((len(sizes), n, k), POISON, dtype=dt)
    dw_kernel.launch_dw(x, dy, m_sizes, None, dw, topk=1, permute_x=False, permute_y=False,
                        config=config)
    assert (1, 32, 16) in built, "the store did not go through a TMA descriptor"
    order = torch.arange(m_used, dtype=torch.int32)  # no permutation
    assert_close(dw, tref.dW(x[:m_used], dy[:m_used], m_sizes, order, 1), dtype, "dW")
    assert torch.all(dw[2] == 0), "dW of an empty expert"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("sizes", [[0, 21, 0], [9, 40, 0, 0], [0, 0, 0]],
                         ids=["empty_first_and_last", "empty_tail", "no_rows"])
def test_dw_tma_loads_with_empty_experts_at_the_ends(sizes, device):
    """dW with TMA loads where experts without rows sit at the ends: before the first rows,
    after the last rows with nothing beyond them (the descriptor over such an expert starts
    at the end of dY and X and must never be read), and no rows at all. Each empty expert's
    tile is exact zeros; outputs poisoned. On the GPU in bf16 with a Hopper tile (the
    hardware engine, not the interpreter's model of it)."""
    from triton_gg.kernels.dw import launch_dw
    gen = torch.Generator().manual_seed(5)
    on_gpu = device == "cuda"
    dt = torch.bfloat16 if on_gpu else torch.float32
    m, n, k = sum(sizes) * (8 if on_gpu else 1), 136, 72
    sizes = [s * (8 if on_gpu else 1) for s in sizes]
    x = torch.randn(m, k, generator=gen).to(device, dt)
    dy = torch.randn(m, n, generator=gen).to(device, dt)
    m_sizes = torch.tensor(sizes, dtype=torch.int32, device=device)
    tile = gg_spec.DWConfig(64, 64, 64, 4, 3) if on_gpu else SMALL_DW
    config = tile.replace(tma_load_x=True, tma_load_dy=True, tma_store_dw=True)
    order = torch.arange(m, dtype=torch.int32, device=device)
    expected = tref.dW(x, dy, m_sizes, order, 1)
    for programs in (1, 4, None):
        dw = torch.full((len(sizes), n, k), POISON, dtype=dt, device=device)
        launch_dw(x, dy, m_sizes, None, dw, topk=1, permute_x=False, permute_y=False,
                  config=config, programs=programs)
        assert_close(dw, expected, "bfloat16" if on_gpu else "float32", "dW")
        for e, size in enumerate(sizes):
            if size == 0:
                assert torch.all(dw[e] == 0), f"dW of empty expert {e}"


# -------------------------------------------------------------------- unwritten rows fail

def test_poisoned_output_is_fully_overwritten(monkeypatch):
    """Outputs start as NaN: a kernel that skips any row or column leaves NaN behind."""
    case = Case(gg_spec.get_shape("tiny_odd_w2"), 13, "float32", "empty_experts",
                gg_spec.cases.Fusion(permute_y=True))
    inp = Inputs(case)
    poison_new_outputs(monkeypatch)
    for op in ("forward", "dX", "dW"):
        out = run_direct(inp, op, "manual")
        assert_close(out, expected_direct(inp, op), "float32", op)


def test_poison_detects_a_skipped_tile(monkeypatch):
    """The poison check can fail: a launcher that drops the last tile leaves NaN rows."""
    from triton_gg.kernels import forward as fwd
    case = Case(gg_spec.get_shape("tiny_w1"), 24, "float32", "random")
    inp = Inputs(case)
    real_launch = fwd.launch_forward

    def launch_missing_last_expert(x, w, m_sizes, *args, **kwargs):
        sizes = m_sizes.clone()
        sizes[-1] = 0  # the kernel never sees the last expert's rows
        return real_launch(x, w, sizes, *args, **kwargs)
    monkeypatch.setattr("triton_gg._ops.launch_forward", launch_missing_last_expert)
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(POISON)
                        if k.get("dtype", None) in (torch.float32,) else real_empty(*a, **k))
    y = run_direct(inp, "forward", "manual")
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close(y, expected_direct(inp, "forward"), "float32", "Y")


@pytest.mark.parametrize("programs", [1, 2, 7, 64])
@pytest.mark.parametrize("fusion", ["plain", "permute_x", "permute_y+mul"])
def test_persistent_forward_any_program_count(programs, fusion):
    """The persistent forward's result does not depend on how many programs share the tiles
    (each program strides over the tile list; more programs than tiles leave some idle),
    and every routed row is written (outputs poisoned with NaN first)."""
    from triton_gg.kernels.forward import launch_forward
    case = next(c for c in cpu_cases() if c.fusion.name == fusion and c.dtype == "float32")
    inp = Inputs(case)
    f = case.fusion
    m, n = inp.gather.shape[0], inp.w.shape[1]
    y = torch.full((m, n), POISON)
    launch_forward(inp.x, inp.w, inp.m_sizes, inp.gather, inp.topk_weights, y, y,
                   topk=case.topk, permute_x=f.permute_x, permute_y=f.permute_y,
                   fuse_mul_post=f.fuse_mul_post, store_unweighted=False, config=SMALL_FWD,
                   programs=programs)
    assert_close(y, expected_direct(inp, "forward"), case.dtype, f"Y, {programs} programs")


@pytest.mark.parametrize("programs", [1, 5, 1000])
@pytest.mark.parametrize("fusion", ["plain", "permute_x", "permute_y"])
def test_persistent_dw_any_program_count(programs, fusion):
    """The persistent dW, as the forward: any program count, every expert's tile written
    (an expert without rows stores exact zeros)."""
    from triton_gg.kernels.dw import launch_dw
    case = next(c for c in cpu_cases() if c.fusion.name == fusion and c.dtype == "float32")
    inp = Inputs(case)
    dw = torch.full(tuple(inp.w.shape), POISON)
    launch_dw(inp.x, inp.dy, inp.m_sizes, inp.gather, dw, topk=case.topk, **inp.flags,
              config=SMALL_DW, programs=programs)
    assert_close(dw, expected_direct(inp, "dW"), case.dtype, f"dW, {programs} programs")


@pytest.mark.parametrize("programs", [1, 3, 50])
def test_persistent_kernels_with_many_tiles_per_expert(programs):
    """Skewed routing: an expert spans several M-tiles (tile offsets inside an expert),
    one expert is empty and the last has a partial tile; forward and dW against the
    float64 reference, outputs poisoned."""
    from triton_gg.kernels.dw import launch_dw
    from triton_gg.kernels.forward import launch_forward
    gen = torch.Generator().manual_seed(11)
    tokens, topk, e, n, k = 30, 2, 4, 24, 40
    m_sizes = torch.tensor([37, 0, 16, 7], dtype=torch.int32)  # 3 + 0 + 1 + 1 M-tiles of 16
    gather = torch.randperm(tokens * topk, generator=gen).to(torch.int32)
    x = torch.randn(tokens, k, generator=gen)
    w = torch.randn(e, n, k, generator=gen)
    dy = torch.randn(tokens * topk, n, generator=gen)
    routing = (m_sizes, gather, topk)
    y = torch.full((tokens * topk, n), POISON)
    launch_forward(x, w, m_sizes, gather, None, y, y, topk=topk, permute_x=True,
                   permute_y=False, fuse_mul_post=False, store_unweighted=False,
                   config=SMALL_FWD, programs=programs)
    assert_close(y, tref.forward(x, w, *routing, permute_x=True), "float32", "Y")
    dw = torch.full((e, n, k), POISON)
    launch_dw(x, dy, m_sizes, gather, dw, topk=topk, permute_x=True, permute_y=False,
              config=SMALL_DW, programs=programs)
    assert_close(dw, tref.dW(x, dy, *routing, permute_x=True), "float32", "dW")
    assert torch.all(dw[1] == 0)


# -------------------------------------------------------------------- validation

def _plain_inputs():
    inp = Inputs(Case(gg_spec.get_shape("tiny_w1"), 8, "float32", "random"))
    return inp


@pytest.mark.parametrize("mutate,match", [
    (lambda i: dict(X=i.x[:, :-1]), r"X has K=63"),
    (lambda i: dict(X=i.x[None]), r"X must be 2-D"),
    (lambda i: dict(W=i.w[0]), r"W must be 3-D"),
    (lambda i: dict(W=i.w.double()), r"dtype"),
    (lambda i: dict(m_sizes=i.m_sizes[:-1]), r"m_sizes has 3 entries"),
    (lambda i: dict(m_sizes=i.m_sizes + 1), r"sum\(m_sizes\)=20"),
    (lambda i: dict(gather_indices=i.gather + 100, permute_y=True), r"gather_indices must lie"),
    (lambda i: dict(gather_indices=i.gather[:-1], permute_y=True), r"gather_indices has 15"),
    (lambda i: dict(permute_x=True, permute_y=True), r"cannot both"),
    (lambda i: dict(fuse_mul_post=True, topk_weights=None), r"topk_weights is required"),
    (lambda i: dict(config=gg_spec.ForwardConfig(tma_store_y=True), permute_y=True),
     r"tma_store_y"),
    (lambda i: dict(config=gg_spec.DXConfig()), r"ForwardConfig"),
    (lambda i: dict(topk=0), r"topk must be a positive int"),
])
def test_forward_validation(mutate, match, value_checks_on):
    inp = _plain_inputs()
    args = dict(X=inp.x, W=inp.w, m_sizes=inp.m_sizes, gather_indices=inp.gather,
                topk=inp.case.topk)
    args.update(mutate(inp))
    with pytest.raises(ValueError, match=match):
        triton_gg.grouped_gemm_forward(**args)
    with pytest.raises(ValueError, match=match):
        triton_gg.grouped_gemm(**{k: v for k, v in args.items() if k != "config"},
                               **({"forward_config": args["config"]} if "config" in args
                                  else {}))


def test_dx_dw_validation():
    inp = _plain_inputs()
    with pytest.raises(ValueError, match=r"dY has N=95"):
        triton_gg.grouped_gemm_dX(inp.dy[:, :-1], inp.w, *inp.routing)
    with pytest.raises(ValueError, match=r"X has 15 rows"):
        triton_gg.grouped_gemm_dW(inp.x[:-1], inp.dy, *inp.routing)
    with pytest.raises(ValueError, match=r"tma_load_dy"):
        triton_gg.grouped_gemm_dX(inp.dy, inp.w, *inp.routing, permute_y=True,
                                  config=gg_spec.DXConfig(tma_load_dy=True))
    with pytest.raises(ValueError, match=r"gather_indices is required"):
        triton_gg.grouped_gemm_dW(inp.x, inp.dy, inp.m_sizes, None, 2, permute_y=True)


@pytest.fixture
def value_checks_on():
    """The opt-in value checks (off by default: each is a host sync)."""
    with gg_spec.value_checks(True):
        yield


def test_routing_errors_found_before_any_launch(value_checks_on):
    """With the value checks on, routing that the kernels would follow silently (wrong
    rows, unwritten rows) is refused with a ValueError first."""
    inp = _plain_inputs()
    m, k = inp.x.shape
    topk = inp.case.topk
    x_tokens = torch.randn(m // topk, k)
    # permute_x with a topk that disagrees with len(gather_indices) = T * topk
    with pytest.raises(ValueError, match=r"T\*topk=32 routed rows, but gather_indices has M=16"):
        triton_gg.grouped_gemm_forward(x_tokens, inp.w, inp.m_sizes, inp.gather, 4,
                                       permute_x=True)
    with pytest.raises(ValueError, match=r"T\*topk=32"):
        triton_gg.grouped_gemm_dW(x_tokens, inp.dy, inp.m_sizes, inp.gather, 4, permute_x=True)
    with pytest.raises(ValueError, match=r"T\*topk=32"):
        triton_gg.grouped_gemm(x_tokens, inp.w, inp.m_sizes, inp.gather, 4, permute_x=True)
    # an int64 index past 2**32 (it must not wrap into range when read back)
    far = inp.gather.long().clone()
    far[0] += 2 ** 32
    with pytest.raises(ValueError, match=r"gather_indices must lie in \[0, 16\)"):
        triton_gg.grouped_gemm_forward(x_tokens, inp.w, inp.m_sizes, far, topk, permute_x=True)
    # a repeated index: the scatter would leave a row unwritten
    twice = inp.gather.clone()
    twice[1] = twice[0]
    with pytest.raises(ValueError, match=r"permutation of \[0, 16\).*only 15 of its 16 entries are distinct"):
        triton_gg.grouped_gemm_forward(inp.x, inp.w, inp.m_sizes, twice, topk, permute_y=True)
    with pytest.raises(ValueError, match=r"permutation"):
        triton_gg.grouped_gemm_dX(inp.dy, inp.w, inp.m_sizes, twice, topk, permute_x=True)
    # without a fusion the gather indices are not read, so not checked
    unused = torch.zeros_like(inp.gather)
    triton_gg.grouped_gemm_forward(inp.x, inp.w, inp.m_sizes, unused, topk)
    triton_gg.grouped_gemm_dW(inp.x, inp.dy, inp.m_sizes, unused, topk)
    # no experts but routed rows
    no_w, no_sizes = inp.w[:0], inp.m_sizes[:0]
    with pytest.raises(ValueError, match=r"sum\(m_sizes\)=0 must equal the M=16"):
        triton_gg.grouped_gemm_forward(inp.x, no_w, no_sizes, None, topk)
    with pytest.raises(ValueError, match=r"sum\(m_sizes\)=0"):
        triton_gg.grouped_gemm_dX(inp.dy, no_w, no_sizes, inp.gather, topk)
    with pytest.raises(ValueError, match=r"sum\(m_sizes\)=0"):
        triton_gg.grouped_gemm_dW(inp.x, inp.dy, no_sizes, None, topk)
    with pytest.raises(ValueError, match=r"sum\(m_sizes\)=0"):
        triton_gg.grouped_mm(inp.x, no_w.transpose(1, 2), torch.zeros(0, dtype=torch.int32))


def test_argument_type_errors_name_the_argument():
    inp = _plain_inputs()
    with pytest.raises(TypeError, match=r"X must be a torch.Tensor, got ndarray"):
        triton_gg.grouped_gemm_forward(inp.x.numpy(), inp.w, *inp.routing)
    with pytest.raises(TypeError, match=r"gather_indices must be a torch.Tensor"):
        triton_gg.grouped_gemm_dX(inp.dy, inp.w, inp.m_sizes, inp.gather.tolist(), 2,
                                  permute_y=True)
    offs = torch.cumsum(inp.m_sizes, 0).to(torch.int32)
    with pytest.raises(TypeError, match=r"grouped_mm: a must be a torch.Tensor"):
        triton_gg.grouped_mm(inp.x.numpy(), inp.w.transpose(1, 2), offs)
    with pytest.raises(ValueError, match=r"grouped_mm: offs must be int32 or int64"):
        triton_gg.grouped_mm(inp.x, inp.w.transpose(1, 2), offs.float())
    with pytest.raises(ValueError, match=r"grouped_mm: a has dtype torch.float16 but b"):
        triton_gg.grouped_mm(inp.x.half(), inp.w.transpose(1, 2), offs)


def test_value_checks_are_opt_in():
    """Off by default (no device read per call); shape checks always run."""
    assert not gg_spec.value_checks_enabled()
    inp = _plain_inputs()
    bad_sizes = inp.m_sizes.clone()
    bad_sizes[0] -= 1  # sum(m_sizes) one short of M: wrong numbers, no error, no sync
    with pytest.raises(ValueError, match="X has K"):
        triton_gg.grouped_gemm_forward(inp.x[:, :-1], inp.w, *inp.routing)
    triton_gg.grouped_gemm_forward(inp.x, inp.w, bad_sizes, inp.gather, 2)
    with triton_gg.value_checks():
        assert gg_spec.value_checks_enabled()
        with pytest.raises(ValueError, match=r"sum\(m_sizes\)"):
            triton_gg.grouped_gemm_forward(inp.x, inp.w, bad_sizes, inp.gather, 2)
    assert not gg_spec.value_checks_enabled()


# -------------------------------------------------------------------- routing, grouped_mm

@pytest.mark.parametrize("kind", gg_spec.ROUTING_KINDS)
def test_route_matches_spec(kind, rng):
    ids = gg_spec.make_topk_ids(kind, 33, 8, 2, rng)
    m_sizes, gather = triton_gg.route(torch.from_numpy(ids), 8)
    m_ref, g_ref = gg_spec.route(ids, 8)
    assert m_sizes.dtype == gather.dtype == torch.int32
    np.testing.assert_array_equal(m_sizes.numpy(), m_ref)
    np.testing.assert_array_equal(gather.numpy(), g_ref)


def test_grouped_mm_matches_torch_reference(rng):
    e, k, n = 4, 24, 40
    sizes = np.array([5, 0, 9, 3])
    a = torch.from_numpy(rng.standard_normal((sizes.sum(), k)).astype(np.float32))
    weights = torch.from_numpy(rng.standard_normal((e, n, k)).astype(np.float32))
    b = weights.transpose(1, 2).requires_grad_(True)  # [E, K, N] strided view: not copied
    a.requires_grad_(True)
    offs = torch.from_numpy(np.cumsum(sizes).astype(np.int32))
    out = triton_gg.grouped_mm(a, b, offs)
    pieces = torch.split(a, sizes.tolist())
    expected = torch.cat([p @ b[i] for i, p in enumerate(pieces)])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    da, db = torch.autograd.grad(out, (a, b), g)
    ea, eb = torch.autograd.grad(expected, (a, b), g)
    torch.testing.assert_close(da, ea, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(db, eb, rtol=1e-5, atol=1e-5)
    assert torch.all(db[1] == 0)
    with triton_gg.value_checks(), pytest.raises(ValueError, match=r"sum\(m_sizes\)"):
        triton_gg.grouped_mm(a, b, offs - 1)
    triton_gg.grouped_mm(a, b, offs - 1)  # checks off (the default): wrong rows, no error


# -------------------------------------------------------------------- gradcheck, compile

@pytest.mark.filterwarnings("ignore:Input #:UserWarning")
def test_gradcheck_fp32():
    """torch.autograd.gradcheck on a tiny fp32 case (the kernels do not take fp64), with
    tolerances sized for fp32 rounding in the finite differences."""
    shape = gg_spec.GemmShape("gradcheck", num_experts=3, n=6, k=5, topk=2,
                              is_first_gemm=False)
    case = Case(shape, 3, "float32", "random",
                gg_spec.cases.Fusion(permute_y=True, fuse_mul_post=True))
    inp = Inputs(case)
    x = inp.x.clone().requires_grad_(True)
    w = inp.w.clone().requires_grad_(True)
    tw = inp.topk_weights.clone().requires_grad_(True)

    def fn(x, w, tw):
        return triton_gg.grouped_gemm(x, w, *inp.routing, permute_y=True, topk_weights=tw,
                                      fuse_mul_post=True, forward_config=SMALL_FWD,
                                      dx_config=SMALL_DX, dw_config=SMALL_DW)
    assert torch.autograd.gradcheck(fn, (x, w, tw), eps=1e-2, atol=1e-2, rtol=1e-2)


def test_torch_compile_fullgraph_forward_and_backward():
    case = Case(gg_spec.get_shape("tiny_w1"), 8, "float32", "random",
                gg_spec.cases.Fusion(permute_x=True))
    inp = Inputs(case)

    def step(x, w, m_sizes, gather):
        y = triton_gg.grouped_gemm(x, w, m_sizes, gather, 2, permute_x=True,
                                   forward_config=SMALL_FWD, dx_config=SMALL_DX,
                                   dw_config=SMALL_DW)
        return (y * inp.dy).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x = inp.x.clone().requires_grad_(True)
    w = inp.w.clone().requires_grad_(True)
    loss = compiled(x, w, inp.m_sizes, inp.gather)
    loss.backward()
    dx, dw, _ = tref.grouped_gemm_grads(inp.x, inp.w, *inp.routing, inp.dy, permute_x=True)
    assert_close(x.grad, dx, "float32", "compiled grad X")
    assert_close(w.grad, dw, "float32", "compiled grad W")


# -------------------------------------------------------------------- autotune cache

def test_autotune_picks_fastest_and_caches_on_disk(tmp_path, monkeypatch):
    from gg_spec import tuning_cache
    from triton_gg import autotune
    monkeypatch.setenv("GG_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(autotune, "_memory", {})
    candidates = gg_spec.valid_candidates("dW")
    target = candidates[3]
    timer = lambda fn: 1.0 if fn() == target else 2.0  # noqa: E731
    key = "dW|test-key"
    best = autotune.tune("dW", key, run_with=lambda cfg: cfg, timer=timer)
    assert best == target
    assert tuning_cache.load("triton", key) == target
    monkeypatch.setattr(autotune, "_memory", {})  # a "second process": read from disk
    assert autotune.cached(key) == target


# -------------------------------------------------------------------- GPU, real shapes

def assert_rows_close(out: torch.Tensor, expected: torch.Tensor, dtype: str, what: str):
    """assert_close, and every row within 4x the dtype's tolerance relative to its own norm
    (floored at a tenth of the rows' RMS norm): the whole-tensor error of a real shape hides
    a few wrong or unwritten rows (3 of 8192 rows of bf16 pass it)."""
    assert_close(out, expected, dtype, what)
    got = out.detach().double().reshape(-1, out.shape[-1])
    ref = expected.double().reshape(-1, expected.shape[-1])
    ref_norms = torch.linalg.vector_norm(ref, dim=1)
    floor = 0.1 * float(torch.sqrt(torch.mean(ref_norms ** 2))) + 1e-30
    row_err = torch.linalg.vector_norm(got - ref, dim=1) / ref_norms.clamp_min(floor)
    worst = int(torch.argmax(row_err))
    assert float(row_err[worst]) <= 4 * gg_spec.tolerance(dtype), (
        f"{what}: row {worst} has rel error {float(row_err[worst]):.3e} ({dtype})")


GPU_DTYPE_CASES = gpu_cases((128,), dtypes=("float32", "float16"))


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["forward", "dX", "dW"])
@pytest.mark.parametrize("case", gpu_cases() + GPU_DTYPE_CASES, ids=lambda c: c.id)
def test_gpu_direct(case, op, monkeypatch):
    """Default configs (shipped tuned ones where they exist) in every dtype the API
    accepts, outputs poisoned with NaN, every row checked."""
    inp = Inputs(case, device="cuda")
    poison_new_outputs(monkeypatch)
    out = run_direct(inp, op, "default")
    assert_rows_close(out, expected_direct(inp, op), case.dtype, op)


@pytest.mark.gpu
@pytest.mark.parametrize("case", gpu_cases() + GPU_DTYPE_CASES, ids=lambda c: c.id)
def test_gpu_autograd(case, monkeypatch):
    poison_new_outputs(monkeypatch)
    check_autograd(Inputs(case, device="cuda"), "default")


@pytest.mark.gpu
@pytest.mark.parametrize("case", [c for c in gpu_cases((1024,)) if c.fusion.name in
                                  ("permute_x", "permute_y+mul")][:2], ids=lambda c: c.id)
def test_gpu_autotune(case, tmp_path, monkeypatch):
    """Tuning on the GPU (times the search space), then the tuned configs are right."""
    monkeypatch.setenv("GG_CACHE_DIR", str(tmp_path))
    check_autograd(Inputs(case, device="cuda"), "autotune")


@pytest.mark.gpu
@pytest.mark.parametrize("case", [c for c in gpu_cases((1024,)) if c.fusion.name in
                                  ("plain", "permute_x")], ids=lambda c: c.id)
def test_gpu_dw_tma_store(case, monkeypatch):
    """dW stored through the TMA engine at real shapes, output poisoned with NaN: no tile
    left unwritten."""
    inp = Inputs(case, device="cuda")
    poison_new_outputs(monkeypatch)
    from triton_gg.kernels import dw as dw_kernel
    built = spy_descriptors(monkeypatch, dw_kernel)
    for config in (gg_spec.DWConfig(tma_store_dw=True),
                   gg_spec.configs.with_legal_tma("dW", gg_spec.DWConfig(), **inp.flags)):
        built.clear()
        d = triton_gg.grouped_gemm_dW(inp.x, inp.dy, *inp.routing, **inp.flags, config=config)
        assert_close(d, expected_direct(inp, "dW"), case.dtype, f"dW {config.key()}")
        assert (1, config.block_n, config.block_k) in built, "no TMA store descriptor"


@pytest.mark.gpu
def test_gpu_deterministic():
    case = gpu_cases()[0]
    inp = Inputs(case, device="cuda")
    a = run_direct(inp, "dW", "default")
    b = run_direct(inp, "dW", "default")
    assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_offsets_past_2_pow_31():
    """M*K > 2**31 elements: X, dX and the gathered row offsets need 64-bit arithmetic.
    Spot rows at the far end are compared with a float64 computation."""
    tokens, k, n, experts, topk = 2**20 + 64, 2048, 128, 4, 1  # M*K ~ 2**31 + 2**17
    gen = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, experts, (tokens, topk), generator=gen, device="cuda")
    m_sizes, gather = triton_gg.route(ids, experts)
    x = torch.randn((tokens, k), generator=gen, device="cuda", dtype=torch.bfloat16)
    w = torch.randn((experts, n, k), generator=gen, device="cuda", dtype=torch.bfloat16) / k**0.5
    y = triton_gg.grouped_gemm_forward(x, w, m_sizes, gather, topk, permute_x=True)
    dx = triton_gg.grouped_gemm_dX(y, w, m_sizes, gather, topk, permute_x=True)
    expert_of = torch.repeat_interleave(torch.arange(experts, device="cuda"), m_sizes.long())
    for p in (0, 1, tokens // 2, tokens - 2, tokens - 1):
        row = gather[p].long()
        y_ref = x[row // topk].double() @ w[expert_of[p]].double().T
        torch.testing.assert_close(y[p].double(), y_ref, rtol=2e-2, atol=2e-2)
        dx_ref = y[p].double() @ w[expert_of[p]].double()
        torch.testing.assert_close(dx[row].double(), dx_ref, rtol=2e-2, atol=2e-2)


def test_autotune_times_candidates_in_rounds(tmp_path, monkeypatch):
    """Without a timer the candidates go to one interleaved timing (every candidate in
    every round) and the fastest is kept; a candidate that fails to run is left out."""
    from triton_gg import autotune
    monkeypatch.setenv("GG_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(autotune, "_memory", {})
    candidates = gg_spec.valid_candidates("dX", with_tma=True)
    target, broken = candidates[2], candidates[0]
    seen = {}

    def fake_rounds(runs):
        seen.update(runs)
        return {c: (1.0 if c == target else 2.0) for c in runs if c != broken}
    monkeypatch.setattr(autotune, "time_in_rounds", fake_rounds)
    best = autotune.tune("dX", "dX|rounds-key", run_with=lambda cfg: cfg)
    assert best == target
    assert list(seen) == candidates and seen[target]() == target


def test_time_in_rounds_medians_and_drops_failures(monkeypatch):
    """time_in_rounds on a fake clock: each candidate's per-call cost comes back; one that
    fails in warm-up and one that fails in a later round are left out, and the others
    still finish (tuning runs inside a user's first call and must not end it)."""
    from triton_gg import timing
    clock = [0.0]

    class FakeEvent:
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self):
            self.t = clock[0]

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return end.t - self.t
    monkeypatch.setattr(timing.torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(timing.torch.cuda, "synchronize", lambda: None)

    def costs(ms):
        def fn():
            clock[0] += ms
        return fn
    calls = {"n": 0}

    def fails_later():
        calls["n"] += 1
        if calls["n"] > 3 + 10:  # after warm-up and the first round
            raise RuntimeError("out of memory")

    def fails_at_once():
        raise RuntimeError("too much shared memory")
    times = timing.time_in_rounds({"a": costs(2.0), "b": costs(0.5),
                                   "late": fails_later, "early": fails_at_once})
    assert {k: v for k, v in times.items() if not isinstance(v, Exception)} == {"a": 2.0,
                                                                              "b": 0.5}
    assert isinstance(times["late"], RuntimeError) and isinstance(times["early"],
                                                                   RuntimeError)
