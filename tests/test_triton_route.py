"""The routing kernels (triton_gg/kernels/route.py) against a NumPy stable argsort."""

import numpy as np
import pytest
import torch

triton_gg = pytest.importorskip("triton_gg")

from triton_gg.kernels import route as route_kernels  # noqa: E402
from triton_gg.kernels.route import launch_route  # noqa: E402
from triton_gg.routing import route, route_with_positions  # noqa: E402


def reference(ids: np.ndarray, experts: int):
    """m_sizes, gather and pos of the flattened ids, ids outside [0, E) as E (sorted last)."""
    flat = ids.reshape(-1).astype(np.int64)
    flat = np.where((flat >= 0) & (flat < experts), flat, experts)
    gather = np.argsort(flat, kind="stable")
    pos = np.empty_like(gather)
    pos[gather] = np.arange(flat.size)
    return np.bincount(flat, minlength=experts + 1)[:experts], gather, pos


def check(ids, experts, got):
    m_sizes, gather, pos = got
    assert m_sizes.dtype == gather.dtype == pos.dtype == torch.int32
    assert m_sizes.shape == (experts,) and gather.shape == pos.shape == (ids.numel(),)
    ref_m, ref_g, ref_p = reference(ids.cpu().numpy(), experts)
    np.testing.assert_array_equal(m_sizes.cpu().numpy(), ref_m)
    np.testing.assert_array_equal(gather.cpu().numpy(), ref_g)
    np.testing.assert_array_equal(pos.cpu().numpy(), ref_p)


def random_ids(rng, tokens, topk, experts, dtype, invalid=0.1):
    """Ids in [0, E), a fraction `invalid` of them -1 or past E (expert-parallel sentinels)."""
    ids = rng.integers(0, experts, (tokens, topk))
    bad = rng.random((tokens, topk)) < invalid
    ids[bad] = rng.choice([-1, experts, experts + 3, 2**20], size=bad.sum())
    return torch.from_numpy(ids).to(dtype)


@pytest.mark.parametrize("experts", [1, 3, 8, 128])
def test_route_matches_stable_argsort(experts, rng):
    """Every T x k x id dtype, at the default block (under the interpreter up to 4096 rows:
    T=2500 with k=2 or 8 spans several blocks, the last one partial)."""
    for tokens in (1, 5, 300, 2500):
        for topk in (1, 2, 8):
            for dtype in (torch.int32, torch.int64):
                ids = random_ids(rng, tokens, topk, experts, dtype)
                check(ids, experts, route_with_positions(ids, experts))


@pytest.mark.parametrize("block", [2, 16, 128, 256])
def test_gpu_sized_blocks(block, rng):
    """The block sizes a GPU runs (128-1024 rows) and smaller: many blocks, a partial last
    one, several scan programs (EB / 16 of them)."""
    cases = {2: [(9, 3, 4)], 16: [(5, 3, 8), (150, 4, 8), (97, 3, 255), (40, 8, 1000)]}.get(
        block, [(5, 3, 8), (700, 8, 8), (97, 3, 255), (40, 8, 1000)])
    for tokens, topk, experts in cases:
        ids = random_ids(rng, tokens, topk, experts, torch.int64, invalid=0.3)
        check(ids, experts, launch_route(ids, experts, block=block))


def test_scan_in_several_steps(rng, monkeypatch):
    """More blocks than one step of the scan's tile takes (the running sum between steps):
    a 64-element tile, 4 blocks of 16 bins a step."""
    monkeypatch.setattr(route_kernels, "SCAN_TILE", 64)
    for tokens, topk, experts in ((300, 2, 8), (60, 8, 40)):
        ids = random_ids(rng, tokens, topk, experts, torch.int32, invalid=0.3)
        check(ids, experts, launch_route(ids, experts, block=32))


def test_special_id_patterns(rng):
    for tokens, topk in ((5, 2), (600, 8)):
        for experts in (1, 8):
            for ids in (torch.full((tokens, topk), -1),                # all invalid
                        torch.full((tokens, topk), experts),           # all invalid, past E
                        torch.full((tokens, topk), experts - 1),       # all the last expert
                        torch.zeros((tokens, topk), dtype=torch.int32),  # all expert 0
                        torch.from_numpy(rng.integers(-1, 1, (tokens, topk)))):
                check(ids, experts, route_with_positions(ids, experts))


def test_large_ids_compared_in_int64():
    """int64 ids that would wrap into [0, E) if truncated to int32 first are invalid."""
    ids = torch.tensor([[2**32 + 1, 1], [-(2**32) + 2, 2**31]], dtype=torch.int64)
    m_sizes, gather, pos = route_with_positions(ids, 4)
    assert m_sizes.tolist() == [0, 1, 0, 0]
    assert gather.tolist() == [1, 0, 2, 3]


