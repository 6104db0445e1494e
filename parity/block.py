"""The whole MoE expert block through both frameworks on the same weights and routing.

    from parity.block import BlockCase, run_block
    report = run_block(BlockCase("tiny", tokens=16))   # triton_gg and pallas_gg
    print(report.table()); assert report.passed

One set of inputs (Hugging Face layout: hidden [T, H], gate_up_proj [E, 2I, H], down_proj
[E, H, I], top_k_index / top_k_weights [T, k], optional biases; optionally some foreign expert
ids, which must contribute nothing) is drawn in numpy, rounded to the case's dtype, and given to
``triton_gg.moe_experts`` and ``pallas_gg.moe_experts``. Each backend's output and gradients
(hidden, both weights, the routing weights, the biases) are compared with a float64 eager loop
(torch autograd on the CPU, every expert on the tokens that chose it), and the two backends
with each other, within gg_spec's tolerance for the dtype. ``python -m parity --moe-block``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from gg_spec.cases import round_to_dtype
from gg_spec.presets import get_preset
from gg_spec.tolerances import rel_error, tolerance

GRADS = ("hidden", "gate_up_proj", "down_proj", "top_k_weights")
BIAS_GRADS = ("gate_up_proj_bias", "down_proj_bias")
BLOCK_BACKENDS = ("triton_gg", "pallas_gg")


@dataclass(frozen=True)
class BlockCase:
    preset: str = "tiny"
    tokens: int = 16
    dtype: str = "float32"
    seed: int = 0
    biases: bool = False
    foreign_ids: bool = False     # mark some slots with ids outside [0, E)
    device: str = "cpu"           # where the torch backend runs ("cuda" on a GPU)

    @property
    def label(self) -> str:
        extras = "".join([" +biases" if self.biases else "",
                          " +foreign_ids" if self.foreign_ids else ""])
        return f"moe_block {self.preset} T={self.tokens} {self.dtype}{extras}"


def make_block_inputs(case: BlockCase) -> dict[str, np.ndarray]:
    """Float64 arrays holding values exactly representable in the case's dtype."""
    p = get_preset(case.preset)
    e, h, i, k, t = p.num_experts, p.hidden, p.intermediate, p.topk, case.tokens
    rng = np.random.default_rng(case.seed)
    scores = rng.standard_normal((t, e))
    idx = np.argsort(-scores, axis=1)[:, :k].astype(np.int64)
    if case.foreign_ids and t:
        idx[::3, 0] = e            # expert-parallel sentinels
        idx[1::4, -1] = e + 7
    weights = np.exp(rng.standard_normal((t, k)))
    weights /= weights.sum(1, keepdims=True)
    inputs = {
        "hidden": rng.standard_normal((t, h)),
        "gate_up_proj": rng.standard_normal((e, 2 * i, h)) * h**-0.5,
        "down_proj": rng.standard_normal((e, h, i)) * i**-0.5,
        "top_k_weights": weights,
        "d_out": rng.standard_normal((t, h)),
    }
    if case.biases:
        inputs["gate_up_proj_bias"] = rng.standard_normal((e, 2 * i)) * 0.1
        inputs["down_proj_bias"] = rng.standard_normal((e, h)) * 0.1
    inputs = {n: round_to_dtype(a, case.dtype) for n, a in inputs.items()}
    inputs["top_k_index"] = idx
    return inputs


def _wanted(inputs) -> tuple[str, ...]:
    return GRADS + tuple(n for n in BIAS_GRADS if n in inputs)


