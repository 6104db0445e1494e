"""The on-disk cache of tuned configs, shared by both backends.

One JSON file per backend in ``$GG_CACHE_DIR`` (default ``~/.cache/moe_grouped_gemm``), keyed
by ``gg_spec.tuning_key``; a second process reads the choice instead of tuning again. Writes
go through a temporary file and a rename, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from gg_spec.configs import AnyConfig, config_from_dict, config_to_dict


def cache_dir() -> Path:
    return Path(os.environ.get("GG_CACHE_DIR", Path.home() / ".cache" / "moe_grouped_gemm"))


def cache_path(backend: str) -> Path:
    return cache_dir() / f"tuned_{backend}.json"


def _read(path: Path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def load(backend: str, key: str) -> AnyConfig | None:
    """The cached config for `key`, or None."""
    entry = _read(cache_path(backend)).get(key)
    if entry is None:
        return None
    try:
        return config_from_dict(entry["config"])
    except (KeyError, TypeError, ValueError):
        return None


def store(backend: str, key: str, config: AnyConfig, ms: float | None = None) -> None:
    """Record `config` (and its measured time) under `key`."""
    path = cache_path(backend)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _read(path)
    data[key] = {"config": config_to_dict(config), "ms": ms}
    _write(path, data)


def _write(path: Path, data: dict) -> None:
    """Through a temporary file and a rename: a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def borrow_bucket(backend: str, *, num_experts: int, n: int, k: int, from_rows: int,
                  to_rows: int) -> list[str]:
    """Copy every entry of the weight shape (E, N, K) tuned at the routed-row bucket of
    `from_rows` to the bucket of `to_rows`, where that bucket has none. The copy carries no
    time (it was not measured there) and says where it came from (``"borrowed_from"``: the
    source bucket), so a later reader of the cache can tell it from a tuned entry. Returns
    the keys written. For benchmarks that run other token counts on the configs tuned at
    one (``python -m benchmarks --configs-from``); tuning every bucket costs each
    candidate's compilation per key."""
    from gg_spec.configs import token_bucket
    src, dst = f"|rows~{token_bucket(from_rows)}|", f"|rows~{token_bucket(to_rows)}|"
    shape = f"|E={num_experts}|N={n}|K={k}|"
    path = cache_path(backend)
    data = _read(path)
    new = {key.replace(src, dst): {"config": entry["config"], "ms": None,
                                   "borrowed_from": token_bucket(from_rows)}
           for key, entry in data.items()
           if shape in key and src in key and key.replace(src, dst) not in data}
    if src == dst or not new:
        return []
    data.update(new)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write(path, data)
    return sorted(new)
