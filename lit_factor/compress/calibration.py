"""Calibration: what data-aware projections need to know about each targeted layer, gathered in one pass.

For every targeted linear layer (an ``nn.Linear``, or a staged ``SwitchableLinear``) forward hooks accumulate,
over ``samples`` training examples:

* the input second moment ``C = E[x x^T]`` (float64, ``in x in``), over real tokens only: padding positions are
  dropped with the batch's attention mask where the layer's input has the mask's shape;
* with ``fisher=True``, the empirical Fisher information of each output row, ``f_i = E_batches[sum_j g_ij^2]``
  with g the task-loss gradient of the layer's weight (FWSVD). Gradients come from ``torch.autograd.grad``, so no
  parameter's ``.grad`` is touched and training is not disturbed.

The model runs in eval mode (no dropout noise in the statistics) on its own device, and is put back in the mode
it was in. Under DDP each rank takes a disjoint share of the same calibration examples and the sums are
all-reduced, so every rank ends with identical statistics and projects identically.

The result feeds :class:`lit_factor.factorize.base.ProjectionStats`; see :mod:`lit_factor.factorize.datawise` for
the projections that use it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from lit_factor.compress.switchable import SwitchableLinear
from lit_factor.factorize.base import ProjectionStats

#: seed of the calibration subset (the same examples on every rank and in every run)
CALIBRATION_SEED = 0


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def calibration_loader(datamodule, samples: int, batch_size: int | None = None) -> DataLoader:
    """This rank's share of ``samples`` training examples (a fixed random subset), as a plain DataLoader.

    Built from the datamodule's train dataloader's dataset and collate function. The global RNG is saved and
    restored around creating that dataloader, so calibrating does not change the training run's randomness.
    """
    if samples < 1:
        raise ValueError(f"calibration_samples={samples} must be >= 1")
    # Data work is CPU work: inside Lightning's configure_model the default device is the GPU, and a CPU
    # generator there fails ("Expected a 'cuda' device type for generator").
    with torch.device("cpu"), torch.random.fork_rng(devices=[]):
        train = datamodule.train_dataloader()
        chosen = torch.randperm(len(train.dataset), generator=torch.Generator().manual_seed(CALIBRATION_SEED))
    dataset, chosen = train.dataset, chosen[:samples]
    rank, world = _dist()
    return DataLoader(Subset(dataset, chosen[rank::world].tolist()), batch_size=batch_size or train.batch_size,
                      shuffle=False, collate_fn=train.collate_fn)


def _weight(module: nn.Module) -> Tensor:
    """The dense weight a layer's Fisher information is taken of (``SwitchableLinear``: its dense path)."""
    return module.dense.weight if isinstance(module, SwitchableLinear) else module.weight


class _Accumulator:
    """Forward hooks summing x^T x per layer; layers fed the same tensor (Q, K, V) share one product."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.sums: dict[str, Tensor] = {}
        self.tokens: dict[str, int] = {}
        self.mask: Tensor | None = None
        self._cache: dict[tuple, tuple[Tensor, int]] = {}
        self._handles = [m.register_forward_hook(self._hook(p)) for p, m in modules.items()]

    def _hook(self, path: str):
        def hook(module, args, output):
            x = args[0].detach()
            key = (x.data_ptr(), tuple(x.shape))
            if key not in self._cache:
                rows = x[self.mask] if self.mask is not None and x.shape[:-1] == self.mask.shape else x.flatten(0, -2)
                rows = rows.to(torch.float64)
                self._cache[key] = (rows.T @ rows, rows.shape[0])
            product, count = self._cache[key]
            self.sums[path] = self.sums[path] + product if path in self.sums else product.clone()
            self.tokens[path] = self.tokens.get(path, 0) + count
        return hook

    def next_batch(self, mask: Tensor | None) -> None:
        self._cache.clear()
        self.mask = None if mask is None else mask.bool()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _all_reduce(tensors: list[Tensor]) -> None:
    if _dist()[1] > 1:
        for t in tensors:
            torch.distributed.all_reduce(t)


def calibrate(model: nn.Module, paths: Iterable[str], batches: Iterable[dict], *,
              forward: Callable[[dict], object], fisher: bool = False) -> dict[str, ProjectionStats]:
    """Input second moments (and Fisher row weights) of the layers at ``paths`` over ``batches``.

    ``forward(batch)`` runs the model on one batch (already on the model's device) and returns an output with
    ``.loss`` (needed with ``fisher=True``). Batches are moved to the device of the model's first parameter.
    """
    modules = {p: model.get_submodule(p) for p in paths}
    device = next(model.parameters()).device
    was_training = model.training
    acc = _Accumulator(modules)
    weights = {p: _weight(m) for p, m in modules.items()}
    fisher_sums = {p: torch.zeros(w.shape[0], dtype=torch.float64, device=device) for p, w in weights.items()}
    n_batches = torch.zeros((), dtype=torch.float64, device=device)
    model.eval()
    try:
        for batch in batches:
            batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
            acc.next_batch(batch.get("attention_mask"))
            with torch.set_grad_enabled(fisher):
                out = forward(batch)
                if fisher:
                    grads = torch.autograd.grad(out.loss, list(weights.values()), allow_unused=True)
                    for p, g in zip(weights, grads, strict=True):
                        if g is not None:
                            fisher_sums[p] += g.to(torch.float64).pow(2).sum(-1)
            n_batches += 1
    finally:
        acc.remove()
        model.train(was_training)
    return _finish(acc, fisher_sums if fisher else None, n_batches, modules)


def _finish(acc: _Accumulator, fisher_sums: dict[str, Tensor] | None, n_batches: Tensor,
            modules: dict[str, nn.Module]) -> dict[str, ProjectionStats]:
    """All-reduce the sums across ranks and turn them into means."""
    missing = [p for p in modules if p not in acc.sums]
    if missing:
        raise RuntimeError(f"calibration: layer {missing[0]!r} never ran (is it used by the model's forward?)")
    tokens = torch.tensor([acc.tokens[p] for p in modules], dtype=torch.float64, device=n_batches.device)
    # In module order, the same on every rank (all_reduce pairs tensors by call order).
    _all_reduce([*(acc.sums[p] for p in modules), tokens, n_batches, *(fisher_sums or {}).values()])
    stats = {}
    for i, p in enumerate(modules):
        cov = acc.sums[p] / tokens[i].clamp_min(1)
        rows = fisher_sums[p] / n_batches.clamp_min(1) if fisher_sums is not None else None
        stats[p] = ProjectionStats(input_cov=cov, row_weights=rows)
    return stats
