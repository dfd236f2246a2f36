"""Zeroth-order fine-tuning with seeds from a shared pool (MeZO steps, FedKSeed's messages).

MeZO (Malladi et al. 2023) estimates the gradient along a random direction z from
two forward passes, g = (L(w + eps z) - L(w - eps z)) / (2 eps), and steps
w <- w - lr g z. z is never stored: it is drawn again from its seed. FedKSeed (Qin et
al. 2024) draws the seeds from a pool of K fixed by the run's seed, so one step is
an (index into the pool, coefficient) pair, a client's round a handful of pairs, and
every node that applies the same pairs in the same order holds the same weights, bit
for bit.

Memory: what inference needs (no activations kept for a backward pass, no optimizer
state). Tuning an adapter, each perturbation is undone exactly from a copy of the
adapter (adding and then subtracting eps z does not give the same bits back, in bf16
or in fp32). Tuning every base weight (`exact=False`), no copy is kept: the
perturbation is undone by drawing z again, as MeZO does, which leaves last-bit
differences in the node's local weights only; the global weights every node shares
come from `apply_steps`, which is exact. No Flower.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch

Loss = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]
T = TypeVar("T")


def seed_pool(seed: int, size: int) -> np.ndarray:
    """The run's K candidate seeds (int64), the same on every node of a run with this `seed`."""
    if size < 1:
        raise ValueError(f"a seed pool needs at least one seed, got {size}")
    return np.random.default_rng([seed, 0x2E0]).integers(0, 2**62, size=size, dtype=np.int64)


def pool_id(pool: np.ndarray) -> str:
    """A short fingerprint of a pool: a reply names the pool its indices point into."""
    return hashlib.sha1(np.ascontiguousarray(pool, dtype=np.int64).tobytes()).hexdigest()[:16]


@dataclass(frozen=True)
class SeedPool:
    """The run's seed pool and its fingerprint, built once (`SeedPool.of`) and passed to
    every step that draws from it: the zo plug-in holds one per run on the server and one
    per message on a node (`fedllm_flwr.algorithms.zo.algorithm.Zo.pool`)."""

    seeds: np.ndarray
    id: str

    @classmethod
    def of(cls, seed: int, size: int) -> SeedPool:
        seeds = seed_pool(seed, size)
        return cls(seeds, pool_id(seeds))


def tuned_tensors(model: torch.nn.Module, params: str) -> dict[str, torch.Tensor]:
    """The tensors `zo.params` tunes (`adapter`: the trainable ones; `full`: the base
    weights, by their transformers names), in the model's own parameter order: the one
    order z is drawn over them in, on the server and on every node."""
    if params == "full":
        from fedllm_flwr.algorithms.zo.full_weights import base_weights

        return base_weights(model)
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def in_draw_order(tensors: Mapping[str, T], order: Sequence[str]) -> list[T]:
    """The values of `tensors` in `order` (`tuned_tensors`' names), whatever order the
    mapping has: z(seed) is one stream drawn tensor after tensor, so the same steps
    applied to the tensors in another order (a checkpoint's, which is sorted) give other
    weights. ValueError when the names are not the model's."""
    if set(tensors) != set(order):
        missing, extra = sorted(set(order) - set(tensors))[:2], sorted(set(tensors) - set(order))[:2]
        raise ValueError(f"the tuned tensors are not the model's: missing {missing}, unexpected {extra}")
    return [tensors[name] for name in order]


@torch.no_grad()
def perturb(params: list[torch.Tensor], seed: int, scale: float) -> None:
    """params += scale * z(seed), z standard normal, drawn on the CPU tensor by tensor in
    the order given, so that every node, on any CPU or device, adds the same bits.

    torch picks its CPU kernels by what the CPU offers, and two of them would differ:
    its float32 normal kernel (AVX2's vectorised one against the default's: over a third
    of the draws) and `add_(z, alpha=scale)`, which AVX2 fuses into one multiply-add. So
    z comes from numpy's PCG64 generator in float64 (integer arithmetic and a table for
    almost every draw, no CPU dispatch), and the step scale * z is rounded to float32 and
    then added: the multiply, the rounding and the addition each one correctly rounded
    operation, whatever the vector width. A GPU node
    draws on the CPU too (a CUDA generator would give another z) and moves each step to
    the device. The docs (features/zeroth-order.md, and the results of
    benchmarks/zo_draws.py) say what this costs and which platforms were seen to agree."""
    draws = np.random.Generator(np.random.PCG64(int(seed)))
    for param in params:
        z = torch.from_numpy(draws.standard_normal(param.numel())).view(param.shape)
        step = z.mul_(scale).to(torch.float32)
        param.add_(step.to(param.device))


@torch.no_grad()
def restore(params: list[torch.Tensor], saved: list[torch.Tensor]) -> None:
    for param, value in zip(params, saved, strict=True):
        param.copy_(value)


Estimate = Callable[[torch.Tensor, torch.Tensor, float], float]
"""(losses along +eps z, along -eps z, eps) -> g: the batch's two losses, or (privacy=dp_sgd)
each record's, which `RecordDP.scalar` clips and noises (`private_estimate`)."""


def plain_estimate(plus: torch.Tensor, minus: torch.Tensor, eps: float) -> float:
    return (float(plus) - float(minus)) / (2 * eps)


def private_estimate(private) -> Estimate:  # noqa: ANN001 - a privacy.dp_sgd.RecordDP
    """The estimate of privacy=dp_sgd: per-record differences, clipped and noised."""
    return lambda plus, minus, eps: private.scalar((plus.double() - minus.double()) / (2 * eps))


def _mean_loss(plus: torch.Tensor, minus: torch.Tensor) -> float:
    return (float(plus.float().mean()) + float(minus.float().mean())) / 2


