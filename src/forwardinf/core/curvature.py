"""Kronecker-factored curvature (K-FAC) of the mean training loss, and its damped inverse.

For a ``Linear`` or ``Conv2d`` layer with weights (and bias) ``W [out, in (+1)]``, the Fisher /
Gauss-Newton block of the mean training loss is approximated by ``S ⊗ A`` (Martens & Grosse
2015; convolutions as in Grosse & Martens 2016): ``A = E[a aᵀ]`` over the layer's inputs ``a``
(with a trailing 1 for the bias; for a convolution the unfolded patches, averaged over positions)
and ``S = E[g gᵀ]`` over the gradients ``g`` of each example's loss with respect to the layer's
outputs (summed over positions). One batched forward and backward pass over the training set
gives both: no per-example parameter gradients are formed.

``fisher="sampled"`` (classification batches ``(inputs, targets)`` or dicts with ``"targets"``)
draws the targets from the model's own softmax, the true Fisher, which equals the Gauss-Newton
matrix in expectation; ``"empirical"`` uses the given targets (any task).

Applying ``(S ⊗ A + λ I)⁻¹`` to a gradient ``V [out, in]`` uses the eigenbases of both factors:
``Q_S ((Q_Sᵀ V Q_A) / (s aᵀ + λ)) Q_Aᵀ`` (exact for the Kronecker product). The damping is
relative: ``λ = damping x`` the mean eigenvalue of the whole block-diagonal curvature, ``tr(G) / P``
over its ``P`` parameters (``scope="global"``, the default), so one ``damping`` means the same thing
for every model scale; ``scope="layer"`` scales each block by its own mean eigenvalue instead, and
``scope="type"`` by the mean eigenvalue of the blocks of its layer type (all convolutions, all
linear layers: the two kinds' Kronecker eigenvalues differ in scale and accuracy). One
global ``λ`` keeps the layers' relative curvature (a layer whose curvature is small is moved more),
as the exact damped inverse ``(G + λI)⁻¹`` would; per-layer damping flattens it. Measured on two
digits seeds held apart from the LDS evaluation (docs/method.md): global beats per-layer at every
damping tried (0.25, 0.5, 1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from forwardinf.core.params import Params, bind, buffers_of
from forwardinf.data.inputs import batch_len, batches, to_device

FISHERS = ("sampled", "empirical")
SCOPES = ("global", "layer", "type")
LossFn = Callable[[Callable[..., Any], Any], Tensor]  # (model, batch) -> per-example losses [B]


@dataclass
class Block:
    """One layer's Kronecker factors in eigen form: ``S = Q_S diag(s) Q_Sᵀ``, ``A = Q_A diag(a) Q_Aᵀ``."""

    module: str
    weight: str
    bias: str | None
    q_s: Tensor  # [out, out]
    s: Tensor  # [out]
    q_a: Tensor  # [in (+1), in (+1)]
    a: Tensor  # [in (+1)]
    corrected: Tensor | None = None  # [out, in (+1)]: EK-FAC's eigenvalues, replacing s aᵀ
    kind: str = ""  # the layer's type ("Linear", "Conv2d"), for scope="type" damping

    def eigenvalues(self) -> Tensor:
        """``[out, in (+1)]``: the block's eigenvalues in the Kronecker eigenbasis."""
        if self.corrected is not None:
            return self.corrected
        return self.s.clamp_min(0)[:, None] * self.a.clamp_min(0)[None, :]

    def mean_eigenvalue(self) -> float:
        return float(self.eigenvalues().mean())


def layer_of(model: nn.Module, params: Mapping[str, Tensor]) -> dict[str, tuple[nn.Module, str, str | None]]:
    """``{module name: (module, weight name, bias name or None)}`` for the layers ``params`` touch.

    Raises ``ValueError`` for a parameter outside a ``Linear`` / ungrouped ``Conv2d`` weight or bias.
    """
    out: dict[str, tuple[nn.Module, str, str | None]] = {}
    modules = dict(model.named_modules())
    for name in params:
        owner, _, leaf = name.rpartition(".")
        module = modules.get(owner)
        ok = isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1
                                                and not isinstance(module.padding, str))
        if not ok or leaf not in ("weight", "bias"):
            kind = type(module).__name__ if module is not None else "?"
            raise ValueError(f"K-FAC curvature covers Linear and Conv2d (groups=1, numeric padding) weights and "
                             f"biases; parameter {name!r} belongs to a {kind}: restrict params= to those layers")
        if owner not in out:
            prefix = f"{owner}." if owner else ""  # the model itself may be the layer
            weight, bias = prefix + "weight", prefix + "bias"
            if weight not in params:
                raise ValueError(f"K-FAC: {name!r} is selected without its layer's weight {weight!r}")
            out[owner] = (module, weight, bias if bias in params else None)
    return out


