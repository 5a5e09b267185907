"""Per-example gradient norms without per-example gradients of linear layers and embedding tables.

``||∇_θ m(θ, z_b)||²`` for every example ``z_b`` of a batch. Materializing each example's gradient
(``vmap(grad)``) writes ``D`` floats per example, and for a linear layer ``y = x Wᵀ + b`` over
``T`` positions it is a ``[out, T] x [T, in]`` product per example: on a 135M-parameter language
model that was 9 forward passes' worth of time per example, one example at a time.

For the layers that hold almost all of a transformer's parameters (``nn.Linear``, ``nn.Embedding``,
transformers' ``Conv1D``) the norm has a closed form
in what the forward and backward passes already compute (Goodfellow 2015; "ghost norms"): with
``X [T, in]`` the layer's input and ``G [T, out]`` the gradient at its output,
``||Gᵀ X||² = Σ_{t,s} (X Xᵀ)_{ts} (G Gᵀ)_{ts}``, and a bias's gradient is ``Σ_t G_t``. An
embedding lookup's gradient puts ``G_t`` in row ``id_t``: ``Σ_{t,s} [id_t = id_s] (G Gᵀ)_{ts}``.
A table used twice (a language model's output head tied to its input embedding) adds the
cross terms of its uses, e.g. head-lookup ``Σ_{t,s} G_head[s, id_t] (x_s · g_t)``. ``G`` comes from
a zero leaf added to each call's output and differentiated with the remaining parameters
(layer norms, convolutions, ...), whose per-example gradients are materialized as before.

A parameter takes the closed form only when every module that owns it is a plain ``nn.Linear`` or
``nn.Embedding``; one also used some other way (a custom head's ``x @ W.T``) would be missed,
so the first batch of each plan is checked against the plain gradient of its first example and
any mismatch falls back to materializing everything.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.func import grad, vmap

from forwardinf.core.embedding_grad import call_shapes, query_grads
from forwardinf.core.params import Params, stack
from forwardinf.data.inputs import batch_len, take

Objective = Callable[[Params, Any], Tensor]  # (params, one example) -> scalar


def squared_grad_norms(objective: Objective, params: Params, batch: Any, model: nn.Module,
                       budget: int, plan: dict | None = None) -> Tensor:
    """``[B]`` float64: ``||∇_θ objective(θ, z_b)||²`` for each example ``z_b`` of ``batch``.

    ``objective(p, example) -> scalar`` runs ``model`` through :func:`~forwardinf.core.params.bind`
    on one example. The batch is processed in chunks whose materialized per-example gradients
    fit ``budget`` bytes (at least one example). ``plan``: a dict the caller keeps across calls
    with the same objective and parameters: which parameters take the closed form, the zero
    leaves' shapes per input shape, and whether the closed form was checked.
    """
    plan = {} if plan is None else plan
    if "ghost" not in plan:
        plan["ghost"] = _ghost_modules(model, params)
    if plan["ghost"] and not plan.get("checked"):
        first = take(batch, slice(0, 1))
        closed = _closed_form(objective, params, first, model, plan)
        if not torch.allclose(closed, _materialized(objective, params, first, model), rtol=1e-3, atol=1e-30):
            plan["ghost"] = {}  # a use the closed form does not see: materialize everything
        plan["checked"] = True
    names = {n for roles in plan["ghost"].values() for n in roles.values()}
    size = sum(p.numel() * p.element_size() for k, p in params.items() if k not in names)
    step, n = int(max(1, budget // max(size, 1))), batch_len(batch)
    norms = _closed_form if plan["ghost"] else lambda o, p, b, m, _: _materialized(o, p, b, m)
    return torch.cat([norms(objective, params, take(batch, slice(s, s + step)), model, plan) for s in range(0, n, step)])


def _materialized(objective: Objective, params: Params, batch: Any, model: nn.Module) -> Tensor:
    """``[B]``: the norms of the materialized per-example gradients (``B x D`` floats at once)."""
    grads = query_grads(objective, stack(params, batch_len(batch)), batch, model)
    # vector_norm reduces in float32 without a squared copy of each [B, ...] gradient
    return torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads.values()]).double().pow(2).sum(0)


def _ghost_modules(model: nn.Module, params: Params) -> dict[nn.Module, dict[str, str]]:
    """``{module: {"weight" | "bias": parameter name}}`` for the plain ``nn.Linear`` / ``nn.Embedding``
    modules whose selected parameters are owned by such modules only."""
    plain = lambda m: (type(m).forward is nn.Linear.forward or _is_conv1d(m)  # noqa: E731
                       or (type(m).forward is nn.Embedding.forward and m.max_norm is None and not m.sparse
                           and not m.scale_grad_by_freq))
    name_of = {id(p): n for n, p in model.named_parameters() if n in params}
    owners: dict[int, list[nn.Module]] = {}
    for m in model.modules():
        for _, p in m.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(m)
    ghost: dict[nn.Module, dict[str, str]] = {}
    for m in model.modules():
        if not plain(m):
            continue
        for role in ("weight", "bias"):
            p = getattr(m, role, None)
            if isinstance(p, nn.Parameter) and id(p) in name_of and all(plain(o) for o in owners[id(p)]):
                ghost.setdefault(m, {})[role] = name_of[id(p)]
    return ghost


def _is_conv1d(m: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): ``x W + b`` with ``W [in, out]``, the same norms as a linear layer's."""
    return type(m).__name__ == "Conv1D" and type(m).__module__ == "transformers.pytorch_utils"


