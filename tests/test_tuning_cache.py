"""Tuned configs: the shipped tables, the lookup order of the default path, and a cache that
many processes write at once (gg_spec.tuning_cache, triton_gg.autotune, pallas_gg.tuning)."""

from __future__ import annotations

import json
import multiprocessing
import threading
import time
import types

import pytest

import gg_spec
from gg_spec import tuning_cache

QWEN3 = dict(num_experts=128, n=1536, k=2048)   # qwen3 w1 (gate_up), as shipped
ROWS = 65536


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GG_CACHE_DIR", str(tmp_path / "cache"))
    tuning_cache.clear_memo()
    yield
    tuning_cache.clear_memo()


def _key(op, rows=ROWS, device="NVIDIA_H200", dtype="bfloat16", shape=QWEN3, **flags):
    return gg_spec.tuning_key(op, **shape, rows=rows, dtype=dtype, device=device, **flags)


def _shipped(backend, key):
    return gg_spec.config_from_dict(tuning_cache.shipped_table(backend)[key]["config"])


# ------------------------------------------------------------------ many writers at once

def _store_keys(cache_dir, worker, count, barrier, module="gg_spec.tuning_cache"):
    """A writer process: `count` keys of its own stored one by one, all writers starting
    together."""
    import importlib
    import os
    os.environ["GG_CACHE_DIR"] = cache_dir
    cache = importlib.import_module(module)
    barrier.wait()
    for i in range(count):
        key = gg_spec.tuning_key("dW", num_experts=worker + 1, n=8, k=8, rows=i + 1,
                                 dtype=f"w{worker}i{i}")
        cache.store("triton", key, gg_spec.DWConfig(block_n=32), ms=float(i))


