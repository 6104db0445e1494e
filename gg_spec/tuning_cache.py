"""Tuned configs: the tables shipped with the package and the user's on-disk cache, shared by
both backends and by many processes.

Where a call's config comes from when none is given (``lookup``, the default path of both
backends, ``autotune=False`` included):

1. the user's cache, exact key (``gg_spec.tuning_key``): one JSON file per backend in
   ``$GG_CACHE_DIR`` (default ``~/.cache/moe_grouped_gemm``), written by the tuners;
2. the table shipped in the package (``gg_spec/tuned/<backend>.json``): same card (device
   label), op, weight shape (E, N, K), dtype and fusion flags, the nearest routed-row bucket
   (log distance; a tie goes to the larger bucket);
3. the default config of the op for the key's dtype (``gg_spec.default_config``).

A cached or shipped config is used only if ``gg_spec.validate`` accepts it for the call's
fusions and dtype (shared memory); one that it refuses is skipped (the next candidate is
tried). Answers are memoised per key in memory: the default path runs every training step
and reads no file after the first call of a problem. ``autotune=True`` tunes a key that neither the cache nor the shipped
table holds exactly (``find(..., nearest=False)``).

Many processes: every write is a read-modify-write of the JSON file under an exclusive
``fcntl.flock`` on a lock file beside it (``tuned_<backend>.json.lock``), then a temporary
file and an atomic rename (a reader that takes no lock never sees half a file). One key is
tuned by one process: ``tuning_lock`` is a per-key lock file taken without waiting; a process
that does not get it runs ``lookup``'s answer for that call instead of tuning too. A cache file
that cannot be read or parsed is ignored with a warning naming it, and the next write
replaces it with a valid one.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import tempfile
import warnings
from importlib import resources
from pathlib import Path

from gg_spec.configs import (CONFIG_TYPES, AnyConfig, config_from_dict, config_to_dict,
                             default_config, key_dtype, validate)

try:
    import fcntl
except ImportError:  # not POSIX: no locks (single-process use only)
    fcntl = None

SHIPPED_BACKENDS = ("triton", "pallas")


def cache_dir() -> Path:
    return Path(os.environ.get("GG_CACHE_DIR", Path.home() / ".cache" / "moe_grouped_gemm"))


def cache_path(backend: str) -> Path:
    return cache_dir() / f"tuned_{backend}.json"


# ------------------------------------------------------------------------- file access

def _read(path: Path) -> dict:
    """The entries of a cache file; {} when it does not exist. A file that exists but cannot
    be read or is not a JSON object is ignored, with a warning that names it (the next write
    replaces it)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        warnings.warn(f"tuning cache file {path} cannot be read ({type(err).__name__}: "
                      f"{err}); ignoring it, the next tuned config stored rewrites it",
                      RuntimeWarning, stacklevel=3)
        return {}
    if not isinstance(data, dict):
        warnings.warn(f"tuning cache file {path} does not hold a JSON object; ignoring it, "
                      f"the next tuned config stored rewrites it", RuntimeWarning,
                      stacklevel=3)
        return {}
    return data


def _write(path: Path, data: dict) -> None:
    """Through a temporary file and a rename: a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _file_lock(lock: Path, *, blocking: bool = True):
    """An exclusive flock on ``lock`` (created if missing); yields whether it is held (always
    True when blocking). Locks are per open file, so two threads of one process exclude each
    other too. The lock file stays: removing it would race with a process about to lock it."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield True
        return
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _updating(backend: str):
    """The entries of the backend's cache file, to modify in place; written back (atomically)
    on exit, all under the file's lock: concurrent writers lose nothing."""
    path = cache_path(backend)
    with _file_lock(path.with_name(path.name + ".lock")):
        data = _read(path)
        before = json.dumps(data, sort_keys=True)
        yield data
        if json.dumps(data, sort_keys=True) != before:
            _write(path, data)
    _memo.clear()