def _inputs(module: nn.Module, x: Tensor, bias: bool) -> Tensor:
    """``[B * positions, in (+1)]``: the layer's input vectors (unfolded patches for a convolution)."""
    if isinstance(module, nn.Conv2d):
        cols = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)  # [B, in*k*k, T]
        cols = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    else:
        cols = x.reshape(-1, x.shape[-1])
    if bias:
        cols = torch.cat([cols, torch.ones_like(cols[:, :1])], 1)
    return cols


def _outputs(module: nn.Module, g: Tensor) -> Tensor:
    """``[B * positions, out]``: output gradients (a convolution's positions flattened)."""
    if isinstance(module, nn.Conv2d):
        return g.flatten(2).transpose(1, 2).reshape(-1, g.shape[1])
    return g.reshape(-1, g.shape[-1])


def _sample_targets(model: Callable[..., Any], batch: Any, gen: torch.Generator) -> Any:
    """The batch with its targets drawn from the model's softmax (the true Fisher)."""
    if isinstance(batch, dict):
        inputs, targets = batch.get("inputs"), batch.get("targets")
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        inputs, targets = batch[0], batch[1]
    else:
        inputs = targets = None
    if not torch.is_tensor(targets) or targets.is_floating_point():
        raise ValueError("fisher='sampled' needs classification batches (inputs, class targets); use fisher='empirical'")
    with torch.no_grad():
        out = model(inputs)
        logits = out[0] if isinstance(out, (tuple, list)) else (out["logits"] if isinstance(out, Mapping) else out)
        probs = torch.softmax(logits.double(), -1).reshape(-1, logits.shape[-1]).cpu()
        drawn = torch.multinomial(probs, 1, generator=gen).view(targets.shape).to(targets)
    if isinstance(batch, dict):
        return {**batch, "targets": drawn}
    return type(batch)((batch[0], drawn, *batch[2:]))


def _layer_passes(model: nn.Module, loss: LossFn, params: Params, dataset: Any, batch_size: int,
                  device: torch.device, fisher: str, seed: int, progress: bool, desc: str) -> Iterator[tuple[int, dict]]:
    """``(B, {module name: (a [B, T, in (+1)], g [B, T, out])})`` per batch: each layer's inputs and
    the gradients of each example's loss with respect to its outputs (``T`` positions).

    A functional copy with detached leaves is differentiated: the model is never written to and
    only the layers' outputs get gradients.
    """
    layers = layer_of(model, params)
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    view = bind(model, leaves, buffers_of(model))
    captured: dict[str, list[Tensor]] = {}

    def hook_for(name: str, bias: bool) -> Callable:
        def hook(mod: nn.Module, inp: tuple, out: Tensor) -> None:
            captured[name] = [_inputs(mod, inp[0].detach(), bias), out]
        return hook

    hooks = [module.register_forward_hook(hook_for(name, bias is not None))
             for name, (module, _, bias) in layers.items()]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    try:
        with tqdm(total=len(dataset), desc=desc, disable=not progress, leave=False, unit="ex") as bar:
            for _, batch in batches(dataset, batch_size):
                batch = to_device(batch, device)
                if fisher == "sampled":
                    batch = _sample_targets(view, batch, gen)
                captured.clear()
                with torch.enable_grad():
                    total = loss(view, batch).sum()
                    outs = [captured[m][1] for m in layers]
                    grads = torch.autograd.grad(total, outs, allow_unused=True)
                n = batch_len(batch)
                out = {}
                for (name, (module, _, _)), o, g in zip(layers.items(), outs, grads):
                    g = torch.zeros_like(o) if g is None else g.detach()
                    out[name] = (captured[name][0].reshape(n, -1, captured[name][0].shape[-1]),
                                 _outputs(module, g).reshape(n, -1, o.shape[1] if isinstance(module, nn.Conv2d) else o.shape[-1]))
                yield n, out
                bar.update(n)
    finally:
        for h in hooks:
            h.remove()