def _closed_form(objective: Objective, params: Params, batch: Any, model: nn.Module, plan: dict) -> Tensor:
    ghost = plan["ghost"]
    names = {n for roles in ghost.values() for n in roles.values()}
    rest = {k: v for k, v in params.items() if k not in names}  # materialized per example
    shapes = plan.setdefault("shapes", {})
    key = _shape_key(batch)
    if key not in shapes:
        shapes[key] = [shape for shape, _ in call_shapes(objective, stack(rest, 1), batch, list(ghost))]
    n = batch_len(batch)
    ref = next(iter(params.values()))
    zeros = [torch.zeros(n, *shape, dtype=ref.dtype, device=ref.device) for shape in shapes[key]]  # [n, 1, ..., out]

    called: list[nn.Module] = []  # the modules in call order (the function is traced once under vmap)

    def with_leaves(p: Params, leaves: list[Tensor], example: Any) -> tuple[Tensor, list[Tensor]]:
        pending, inputs = list(leaves), []

        def add_leaf(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> Tensor:
            called.append(module)
            inputs.append(args[0] if args else kwargs["input"])
            return output + pending.pop(0)

        handles = [m.register_forward_hook(add_leaf, with_kwargs=True) for m in ghost]
        try:
            return objective(p, example), inputs
        finally:
            for h in handles:
                h.remove()

    (grads, outs), inputs = vmap(grad(with_leaves, argnums=(0, 1), has_aux=True), in_dims=(None, 0, 0))(rest, zeros, batch)
    calls = list(zip(called, inputs))
    total = torch.zeros(n, dtype=torch.float64, device=ref.device)
    for g in grads.values():
        total += torch.linalg.vector_norm(g.flatten(1), dim=1).double().pow(2)
    uses: dict[str, list[tuple[str, nn.Module, Tensor, Tensor]]] = {}
    for (module, inp), out in zip(calls, outs):
        for role, name in ghost[module].items():
            uses.setdefault(name, []).append((role, module, inp, out))
    for group in uses.values():
        for i, u in enumerate(group):
            for j, v in enumerate(group[: i + 1]):
                total += (1.0 if i == j else 2.0) * _inner(u, v)
    return total


def _inner(u: tuple, v: tuple) -> Tensor:
    """``[B]``: ``<Δ_u, Δ_v>`` of two uses' gradient contributions to one parameter."""
    (role_u, mod_u, in_u, g_u), (role_v, mod_v, in_v, g_v) = u, v
    gu, gv = _rows(g_u), _rows(g_v)  # [B, T, out]
    if isinstance(mod_u, nn.Embedding):
        gu = _unpadded(mod_u, in_u, gu)
    if isinstance(mod_v, nn.Embedding):
        gv = _unpadded(mod_v, in_v, gv)
    if role_u == "bias":  # Δ = Σ_t G_t
        return (gu.sum(1) * gv.sum(1)).sum(1).double()
    lin_u, lin_v = not isinstance(mod_u, nn.Embedding), not isinstance(mod_v, nn.Embedding)
    if lin_u and lin_v:
        return ((_rows(in_u) @ _rows(in_v).mT) * (gu @ gv.mT)).sum((1, 2)).double()
    if not lin_u and not lin_v:
        same = in_u.reshape(in_u.shape[0], -1, 1) == in_v.reshape(in_v.shape[0], 1, -1)
        return ((gu @ gv.mT) * same).sum((1, 2)).double()
    if lin_v:  # the linear use first
        (mod_u, in_u, gu), (mod_v, in_v, gv) = (mod_v, in_v, gv), (mod_u, in_u, gu)
    ids = in_v.reshape(in_v.shape[0], 1, -1).expand(-1, gu.shape[1], -1)  # [B, T_u, T_v]
    return ((_rows(in_u) @ gv.mT) * gu.gather(2, ids)).sum((1, 2)).double()


def _rows(t: Tensor) -> Tensor:
    """``[B, ..., d]`` as ``[B, T, d]``."""
    return t.reshape(t.shape[0], -1, t.shape[-1])


def _unpadded(module: nn.Embedding, ids: Tensor, g: Tensor) -> Tensor:
    """The lookup's backward gives the padding row no gradient."""
    if module.padding_idx is None:
        return g
    return g.masked_fill((ids.reshape(ids.shape[0], -1) == module.padding_idx).unsqueeze(-1), 0)


def _shape_key(batch: Any) -> tuple:
    """The shapes and dtypes of one example's tensors (the batch's without the leading dim)."""
    if torch.is_tensor(batch):
        return (tuple(batch.shape[1:]), batch.dtype)
    if isinstance(batch, dict):
        return tuple((k, _shape_key(v)) for k, v in sorted(batch.items()))
    return tuple(_shape_key(v) for v in batch)