def _entry_config(entry) -> AnyConfig | None:
    try:
        return config_from_dict(entry["config"])
    except (KeyError, TypeError, ValueError):
        return None


def load(backend: str, key: str) -> AnyConfig | None:
    """The config the user's cache holds for `key` (read from disk now, not memoised), or
    None. Not validated: see ``find``."""
    return _entry_config(_read(cache_path(backend)).get(key))


def store(backend: str, key: str, config: AnyConfig, ms: float | None = None) -> None:
    """Record `config` (and its measured time) under `key` in the user's cache."""
    with _updating(backend) as data:
        data[key] = {"config": config_to_dict(config), "ms": ms}


@contextlib.contextmanager
def tuning_lock(backend: str, key: str, *, blocking: bool = False):
    """The right to tune `key`: yields True to the one process (or thread) that holds it,
    False at once to the others (``blocking=False``), who should run ``lookup``'s answer for
    this call instead of tuning the same key too. With ``blocking=True`` it waits for the
    holder. After getting it, re-read the cache (``load``/``find(..., fresh=True)``): the
    previous holder may just have stored the key."""
    digest = hashlib.sha1(key.encode()).hexdigest()[:20]
    with _file_lock(cache_dir() / "locks" / f"{backend}-{digest}.lock",
                    blocking=blocking) as held:
        yield held


# ------------------------------------------------------------------------- the keys

_KEY_FIELDS = ("op", "E", "N", "K", "rows", "dtype", "px", "py", "mul", "device")


def parse_key(key: str) -> dict | None:
    """The fields of a ``gg_spec.tuning_key`` (op, E, N, K, rows (the bucket), dtype, px, py,
    mul, device), or None for a key of another form."""
    parts = key.split("|")
    if len(parts) != len(_KEY_FIELDS):
        return None
    fields = {}
    try:
        for name, part in zip(_KEY_FIELDS, parts):
            if name in ("op", "dtype", "device"):
                fields[name] = part
            else:
                prefix = "rows~" if name == "rows" else f"{name}="
                if not part.startswith(prefix):
                    return None
                fields[name] = int(part[len(prefix):])
    except ValueError:
        return None
    return fields


def _usable(config: AnyConfig | None, op: str, fields: dict | None,
            dtype: str | None) -> bool:
    """Whether `config` may run `op` with the key's fusions and dtype (gg_spec.validate)."""
    if config is None or type(config) is not CONFIG_TYPES.get(op):
        return False
    flags = {}
    if fields is not None:
        flags = dict(permute_x=bool(fields["px"]), permute_y=bool(fields["py"]),
                     fuse_mul_post=bool(fields["mul"]) and op == "forward",
                     dtype=dtype)   # and it fits shared memory for the dtype (if known)
    try:
        validate(op, config, **flags)
    except ValueError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def shipped_table(backend: str) -> dict:
    """The tuned entries shipped in the package for `backend` ({} if none ship)."""
    if backend not in SHIPPED_BACKENDS:
        return {}
    try:
        text = resources.files("gg_spec").joinpath("tuned", f"{backend}.json").read_text()
        data = json.loads(text)
    except (OSError, ValueError) as err:
        warnings.warn(f"the shipped tuned configs of {backend} (gg_spec/tuned/{backend}.json) "
                      f"cannot be read ({err}); using default configs", RuntimeWarning)
        return {}
    return data if isinstance(data, dict) else {}


@functools.lru_cache(maxsize=None)
def _shipped_index(backend: str) -> dict:
    """Shipped entries by everything but the row bucket: {fields without rows: {bucket:
    entry}}."""
    index: dict = {}
    for key, entry in shipped_table(backend).items():
        fields = parse_key(key)
        if fields is not None:
            rest = tuple(fields[f] for f in _KEY_FIELDS if f != "rows")
            index.setdefault(rest, {})[fields["rows"]] = entry
    return index