def kfac(model: nn.Module, loss: LossFn, params: Params, dataset: Any, batch_size: int, device: torch.device,
         fisher: str = "empirical", correct: bool = False, seed: int = 0, progress: bool = False) -> list[Block]:
    """K-FAC blocks of the mean of ``loss`` over ``dataset`` for the layers ``params`` touch.

    ``loss(model, batch) -> [B]`` per-example losses (e.g. ``task.loss``); ``params``: the
    selected parameters (views of the model's). Call it with the model in eval mode; the model is
    not written to. ``correct=True``: EK-FAC (George et al. 2018): a second pass replaces the
    eigenvalues ``s aᵀ`` by the mean squared example gradient in the Kronecker eigenbasis.
    """
    if fisher not in FISHERS:
        raise ValueError(f"fisher={fisher!r}; expected one of {FISHERS}")
    layers = layer_of(model, params)
    sums: dict[str, list[Any]] = {m: [0.0, 0.0] for m in layers}  # A, S
    n = 0
    for b, per_layer in _layer_passes(model, loss, params, dataset, batch_size, device, fisher, seed, progress,
                                      "K-FAC factors"):
        for name, (a, g) in per_layer.items():
            a, g = a.double(), g.double().flatten(0, 1)
            sums[name][0] = sums[name][0] + torch.einsum("bti,btj->ij", a, a) / a.shape[1]  # mean over positions
            sums[name][1] = sums[name][1] + g.T @ g  # summed over positions
        n += b
    if n == 0:
        raise ValueError("K-FAC: the training set is empty")
    blocks = {}
    for name, (module, weight, bias) in layers.items():
        a_mat, s_mat = sums[name][0] / n, sums[name][1] / n
        if not (torch.isfinite(a_mat).all() and torch.isfinite(s_mat).all()):
            raise FloatingPointError(f"K-FAC: non-finite curvature factors for layer {name!r}")
        a, q_a = torch.linalg.eigh(a_mat)
        s, q_s = torch.linalg.eigh(s_mat)
        dtype = params[weight].dtype
        blocks[name] = Block(name, weight, bias, q_s.to(dtype), s.to(dtype), q_a.to(dtype), a.to(dtype),
                             kind=type(module).__name__)
    if correct:
        lam = {m: 0.0 for m in layers}
        for _, per_layer in _layer_passes(model, loss, params, dataset, batch_size, device, fisher, seed, progress,
                                          "EK-FAC eigenvalues"):
            for name, (a, g) in per_layer.items():
                u, v = g @ blocks[name].q_s, a @ blocks[name].q_a  # [B, T, out], [B, T, in]
                if u.shape[1] == 1:  # one position: the example's rotated gradient is an outer product
                    lam[name] = lam[name] + (u[:, 0].double() ** 2).T @ (v[:, 0].double() ** 2)
                else:
                    for c in range(0, u.shape[0], _EXAMPLE_CHUNK):  # [chunk, out, in] temporaries
                        r = torch.einsum("bto,bti->boi", u[c:c + _EXAMPLE_CHUNK], v[c:c + _EXAMPLE_CHUNK])
                        lam[name] = lam[name] + r.double().pow(2).sum(0)
        for name, b in blocks.items():
            b.corrected = (lam[name] / n).to(b.s.dtype)
    return list(blocks.values())


_EXAMPLE_CHUNK = 16


def damping_of(blocks: list[Block], damping: float, scope: str = "global") -> list[float]:
    """Each block's absolute ``λ``: ``damping x`` the mean eigenvalue of all blocks together
    (``"global"``: ``tr(G) / P``), of the block itself (``"layer"``) or of the blocks of its layer
    type (``"type"``)."""
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r}; expected one of {SCOPES}")
    if scope == "layer":
        return [damping * b.mean_eigenvalue() for b in blocks]
    group = (lambda b: b.kind) if scope == "type" else (lambda b: "")  # noqa: E731
    total: dict[str, float] = {}
    count: dict[str, int] = {}
    for b in blocks:
        total[group(b)] = total.get(group(b), 0.0) + float(b.eigenvalues().sum())
        count[group(b)] = count.get(group(b), 0) + b.eigenvalues().numel()
    return [damping * total[group(b)] / count[group(b)] for b in blocks]


def precondition(blocks: list[Block], grads: Params, damping: float, stacked: bool = True,
                 scope: str = "global") -> Params:
    """``(G + λ I)⁻¹ grads`` blockwise, ``λ`` from :func:`damping_of` (``damping x`` the mean
    eigenvalue of all blocks, or of each block with ``scope="layer"``).

    ``grads``: ``{name: [Q, *shape]}`` (``stacked``) or ``{name: [*shape]}``; returns the same
    layout. Parameters outside ``blocks`` are not allowed (see :func:`layer_of`).
    """
    out: Params = {}
    for b, lam in zip(blocks, damping_of(blocks, damping, scope)):
        w = grads[b.weight]
        if not stacked:
            w = w.unsqueeze(0)
        v = w.flatten(2) if w.ndim > 2 else w  # [Q, out, in]
        if b.bias is not None:
            bias = grads[b.bias] if stacked else grads[b.bias].unsqueeze(0)
            v = torch.cat([v, bias.unsqueeze(-1)], -1)
        if not lam > 0:
            raise ValueError(f"K-FAC: damping {damping!r} gives a non-positive λ={lam:.3g} for layer {b.module!r} "
                             "(zero curvature: is the layer's input or output gradient always zero?)")
        rotated = b.q_s.T @ v @ b.q_a
        rotated = rotated / (b.eigenvalues() + lam)
        v = b.q_s @ rotated @ b.q_a.T
        if b.bias is not None:
            out[b.bias] = v[..., -1] if stacked else v[0, ..., -1]
            v = v[..., :-1]
        shape = grads[b.weight].shape
        out[b.weight] = v.reshape(shape)
    return out