def reference(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Float64 output and gradients from an eager per-expert loop (torch autograd, CPU)."""
    import torch
    t = {n: torch.from_numpy(np.asarray(a)) for n, a in inputs.items()}
    leaves = {n: t[n].double().requires_grad_(True) for n in _wanted(inputs)}
    hidden, gate_up, down = leaves["hidden"], leaves["gate_up_proj"], leaves["down_proj"]
    weights, idx = leaves["top_k_weights"], t["top_k_index"]
    b1, b2 = leaves.get("gate_up_proj_bias"), leaves.get("down_proj_bias")
    out = hidden * 0.0
    for e in range(gate_up.shape[0]):
        token, slot = torch.nonzero(idx == e, as_tuple=True)
        if token.numel() == 0:
            continue
        h = hidden[token] @ gate_up[e].T + (0.0 if b1 is None else b1[e])
        gate, up = h.chunk(2, dim=-1)
        y = (torch.nn.functional.silu(gate) * up) @ down[e].T + (0.0 if b2 is None else b2[e])
        out = out.index_add(0, token, y * weights[token, slot, None])
    grads = torch.autograd.grad(out, list(leaves.values()), t["d_out"].double(),
                                allow_unused=True)
    result = {"out": out.detach().numpy()}
    for name, g in zip(leaves, grads):
        result["d_" + name] = (np.zeros(leaves[name].shape) if g is None else g.numpy())
    return result


def run_triton_gg(inputs, case: BlockCase) -> dict[str, np.ndarray]:
    import torch

    import triton_gg
    dtype = getattr(torch, case.dtype)

    def tensor(name):
        return torch.from_numpy(np.asarray(inputs[name])).to(case.device, dtype)
    leaves = {n: tensor(n).requires_grad_(True) for n in _wanted(inputs)}
    idx = torch.from_numpy(inputs["top_k_index"]).to(case.device)
    out = triton_gg.moe_experts(leaves["hidden"], leaves["gate_up_proj"], leaves["down_proj"],
                                idx, leaves["top_k_weights"],
                                gate_up_bias=leaves.get("gate_up_proj_bias"),
                                down_bias=leaves.get("down_proj_bias"))
    grads = torch.autograd.grad(out, list(leaves.values()), tensor("d_out"))
    result = {"out": out}
    result.update({"d_" + n: g for n, g in zip(leaves, grads)})
    return {n: v.detach().double().cpu().numpy() for n, v in result.items()}


def run_pallas_gg(inputs, case: BlockCase) -> dict[str, np.ndarray]:
    import jax
    import jax.numpy as jnp

    import pallas_gg
    dtype = jnp.dtype(case.dtype)
    arr = {n: jnp.asarray(np.asarray(inputs[n]), dtype) for n in _wanted(inputs)}
    idx = jnp.asarray(inputs["top_k_index"].astype(np.int32))
    param_names = ["gate_up_proj", "down_proj"] + [n for n in BIAS_GRADS if n in arr]

    def block(params, hidden, weights):
        return pallas_gg.moe_experts(params, hidden, idx, weights)
    params = {n: arr[n] for n in param_names}
    out, vjp = jax.vjp(jax.jit(block), params, arr["hidden"], arr["top_k_weights"])
    g_params, g_hidden, g_weights = vjp(jnp.asarray(np.asarray(inputs["d_out"]), dtype))
    result = {"out": out, "d_hidden": g_hidden, "d_top_k_weights": g_weights}
    result.update({"d_" + n: g_params[n] for n in param_names})
    return {n: np.asarray(jnp.asarray(v, jnp.float32), dtype=np.float64)
            for n, v in result.items()}


RUNNERS = {"triton_gg": run_triton_gg, "pallas_gg": run_pallas_gg}


@dataclass
class BlockReport:
    case: BlockCase
    tol: float
    rows: list = field(default_factory=list)     # (who, output, rel error, passed)
    errors: dict = field(default_factory=dict)   # backend -> exception text

    @property
    def passed(self) -> bool:
        return not self.errors and bool(self.rows) and all(r[3] for r in self.rows)

    def table(self) -> str:
        lines = [f"{self.case.label}: {'PASS' if self.passed else 'FAIL'} (tol {self.tol:g})",
                 f"  {'compared':<26} {'output':<22} {'rel error':>10}"]
        for who, name, err, ok in self.rows:
            lines.append(f"  {who:<26} {name:<22} {err:>10.2e}{'' if ok else '  FAIL'}")
        for who, text in self.errors.items():
            lines.append(f"  {who:<26} raised {text}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"case": self.case.label, "tol": self.tol, "passed": self.passed,
                "rows": [{"compared": w, "output": n, "rel_error": e, "passed": ok}
                         for w, n, e, ok in self.rows],
                "errors": self.errors}


def run_block(case: BlockCase, backends=BLOCK_BACKENDS) -> BlockReport:
    """Every backend against the float64 loop, and each pair of backends with each other."""
    inputs = make_block_inputs(case)
    ref = reference(inputs)
    report = BlockReport(case, tolerance(case.dtype))
    outs = {}
    for name in backends:
        try:
            outs[name] = RUNNERS[name](inputs, case)
        except Exception as e:  # noqa: BLE001  (reported, fails the case)
            report.errors[name] = f"{type(e).__name__}: {e}"
    for name, out in outs.items():
        for key in ref:
            err = rel_error(out[key], ref[key])
            report.rows.append((f"{name} vs float64", key, err, err < report.tol))
    names = list(outs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            for key in ref:
                err = rel_error(outs[a][key], outs[b][key])
                report.rows.append((f"{a} vs {b}", key, err, err < report.tol))
    return report