def run_writers(cache_dir, module="gg_spec.tuning_cache", workers=8, count=20):
    ctx = multiprocessing.get_context("spawn")   # pure gg_spec in the children
    barrier = ctx.Barrier(workers)
    procs = [ctx.Process(target=_store_keys, args=(str(cache_dir), w, count, barrier, module))
             for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    with open(cache_dir / "tuned_triton.json") as f:
        return json.load(f)


def test_eight_concurrent_writers_lose_no_entry(tmp_path):
    """8 processes storing 20 keys each at once: all 160 entries are kept (the unlocked
    read-modify-write kept 28 of 160)."""
    data = run_writers(tmp_path / "cache")
    assert len(data) == 160
    assert all(entry["config"]["block_n"] == 32 for entry in data.values())


# ------------------------------------------------------------------ an unreadable file

def test_corrupt_cache_file_is_ignored_with_a_warning_then_rewritten():
    path = tuning_cache.cache_path("triton")
    path.parent.mkdir(parents=True)
    path.write_text('{"half a file": ')
    key = _key("dW")
    with pytest.warns(RuntimeWarning, match=str(path)):
        found = tuning_cache.lookup("triton", key)
    assert found == _shipped("triton", key)        # the shipped table still answers
    mine = gg_spec.DWConfig(block_m=32, block_n=64)
    with pytest.warns(RuntimeWarning, match=str(path)):
        tuning_cache.store("triton", key, mine, ms=1.0)
    data = json.loads(path.read_text())             # valid again, with the new entry
    assert gg_spec.config_from_dict(data[key]["config"]) == mine
    assert tuning_cache.lookup("triton", key) == mine


def test_a_cache_file_that_is_not_an_object_is_ignored():
    path = tuning_cache.cache_path("pallas")
    path.parent.mkdir(parents=True)
    path.write_text("[1, 2]")
    with pytest.warns(RuntimeWarning, match=str(path)):
        assert tuning_cache.find("pallas", _key("dX", device="cpu")) is None


# ------------------------------------------------------------------ the lookup order

@pytest.mark.parametrize("backend", ["triton", "pallas"])
def test_lookup_order(backend):
    """User cache (exact key) > shipped (same card, op, shape, dtype, fusions; nearest row
    bucket) > default."""
    key = _key("forward", permute_x=True)
    shipped = _shipped(backend, key)
    assert tuning_cache.lookup(backend, key) == shipped
    # another row count (bucket 32768): the nearest shipped bucket (pallas ships 65536
    # only; triton 16384 and 65536 too, equally near: the larger)
    assert tuning_cache.lookup(backend, _key("forward", rows=20000, permute_x=True)) == shipped
    # another card, dtype, shape or fusion: the default
    default = gg_spec.default_config("forward")
    for other in (_key("forward", device="NVIDIA_H100", permute_x=True),
                  _key("forward", dtype="float16", permute_x=True),
                  _key("forward", shape=dict(num_experts=64, n=1536, k=2048), permute_x=True),
                  _key("forward", permute_y=True, fuse_mul_post=True)):
        assert tuning_cache.lookup(backend, other) == default
    # the user's cache wins
    mine = gg_spec.ForwardConfig(block_m=64, block_n=128, block_k=32)
    tuning_cache.store(backend, key, mine, ms=0.5)
    assert tuning_cache.lookup(backend, key) == mine
    # exact-only (what autotune=True tunes when missing): no borrowing from another bucket
    assert tuning_cache.find(backend, _key("forward", rows=20000, permute_x=True),
                             nearest=False) is None


def test_nearest_bucket_by_log_distance_ties_to_the_larger():
    """triton ships qwen3 buckets 4096, 16384, 65536, 262144."""
    def got(rows):
        return tuning_cache.lookup("triton", _key("dX", rows=rows))
    # rows round up to a power-of-two bucket (gg_spec.token_bucket) first
    for rows, bucket in ((1, 4096), (3000, 4096), (12000, 16384), (65536, 65536),
                         (10**7, 262144)):
        assert got(rows) == _shipped("triton", _key("dX", rows=bucket)), rows
    # buckets halfway (in log2) between two shipped ones take the larger: 8192 (from 5000
    # rows), 32768 (from 20000), 131072 (from 100000)
    for rows, bucket in ((5000, 16384), (20000, 65536), (100000, 262144)):
        assert got(rows) == _shipped("triton", _key("dX", rows=bucket)), rows
    assert _shipped("triton", _key("dX", rows=16384)) != _shipped("triton", _key("dX", rows=4096))


def test_an_entry_invalid_for_the_fusions_is_skipped(monkeypatch):
    key = _key("forward", permute_x=True)
    bad = gg_spec.ForwardConfig(tma_load_x=True)    # X is gathered with permute_x
    with pytest.raises(ValueError):
        gg_spec.validate("forward", bad, permute_x=True)
    tuning_cache.store("triton", key, bad, ms=0.1)
    assert tuning_cache.lookup("triton", key) == _shipped("triton", key)
    # a shipped bucket that is invalid: the next nearest valid one
    good = gg_spec.ForwardConfig(block_m=64)
    table = {_key("forward", rows=65536, permute_x=True): {"config": gg_spec.config_to_dict(bad)},
             _key("forward", rows=4096, permute_x=True): {"config": gg_spec.config_to_dict(good)}}
    monkeypatch.setattr(tuning_cache, "shipped_table", lambda backend: table)
    tuning_cache._shipped_index.cache_clear()
    tuning_cache.clear_memo()
    try:
        assert tuning_cache.lookup("pallas", _key("forward", rows=60000, permute_x=True)) == good
        # a config of another op's type is refused as well
        wrong = {_key("dX", rows=65536): {"config": gg_spec.config_to_dict(good)}}
        monkeypatch.setattr(tuning_cache, "shipped_table", lambda backend: wrong)
        tuning_cache._shipped_index.cache_clear()
        assert tuning_cache.lookup("pallas", _key("dX")) == gg_spec.default_config("dX")
    finally:
        tuning_cache._shipped_index.cache_clear()


def test_lookup_is_memoised(monkeypatch):
    key = _key("dW", rows=1000)
    first = tuning_cache.lookup("triton", key)
    monkeypatch.setattr(tuning_cache, "_read", lambda path: pytest.fail("read again"))
    assert tuning_cache.lookup("triton", key) == first


def test_tables_ship_as_package_data():
    """pyproject declares them; importlib.resources finds them; every key is a tuning key
    and every config is valid for its fusions."""
    import tomllib
    from pathlib import Path
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert "tuned/*.json" in pyproject["tool"]["setuptools"]["package-data"]["gg_spec"]
    for backend in ("triton", "pallas"):
        table = tuning_cache.shipped_table(backend)
        assert table
        for key, entry in table.items():
            fields = tuning_cache.parse_key(key)
            assert fields is not None, key
            config = gg_spec.config_from_dict(entry["config"])
            gg_spec.validate(fields["op"], config, permute_x=bool(fields["px"]),
                             permute_y=bool(fields["py"]),
                             fuse_mul_post=bool(fields["mul"]) and fields["op"] == "forward")


# ------------------------------------------------------------------ the backends' default path

def test_triton_default_call_takes_the_shipped_config(monkeypatch):
    torch = pytest.importorskip("torch")
    from triton_gg import api, autotune
    monkeypatch.setattr(autotune, "_device_name", lambda device: "NVIDIA_H200")
    dims = gg_spec.Dims(num_experts=128, n=1536, k=2048, m=ROWS, tokens=ROWS // 8,
                        routed_rows=ROWS)
    x = torch.empty(0, dtype=torch.bfloat16)
    fwd = api._forward_config(None, False, dims, x, x, None, None, 8, True, False, None, False)
    assert fwd == _shipped("triton", _key("forward", permute_x=True))
    assert fwd != gg_spec.default_config("forward")
    dx = api._dx_config(None, False, dims, x, x, None, None, 8, False, False)
    assert dx == _shipped("triton", _key("dX"))
    assert api._looked_up("dW", dims, x, False, False) == _shipped("triton", _key("dW"))
    # another row count: the nearest bucket
    fewer = gg_spec.Dims(num_experts=128, n=1536, k=2048, m=3000, tokens=375, routed_rows=3000)
    assert api._dx_config(None, False, fewer, x, x, None, None, 8, False, False) == \
        _shipped("triton", _key("dX", rows=4096))
    # a user cache entry overrides
    mine = gg_spec.DXConfig(block_m=64, block_n=32, block_k=64)
    tuning_cache.store("triton", _key("dX"), mine)
    assert api._dx_config(None, False, dims, x, x, None, None, 8, False, False) == mine
    # an unknown card: the default
    monkeypatch.setattr(autotune, "_device_name", lambda device: "NVIDIA_B200")
    assert api._dx_config(None, False, dims, x, x, None, None, 8, False, False) == \
        gg_spec.default_config("dX")


def test_pallas_default_call_takes_the_shipped_config(monkeypatch):
    pytest.importorskip("jax")
    from pallas_gg import tuning
    monkeypatch.setattr(tuning, "device_label", lambda: "NVIDIA_H200")
    shape = dict(QWEN3, dtype="bfloat16", permute_x=True, permute_y=False)
    assert tuning.lookup_config("forward", rows=ROWS, **shape) == \
        _shipped("pallas", _key("forward", permute_x=True))
    assert tuning.lookup_config("forward", rows=9000, **shape) == \
        _shipped("pallas", _key("forward", permute_x=True))    # nearest bucket (one ships)
    mine = gg_spec.ForwardConfig(block_m=64, block_n=64, block_k=64)
    tuning_cache.store("pallas", _key("forward", permute_x=True), mine)
    assert tuning.lookup_config("forward", rows=ROWS, **shape) == mine
    monkeypatch.setattr(tuning, "device_label", lambda: "AMD_MI300X")
    assert tuning.lookup_config("forward", rows=ROWS, **shape) == \
        gg_spec.default_config("forward")


SMALL = {"forward": gg_spec.ForwardConfig(block_m=16, block_n=32, block_k=32, num_warps=4,
                                          num_stages=2),
         "dX": gg_spec.DXConfig(block_m=16, block_n=32, block_k=32, num_warps=4, num_stages=2)}


def _tiny_problem(np_rng, tokens=6, experts=3, topk=2, n=24, k=40):
    ids = np_rng.integers(0, experts, (tokens, topk))
    m_sizes, gather = gg_spec.route(ids, experts)
    x = np_rng.standard_normal((tokens, k)).astype("float32")
    w = np_rng.standard_normal((experts, n, k)).astype("float32")
    return x, w, types.SimpleNamespace(m_sizes=m_sizes, gather_indices=gather), topk


def test_triton_direct_call_runs_the_cached_config(monkeypatch, rng):
    """End to end on CPU: a cache entry for this (cpu) problem is what the default call of
    grouped_gemm_forward runs."""
    torch = pytest.importorskip("torch")
    import triton_gg
    from triton_gg import _ops
    x, w, routing, topk = _tiny_problem(rng)
    m_sizes = torch.as_tensor(routing.m_sizes, dtype=torch.int32)
    gather = torch.as_tensor(routing.gather_indices, dtype=torch.int32)
    key = gg_spec.tuning_key("forward", num_experts=w.shape[0], n=w.shape[1], k=w.shape[2],
                             rows=gather.shape[0], dtype="float32", permute_x=True,
                             device="cpu")
    tuning_cache.store("triton", key, SMALL["forward"])
    seen = []
    real = _ops.forward

    def spy(*args):
        seen.append(args[10])
        return real(*args)
    monkeypatch.setattr(_ops, "forward", spy)
    triton_gg.grouped_gemm_forward(torch.as_tensor(x), torch.as_tensor(w), m_sizes, gather,
                                   topk, permute_x=True)
    assert seen == [_ops.encode(SMALL["forward"])]


def test_pallas_direct_call_runs_the_cached_config(monkeypatch, rng):
    pytest.importorskip("jax")
    import pallas_gg
    from pallas_gg import triton_lowering
    x, w, routing, topk = _tiny_problem(rng)
    key = gg_spec.tuning_key("dX", num_experts=w.shape[0], n=w.shape[1], k=w.shape[2],
                             rows=routing.gather_indices.shape[0], dtype="float32",
                             device="cpu")
    tuning_cache.store("pallas", key, SMALL["dX"])
    seen = []
    real = triton_lowering.dx

    def spy(*args, **kwargs):
        seen.append(kwargs["config"])
        return real(*args, **kwargs)
    monkeypatch.setattr(triton_lowering, "dx", spy)
    dy = rng.standard_normal((routing.gather_indices.shape[0], w.shape[1])).astype("float32")
    pallas_gg.grouped_gemm_dX(dy, w, routing.m_sizes, routing.gather_indices, topk,
                              backend="triton")
    assert seen == [SMALL["dX"]]


# ------------------------------------------------------------------ one tuner per key

def _hold_tuning_lock(cache_dir, key, held, release):
    import os
    os.environ["GG_CACHE_DIR"] = cache_dir
    with tuning_cache.tuning_lock("triton", key) as mine:
        assert mine
        held.set()
        release.wait(60)


def test_tuning_lock_is_taken_by_one_process_at_a_time(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    held, release = ctx.Event(), ctx.Event()
    key = _key("dW")
    holder = ctx.Process(target=_hold_tuning_lock,
                         args=(str(tmp_path / "cache"), key, held, release))
    holder.start()
    try:
        assert held.wait(60)
        start = time.monotonic()
        with tuning_cache.tuning_lock("triton", key) as mine:
            assert not mine                      # refused at once, not after a wait
        assert time.monotonic() - start < 1.0
        with tuning_cache.tuning_lock("triton", _key("dX")) as mine:
            assert mine                          # another key is free
    finally:
        release.set()
        holder.join(60)
    assert holder.exitcode == 0
    with tuning_cache.tuning_lock("triton", key) as mine:
        assert mine                              # free again once released


def test_triton_two_tuners_of_one_key(monkeypatch):
    """autotune=True from two threads at once: one tunes, the other runs the lookup's answer
    (the default here) at once; afterwards everyone gets the tuned config."""
    torch = pytest.importorskip("torch")
    from triton_gg import autotune
    monkeypatch.setattr(autotune, "_memory", {})
    key = _key("dW", device="fake_gpu")
    tuned = gg_spec.DWConfig(block_m=32, block_n=64)
    started, calls = threading.Event(), []

    def slow_tune(op, key, run_with, **flags):
        calls.append(key)
        started.set()
        time.sleep(1.5)
        autotune._memory[key] = tuned
        tuning_cache.store("triton", key, tuned, 1.0)
        return tuned
    monkeypatch.setattr(autotune, "tune", slow_tune)
    cuda = torch.device("cuda")   # a device object only: nothing runs on it

    def choose():
        return autotune.choose("dW", None, True, lambda: key, None, cuda)
    results = {}
    tuner = threading.Thread(target=lambda: results.setdefault("tuner", choose()))
    tuner.start()
    assert started.wait(30)
    start = time.monotonic()
    results["other"] = choose()
    waited = time.monotonic() - start
    tuner.join(30)
    assert calls == [key]                        # tuned once
    assert results == {"tuner": tuned, "other": gg_spec.default_config("dW")}
    assert waited < 1.0
    assert choose() == tuned


def test_pallas_two_tuners_of_one_key(monkeypatch):
    np = pytest.importorskip("numpy")
    pytest.importorskip("jax")
    from pallas_gg import tuning
    monkeypatch.setattr(tuning, "device_label", lambda: "fake_gpu")
    tuned = gg_spec.DXConfig(block_m=32, block_n=64)
    started, calls = threading.Event(), []

    def slow_measure(fn):
        calls.append(1)
        started.set()
        time.sleep(1.5)
        return tuned, 1.0
    monkeypatch.setattr(tuning, "_outside_any_trace", slow_measure)
    x = np.zeros((64, 16), np.float32)
    w = np.zeros((4, 8, 16), np.float32)
    gather = np.arange(64)

    def choose():
        return tuning.autotuned_config("dX", x, w, None, gather, 1, permute_x=False,
                                       permute_y=False, topk_weights=None,
                                       fuse_mul_post=False, interpret=False)
    results = {}
    tuner = threading.Thread(target=lambda: results.setdefault("tuner", choose()))
    tuner.start()
    assert started.wait(30)
    start = time.monotonic()
    results["other"] = choose()
    waited = time.monotonic() - start
    tuner.join(30)
    assert len(calls) == 1
    assert results == {"tuner": tuned, "other": gg_spec.default_config("dX", "float32")}
    assert waited < 1.0
    assert choose() == tuned