def gauss_newton_product(model: nn.Module, loss: LossFn, params: Params, dataset: Any, batch_size: int,
                         device: torch.device, vectors: Params) -> Params:
    """``G v_q`` for each ``v_q`` of ``vectors`` (``{name: [Q, *shape]}``): the Gauss-Newton matrix
    of the mean of ``loss`` over ``dataset``, ``G = mean_i J_iᵀ H_i J_i`` (``J_i``: the Jacobian
    of example ``i``'s output in ``params``, ``H_i``: the Hessian of its loss in that output).

    One sweep: per batch a forward with ``Q`` tangents (``J v``), the loss's output Hessian on
    them, and one backward shared by the ``Q`` vectors (``Jᵀ``). The model must return one tensor
    (the output ``loss`` reads through ``model(inputs)``); it is never written to.
    """
    from torch.func import grad, jvp, vjp, vmap

    buffers = buffers_of(model)
    vectors = {k: vectors[k] for k in params}  # jvp wants the primals' structure, key order included
    total = {k: torch.zeros_like(v) for k, v in vectors.items()}
    n = 0
    for _, batch in batches(dataset, batch_size):
        batch = to_device(batch, device)
        inputs = batch["inputs"] if isinstance(batch, dict) else batch[0]
        f = lambda p: bind(model, p, buffers)(inputs)  # noqa: E731 - outputs [B, ...]
        out, pullback = vjp(f, params)
        loss_of_output = lambda z: loss(lambda *_: z, batch).sum()  # noqa: E731 - the loss on fixed outputs

        def product(v: Params) -> Params:
            jv = jvp(f, (params,), (v,))[1]
            hjv = jvp(grad(loss_of_output), (out,), (jv,))[1]
            return pullback(hjv)[0]

        with torch.enable_grad():
            part = vmap(product)(vectors)
        total = {k: total[k] + part[k].detach() for k in total}
        n += batch_len(batch)
    return {k: v / n for k, v in total.items()}


def refine(blocks: list[Block], grads: Params, damping: float, iterations: int, product: Callable[[Params], Params],
           scope: str = "global") -> Params:
    """``(G + λI)⁻¹ grads`` by ``iterations`` steps of preconditioned conjugate gradients, with the
    K-FAC inverse as preconditioner and first guess (``iterations=0``: :func:`precondition`).

    ``grads``: ``{name: [Q, *shape]}``, one system per query; ``product(v) -> G v`` for stacked
    ``v`` (:func:`gauss_newton_product`); ``λ``: :func:`damping_of` (global scope: the exact
    system has one ``λ``). Each iteration costs one ``product``: a sweep over the training set.
    """
    lam = damping_of(blocks, damping, scope)[0]
    pre = lambda v: precondition(blocks, v, damping, True, scope)  # noqa: E731

    def dot(a: Params, b: Params) -> Tensor:  # [Q]
        return sum((a[k].double() * b[k].double()).flatten(1).sum(1) for k in a)

    def axpy(a: Params, scale: Tensor, b: Params) -> Params:  # a + scale[q] * b
        return {k: a[k] + scale.to(a[k].dtype).view(-1, *[1] * (a[k].ndim - 1)) * b[k] for k in a}

    x = pre(grads)
    if iterations <= 0:
        return x
    gx = product(x)
    r = {k: grads[k] - gx[k] - lam * x[k] for k in grads}
    z = pre(r)
    p, rz = z, dot(r, z)
    for it in range(iterations):
        gp = product(p)
        ap = {k: gp[k] + lam * p[k] for k in p}
        alpha = rz / dot(p, ap).clamp_min(1e-300)
        x = axpy(x, alpha, p)
        if it == iterations - 1:
            break
        r = axpy(r, -alpha, ap)
        z = pre(r)
        rz_new = dot(r, z)
        p = axpy(z, rz_new / rz.clamp_min(1e-300), p)
        rz = rz_new
    return x
