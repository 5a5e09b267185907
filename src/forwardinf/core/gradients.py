"""Gradients over a parameter subset: per-example gradients, Hessian-vector products, Hessians.

Everything works on a *functional loss* ``loss_fn(params, batch) -> Tensor[B]`` (per-example
losses with ``params``, a dict of tensors, swapped into a module; see :func:`functional_loss`)
and on *flat* vectors: a parameter dict ``{name: [*shape]}`` is laid out as one ``[D]`` vector
in the dict's key order (:func:`flatten` / :func:`unflatten`), so gradients of ``B`` examples
are a ``[B, D]`` matrix and ``K`` Hessian-vector products are ``[K, D]``.

Memory stays bounded by chunking: per-example gradients are produced ``batch_size`` examples at
a time (:func:`iter_grads`), and dataset-wide Hessian products accumulate over batches.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping

import torch
from torch import Tensor, nn
from torch.func import grad, vmap
from tqdm.auto import tqdm

from forwardinf.core.params import Params, bind, buffers_of
from forwardinf.data.inputs import batch_len, batches, to_device, unsqueeze

LossFn = Callable[[Params, Any], Tensor]  # (params, batch) -> per-example losses [B]


# -- functional losses -----------------------------------------------------------------------
def functional_loss(
    module: nn.Module,
    loss: Callable[[Callable[..., Any], Any], Tensor],
    state: Mapping[str, Tensor] | None = None,
) -> LossFn:
    """``(params, batch) -> loss(view, batch)`` where ``view`` runs ``module`` on ``params``.

    ``loss`` is any ``(model, batch) -> Tensor[B]`` (e.g. ``task.loss``). Parameters and buffers
    missing from ``params`` are taken from ``state`` (a state dict, e.g. a checkpoint) or, by
    default, from the module itself, detached, so only ``params`` are differentiated.
    The module is never modified (its train/eval flags decide dropout/BatchNorm behaviour).
    """
    if state is None:
        base = {**buffers_of(module), **{n: p.detach() for n, p in module.named_parameters()}}
    else:
        base = {n: t.detach() for n, t in state.items()}

    def loss_fn(params: Params, batch: Any) -> Tensor:
        return loss(bind(module, params, base), batch)

    return loss_fn


def last_layer(module: nn.Module) -> str:
    """Name of the last submodule (registration order) that owns trainable parameters itself.

    For the usual ``features -> classifier`` networks this is the output layer, e.g.
    ``"classifier.2"``; use it as a ``params`` pattern for last-layer variants.
    """
    name = None
    for n, m in module.named_modules():
        if any(p.requires_grad for p in m.parameters(recurse=False)):
            name = n
    if name is None:
        raise ValueError(f"{type(module).__name__} has no trainable parameters")
    return name


# -- flat vectors ----------------------------------------------------------------------------
def flatten(tensors: Mapping[str, Tensor], stacked: bool = False) -> Tensor:
    """One ``[D]`` vector (or ``[B, D]`` when every tensor has a leading dim ``B``), key order."""
    if stacked:
        return torch.cat([t.reshape(t.shape[0], -1) for t in tensors.values()], dim=1)
    return torch.cat([t.reshape(-1) for t in tensors.values()])


def unflatten(vec: Tensor, like: Mapping[str, Tensor]) -> Params:
    """Inverse of :func:`flatten` for one ``[D]`` vector: a dict shaped like ``like``."""
    out, start = {}, 0
    for k, t in like.items():
        n = t.numel()
        out[k] = vec[start:start + n].view(t.shape)
        start += n
    if start != vec.shape[-1]:
        raise ValueError(f"vector has {vec.shape[-1]} entries but the parameters have {start}")
    return out


def dim(params: Mapping[str, Tensor]) -> int:
    """``D``, the number of scalars in ``params``."""
    return sum(t.numel() for t in params.values())


# -- per-example gradients -------------------------------------------------------------------
def per_example_grads(loss_fn: LossFn, params: Params, batch: Any) -> Tensor:
    """``[B, D]``: the gradient of each example's loss w.r.t. ``params`` (vmap over grad).

    Each example is run as a batch of one, so the model must not mix examples (BatchNorm in
    eval mode is fine, in train mode it is not).
    """

    def one(p: Params, example: Any) -> Tensor:
        return loss_fn(p, unsqueeze(example)).sum()

    g = vmap(grad(one), in_dims=(None, 0))(params, batch)
    return flatten(g, stacked=True)


def iter_grads(
    loss_fn: LossFn,
    params: Params,
    dataset: Any,
    batch_size: int,
    device: torch.device,
    progress: bool = False,
    desc: str = "gradients",
) -> Iterator[tuple[int, Tensor]]:
    """``(start, G [b, D])`` per-example gradients over ``dataset`` in order, ``batch_size`` at a time."""
    with tqdm(total=len(dataset), desc=desc, disable=not progress, leave=False, unit="ex") as bar:
        for start, batch in batches(dataset, batch_size):
            g = per_example_grads(loss_fn, params, to_device(batch, device))
            bar.update(g.shape[0])
            yield start, g


def grad_matrix(loss_fn: LossFn, params: Params, dataset: Any, batch_size: int, device: torch.device,
                progress: bool = False, desc: str = "gradients") -> Tensor:
    """``[N, D]`` per-example gradients of the whole ``dataset`` (mind the memory: ``N * D`` floats)."""
    return torch.cat([g for _, g in iter_grads(loss_fn, params, dataset, batch_size, device, progress, desc)], 0)


# -- Hessian-vector products -----------------------------------------------------------------
def batch_hvp(loss_fn: LossFn, params: Params, batch: Any, vectors: Tensor) -> Tensor:
    """``[K, D]``: ``H v_k`` for each row of ``vectors [K, D]``, ``H`` the Hessian of the mean loss on ``batch``.

    Double backward (Pearlmutter): one graph of the gradient, then one batched backward pass
    for all ``K`` directions; per direction if an operation has no batching rule. On small
    models this is several times faster than ``torch.func`` forward-over-reverse, and as fast
    on convolutional ones.
    """
    flat = flatten(params).detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(unflatten(flat, params), batch).mean()
        (g,) = torch.autograd.grad(loss, flat, create_graph=True)
        if not g.requires_grad:  # the loss is linear in the parameters: zero curvature
            return torch.zeros_like(vectors)
        try:
            (hv,) = torch.autograd.grad(g, flat, vectors, retain_graph=True, is_grads_batched=True, allow_unused=True)
        except RuntimeError:
            hv = torch.stack([_or_zeros(torch.autograd.grad(g, flat, v, retain_graph=True, allow_unused=True)[0], v)
                              for v in vectors])
    return _or_zeros(hv, vectors)


def _or_zeros(t: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if t is None else t


def dataset_hvp(loss_fn: LossFn, params: Params, dataset: Any, vectors: Tensor, batch_size: int,
                device: torch.device) -> Tensor:
    """``[K, D]``: products with the Hessian of the mean loss over all of ``dataset``."""
    n, total = len(dataset), torch.zeros_like(vectors)
    for _, batch in batches(dataset, batch_size):
        batch = to_device(batch, device)
        total += batch_hvp(loss_fn, params, batch, vectors) * (batch_len(batch) / n)
    return total


def hessian(loss_fn: LossFn, params: Params, dataset: Any, batch_size: int, device: torch.device,
            chunk: int = 128, progress: bool = False) -> Tensor:
    """``[D, D]`` explicit Hessian of the mean loss over ``dataset``, ``chunk`` columns per sweep.

    Built from products with basis vectors, so memory is ``D^2`` plus one chunk of products;
    symmetrised to remove round-off asymmetry.
    """
    d = dim(params)
    ref = next(iter(params.values()))
    cols = []
    for start in tqdm(range(0, d, chunk), desc="hessian", disable=not progress, leave=False):
        idx = torch.arange(start, min(start + chunk, d), device=ref.device)
        basis = torch.zeros(len(idx), d, dtype=ref.dtype, device=ref.device)
        basis[torch.arange(len(idx)), idx] = 1
        cols.append(dataset_hvp(loss_fn, params, dataset, basis, batch_size, device))
    h = torch.cat(cols, 0)
    return (h + h.T) / 2


def lanczos_extremes(hvp: Callable[[Tensor], Tensor], d: int, steps: int = 40, seed: int = 0,
                     dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> tuple[float, float]:
    """``(θ_min, θ_max)``: extreme Ritz values of a symmetric operator ``hvp([1, D]) -> [1, D]``.

    ``steps`` Lanczos iterations with full reorthogonalisation (``steps`` products, ``steps x D``
    memory). Ritz values lie inside the spectrum and approach its ends from within, much faster
    than power iteration does for the smallest (possibly negative) eigenvalue.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(d, generator=gen, dtype=torch.float64)
    q = q / q.norm()
    basis: list[Tensor] = []
    alphas: list[float] = []
    betas: list[float] = []
    for _ in range(min(steps, d)):
        basis.append(q)
        w = hvp(q.to(device=device, dtype=dtype)[None])[0].double().cpu()
        alpha = float(w @ q)
        alphas.append(alpha)
        qs = torch.stack(basis)
        w = w - qs.T @ (qs @ w)  # full reorthogonalisation (twice is enough)
        w = w - qs.T @ (qs @ w)
        beta = float(w.norm())
        if not beta > 1e-10 * max(1.0, abs(alpha)):
            break  # an invariant subspace: the Ritz values are exact
        betas.append(beta)
        q = w / beta
    k = len(alphas)
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if k > 1:
        off = torch.tensor(betas[:k - 1], dtype=torch.float64)
        t = t + torch.diag(off, 1) + torch.diag(off, -1)
    ritz = torch.linalg.eigvalsh(t)
    return float(ritz[0]), float(ritz[-1])