def _by_distance(buckets, rows: int) -> list[int]:
    """Buckets nearest to `rows` first (log distance), a tie toward the larger bucket."""
    return sorted(buckets, key=lambda b: (abs(math.log2(max(b, 1)) - math.log2(max(rows, 1))),
                                          -b))


def _shipped(backend: str, op: str, fields: dict, nearest: bool) -> AnyConfig | None:
    rest = tuple(fields[f] for f in _KEY_FIELDS if f != "rows")
    buckets = _shipped_index(backend).get(rest, {})
    order = _by_distance(buckets, fields["rows"]) if nearest else (
        [fields["rows"]] if fields["rows"] in buckets else [])
    for bucket in order:
        config = _entry_config(buckets[bucket])
        if _usable(config, op, fields, fields["dtype"]):
            return config
    return None


# ------------------------------------------------------------------------- the policy

_memo: dict = {}


def find(backend: str, key: str, *, nearest: bool = True,
         fresh: bool = False) -> AnyConfig | None:
    """The cached or shipped config for `key`, or None (see the module's docstring for the
    order). ``nearest=False``: exact key only (the shipped table's own bucket too), what
    ``autotune=True`` tunes when missing. Memoised per key; ``fresh`` re-reads the cache
    (after taking a tuning lock). Every config returned passes ``gg_spec.validate`` for the
    key's fusions."""
    memo_key = (os.environ.get("GG_CACHE_DIR"), backend, key, nearest)
    if not fresh:
        try:
            return _memo[memo_key]
        except KeyError:
            pass
    fields = parse_key(key)
    op = fields["op"] if fields is not None else key.split("|", 1)[0]
    found = _entry_config(_read(cache_path(backend)).get(key))
    if not _usable(found, op, fields, key_dtype(key)):
        found = None
        if fields is not None:
            found = _shipped(backend, op, fields, nearest)
    _memo[memo_key] = found
    return found


def lookup(backend: str, key: str) -> AnyConfig:
    """The config a call with no config runs: the user's cache (exact key), else the shipped
    table (same card, op, shape, dtype and fusions, nearest row bucket), else the default
    config of the op."""
    found = find(backend, key)
    if found is not None:
        return found
    fields = parse_key(key)
    op = fields["op"] if fields is not None else key.split("|", 1)[0]
    return default_config(op, key_dtype(key))  # one that fits shared memory for the dtype


def clear_memo() -> None:
    """Forget the memoised answers (the next call of each key reads the cache again)."""
    _memo.clear()


def borrow_bucket(backend: str, *, num_experts: int, n: int, k: int, from_rows: int,
                  to_rows: int) -> list[str]:
    """Copy every entry of the weight shape (E, N, K) tuned at the routed-row bucket of
    `from_rows` to the bucket of `to_rows`, where that bucket has none. The copy carries no
    time (it was not measured there) and says where it came from (``"borrowed_from"``: the
    source bucket), so a later reader of the cache can tell it from a tuned entry. Returns
    the keys written. The entries come from the user's cache and the shipped table (the
    user's win). For benchmarks that run other token counts on the configs tuned at one
    (``python -m benchmarks --configs-from``); tuning every bucket costs each candidate's
    compilation per key."""
    from gg_spec.configs import token_bucket
    src, dst = f"|rows~{token_bucket(from_rows)}|", f"|rows~{token_bucket(to_rows)}|"
    if src == dst:
        return []
    shape = f"|E={num_experts}|N={n}|K={k}|"
    with _updating(backend) as data:
        sources = {**shipped_table(backend), **data}   # the user's entries win
        new = {key.replace(src, dst): {"config": entry["config"], "ms": None,
                                       "borrowed_from": token_bucket(from_rows)}
               for key, entry in sources.items()
               if shape in key and src in key and key.replace(src, dst) not in data}
        data.update(new)
    return sorted(new)