def test_other_dtypes_and_strides(rng):
    base = random_ids(rng, 50, 4, 6, torch.int64)
    for ids in (base.to(torch.int16), base.clamp(min=0).to(torch.uint8),
                base.T.contiguous().T,        # column-major: read at its strides, no copy
                base[:, ::2], base[::3]):
        check(ids, 6, route_with_positions(ids, 6))


def test_every_position_written(rng, monkeypatch):
    """Output buffers come from torch.empty: poison them, so an unwritten entry shows."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        out = empty(*args, **kwargs)
        return out.fill_(-7) if not out.is_floating_point() else out.fill_(float("nan"))
    monkeypatch.setattr(torch, "empty", poisoned)
    for tokens, topk, experts in ((1, 1, 1), (33, 3, 5), (1000, 2, 16)):
        ids = random_ids(rng, tokens, topk, experts, torch.int32, invalid=0.2)
        m_sizes, gather, pos = launch_route(ids, experts)
        assert torch.equal(torch.sort(gather).values, torch.arange(tokens * topk,
                                                                   dtype=torch.int32))
        check(ids, experts, (m_sizes, gather, pos))


def test_empty_and_route_api(rng):
    for shape in ((0, 8), (4, 0)):
        m_sizes, gather, pos = route_with_positions(torch.zeros(shape, dtype=torch.int64), 3)
        assert m_sizes.tolist() == [0, 0, 0] and gather.shape == pos.shape == (0,)
        assert m_sizes.dtype == gather.dtype == pos.dtype == torch.int32
    ids = random_ids(rng, 20, 2, 4, torch.int64)
    m_sizes, gather = route(ids, 4)
    ref_m, ref_g, _ = reference(ids.numpy(), 4)
    np.testing.assert_array_equal(m_sizes.numpy(), ref_m)
    np.testing.assert_array_equal(gather.numpy(), ref_g)
    with pytest.raises(ValueError, match="2-D"):
        route(ids.reshape(-1), 4)
    with pytest.raises(ValueError, match="num_experts"):
        route(ids, 0)


def test_many_experts(rng):
    """E = 4096 fills the kernels' largest histogram (4096 bins); past it, torch ops."""
    for experts in (511, 4096, 5000):
        ids = random_ids(rng, 40, 8, experts, torch.int64)
        check(ids, experts, route_with_positions(ids, experts))


def test_route_compiles_fullgraph(rng):
    """Under torch.compile the kernels run as one op (triton_gg::route), shapes from its fake."""
    torch._dynamo.reset()
    ids = random_ids(rng, 30, 4, 6, torch.int64)
    compiled = torch.compile(route_with_positions, fullgraph=True, backend="aot_eager",
                             dynamic=False)
    check(ids, 6, compiled(ids, 6))


@pytest.mark.gpu
def test_gpu_route_matches_torch_sort():
    """Qwen3-30B-A3B routing (T=8192, k=8, E=128) on the device against torch.sort(stable),
    with expert-parallel sentinels (-1 and >= E); then other E, k, T and block sizes (the
    compiled histogram and gather at 1 to 4096 bins, 128 to 1024 rows a block)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    i32, i64 = torch.int32, torch.int64
    cases = [(8192, 8, 128, i64), (8192, 8, 128, i32), (8192, 8, 512, i32), (1, 8, 1, i64),
             (5, 2, 3, i32), (300, 8, 8, i64), (2500, 2, 128, i64), (65536, 8, 64, i64),
             (4096, 8, 4096, i32)]
    for tokens, topk, experts, dtype in cases:
        ids = torch.randint(0, experts, (tokens, topk), generator=gen, device="cuda")
        foreign = torch.rand((tokens, topk), generator=gen, device="cuda")
        ids = torch.where(foreign < 0.03, -1, torch.where(foreign > 0.97, experts + 2, ids))
        ids = ids.to(dtype)
        m_sizes, gather, pos = route_with_positions(ids, experts)
        flat = ids.reshape(-1).long()
        flat = torch.where((flat >= 0) & (flat < experts), flat, experts)
        ref_g = torch.sort(flat, stable=True).indices
        assert torch.equal(gather.long(), ref_g), (tokens, topk, experts)
        assert torch.equal(m_sizes.long(), torch.bincount(flat, minlength=experts + 1)[:-1])
        assert torch.equal(pos.long()[ref_g], torch.arange(flat.numel(), device="cuda"))