@torch.no_grad()
def two_point(
    model: torch.nn.Module, params: list[torch.Tensor], batch: dict[str, torch.Tensor], loss_fn: Loss, seed: int,
    eps: float, estimate: Estimate = plain_estimate,
) -> tuple[float, float]:  # fmt: skip
    """(g, mean of the two losses): the two-point estimate of the directional
    derivative of the loss along z(seed). The parameters end as they began, bit for bit."""
    saved = [p.detach().clone() for p in params]
    perturb(params, seed, eps)
    plus = loss_fn(model, batch)
    restore(params, saved)
    perturb(params, seed, -eps)
    minus = loss_fn(model, batch)
    restore(params, saved)
    return estimate(plus, minus, eps), _mean_loss(plus, minus)


@torch.no_grad()
def step_in_place(
    model: torch.nn.Module, params: list[torch.Tensor], batch: dict[str, torch.Tensor], loss_fn: Loss, seed: int,
    eps: float, lr: float, estimate: Estimate = plain_estimate,
) -> tuple[float, float]:  # fmt: skip
    """MeZO's step with no copy of `params`: +eps z, loss, -2 eps z, loss, then one
    pass that both undoes the perturbation and steps (+(eps - lr g) z). (g, mean loss);
    a non-finite g only undoes the perturbation."""
    perturb(params, seed, eps)
    plus = loss_fn(model, batch)
    perturb(params, seed, -2 * eps)
    minus = loss_fn(model, batch)
    g = estimate(plus, minus, eps)
    perturb(params, seed, eps - lr * g if math.isfinite(g) else eps)
    return g, _mean_loss(plus, minus)


def weights_fingerprint(tensors: Iterable[torch.Tensor | np.ndarray]) -> str:
    """A short fingerprint of weights given in draw order (`in_draw_order`): sha1 of each
    tensor's dtype, shape and bytes. The server sends that of the global weights with
    every message, and a node compares its own (`check_weights`)."""
    digest = hashlib.sha1()
    for tensor in tensors:
        t = torch.from_numpy(np.ascontiguousarray(tensor)) if isinstance(tensor, np.ndarray) else tensor.detach()
        t = t.cpu().contiguous()
        digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:20]


def check_weights(tensors: Iterable[torch.Tensor], expected: str, what: str) -> None:
    """ValueError, saying what differs and why it likely does, when the weights `what`
    (in draw order) are not those of fingerprint `expected` (the server's)."""
    held = weights_fingerprint(tensors)
    if held != expected:
        raise ValueError(
            f"this node's copy of the global {what} differs from the server's after the same steps (fingerprint "
            f"{held}, the server's {expected}): z was drawn differently here (another torch version or a platform "
            "the docs do not list as agreeing) or the copy was changed on this node; the message is refused "
            "rather than trained on another model"
        )


def apply_steps(params: list[torch.Tensor], pool: np.ndarray, steps: Iterable[tuple[int, float]]) -> None:
    """w <- w - c z(pool[i]) for each (index i, coefficient c), in order: a round of
    the federation, or a node catching up on the rounds it missed. `params` in the
    order z is drawn over them (`in_draw_order`)."""
    for index, coefficient in steps:
        perturb(params, int(pool[index]), -float(coefficient))


@dataclass
class ZoRound:
    """What a client's zeroth-order round produced."""

    coefficients: dict[int, float] = field(default_factory=dict)
    """Pool index -> the sum of lr * g over this round's steps that drew its seed."""
    loss: float = math.nan
    """Mean over the steps of the mean of their two losses."""
    steps: int = 0
    skipped: int = 0
    """Steps whose losses were not finite (no update taken)."""
    seconds: float = 0.0


def zo_train(
    model: torch.nn.Module,
    params: list[torch.Tensor],
    batches: Iterator[dict[str, torch.Tensor]],
    pool: np.ndarray,
    draw: np.random.Generator,
    steps: int,
    lr: Callable[[int], float],
    eps: float,
    loss_fn: Loss,
    exact: bool = True,
    private=None,  # noqa: ANN001 - a privacy.dp_sgd.RecordDP
) -> ZoRound:
    """`steps` MeZO steps, each on the next batch along the seed of a pool index drawn
    with `draw`; `lr(k)` is step k's learning rate. The parameters end updated.
    `exact=False`: no copy of `params` (`step_in_place`), for tuning every base weight.

    `private` (privacy=dp_sgd): each batch holds a step's Poisson-drawn records (None when
    none was drawn), `loss_fn` gives each record's loss, and g is `private.scalar` of their
    differences; a step with no record steps along its noise alone."""
    started = time.perf_counter()
    out, losses = ZoRound(), []
    estimate = private_estimate(private) if private is not None else plain_estimate
    for k in range(steps):
        batch = next(batches)
        index = int(draw.integers(len(pool)))
        if batch is None:  # a private step that drew no record
            g, loss = private.scalar(torch.zeros(0)), math.nan
            if not exact:
                perturb(params, int(pool[index]), -lr(k) * g)
        elif exact:
            g, loss = two_point(model, params, batch, loss_fn, int(pool[index]), eps, estimate)
        else:
            g, loss = step_in_place(model, params, batch, loss_fn, int(pool[index]), eps, lr(k), estimate)
        if not math.isfinite(g) or (batch is not None and not math.isfinite(loss)):
            out.skipped += 1
            continue
        coefficient = lr(k) * g
        if exact:
            apply_steps(params, pool, [(index, coefficient)])
        out.coefficients[index] = out.coefficients.get(index, 0.0) + coefficient
        if math.isfinite(loss):
            losses.append(loss)
    out.steps, out.loss = steps, (float(np.mean(losses)) if losses else math.nan)
    out.seconds = time.perf_counter() - started
    return out
