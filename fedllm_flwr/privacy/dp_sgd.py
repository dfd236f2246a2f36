"""Record-level differential privacy at a site (`privacy=dp_sgd`): DP-SGD on the adapter.

No Flower here. Each step of a site's round (Abadi et al. 2016):

1. draws its records by Poisson sampling: each of the site's N records independently
   with probability q = (train.batch_size x train.grad_accum) / N, so a step may hold
   more or fewer records than the batch, or none (`poisson_steps`);
2. takes each drawn record's gradient of its own loss (an LM record's mean over its
   response tokens, a pair's loss, a prompt's group loss) on every trainable tensor,
   and scales it to L2 norm at most C = `privacy.clipping_norm` (all tensors as one
   vector);
3. adds N(0, (z C)^2) to the sum per coordinate and divides by the expected batch qN
   (not the drawn count, which would leak it): the gradient the optimizer steps with.

Every record thus moves a step by at most C / qN before the noise, whatever its loss,
and the site's epsilon is the subsampled Gaussian mechanism composed over every step it
takes (`privacy.ledger.DpLedger`, Opacus's RDP accountant). Whatever leaves the site
afterwards (the update, under any codec, strategy or SecAgg+) is post-processing.

Per-record gradients come from one backward pass per record. Opacus's GradSampleModule
(and its ghost clipping) computes them in one pass per batch from per-layer hooks, but
only for layers it has a sampler for, called with the batch first: DoRA's magnitude is
applied by its LoRA layer reading lora_A and lora_B's weights directly (their modules'
hooks never fire), and prompt methods' encoders (P-tuning's LSTM/MLP) need DP variants
of their layers. A record at a time is exact for every PEFT method and every task at
the cost of batching (measured in benchmarks/privacy.py: seconds per step against
non-private training).

The sampling and the noise draw from the operating system's entropy, never from the
run's seed: the server knows the seed, and noise it could regenerate protects nothing.
A private run therefore does not repeat bit for bit.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from fedllm_flwr.privacy.ledger import DpLedger


class OverBudget(Exception):
    """The round would take the site past `privacy.target_epsilon`: it sits out."""

    def __init__(self, spent: float, would_be: float, target: float) -> None:
        super().__init__(f"epsilon {would_be:.3f} after this round would pass the budget {target:g} "
                         f"(spent {spent:.3f})")  # fmt: skip
        self.spent, self.would_be, self.target = spent, would_be, target


def _secure_seed() -> int:
    return secrets.randbits(63)


@dataclass
class RecordDP:
    """A site's DP-SGD for one round: what `train_steps` asks for each step's gradient."""

    noise_multiplier: float
    clipping_norm: float
    expected_batch: float
    """qN: what a step's noisy sum is divided by."""
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(_secure_seed()))
    clipped: int = 0
    """Records whose gradient was scaled down to C so far."""

    def gradient(
        self, params: list[torch.Tensor], records: list[dict], loss_of: Callable[[dict], torch.Tensor],
        items_of: Callable[[dict], int],
    ) -> tuple[float, int]:  # fmt: skip
        """Set each of `params`' `.grad` to the step's private gradient over `records`
        (one batch per record, as `poisson_steps` yields them): the sum of their
        clipped gradients plus Gaussian noise, over the expected batch. Returns the mean
        of the records' losses (nan when none was drawn; it stays on the site) and how
        many records had something to learn from."""
        total = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        losses = []
        for record in records:
            if items_of(record) == 0:  # nothing to predict: a zero gradient, within any bound
                continue
            for p in params:
                p.grad = None
            loss = loss_of(record)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss.item()} of a record under privacy=dp_sgd")
            loss.backward()
            grads = [p.grad.float() if p.grad is not None else None for p in params]
            norm = math.sqrt(sum(float(g.double().square().sum()) for g in grads if g is not None))
            factor = min(1.0, self.clipping_norm / norm) if norm > 0 else 1.0
            self.clipped += int(factor < 1.0)
            for acc, g in zip(total, grads, strict=True):
                if g is not None:
                    acc.add_(g, alpha=factor)
            losses.append(float(loss.detach()))
        std = self.noise_multiplier * self.clipping_norm
        for p, acc in zip(params, total, strict=True):
            if std > 0:
                acc.add_(torch.normal(0.0, std, acc.shape, generator=self.generator))
            p.grad = (acc / self.expected_batch).to(p.dtype)
        return (float(np.mean(losses)) if losses else math.nan), len(losses)

    def scalar(self, differences: torch.Tensor) -> float:
        """A zeroth-order step's private directional derivative: each drawn record's
        two-point difference (its loss along +eps z less along -eps z, over 2 eps) clipped
        to [-C, C], summed, N(0, (z C)^2) added, over the expected batch (DP-ZO, Tang et
        al. 2024; DPZero, Zhang et al. 2024): one record moves it by at most C / qN."""
        differences = differences.double()
        self.clipped += int((differences.abs() > self.clipping_norm).sum())
        total = float(differences.clamp(-self.clipping_norm, self.clipping_norm).sum())
        std = self.noise_multiplier * self.clipping_norm
        if std > 0:
            total += float(torch.normal(0.0, std, (1,), generator=self.generator))
        return total / self.expected_batch


def sample_rate(batch: int, records: int) -> float:
    """q: a step's expected batch over the site's records (at most 1)."""
    if records <= 0:
        raise ValueError("privacy=dp_sgd: the site has no training records")
    return min(1.0, batch / records)


def plan_round(
    ledger: DpLedger, privacy, records: int, batch: int, steps: int, rounds: int,  # noqa: ANN001 - PrivacyConfig
) -> RecordDP:  # fmt: skip
    """This round's DP-SGD for a site with `records` training records, `batch` expected
    records a step and `steps` steps a round in a run of `rounds` rounds. The first round
    fixes the site's z (`privacy.noise_multiplier`, or under `privacy.target_epsilon` the
    z that spends exactly the budget over `rounds` x `steps` steps) and q in `ledger`.
    OverBudget when the round's steps would take the site past its budget
    (`privacy.max_epsilon`, else `privacy.target_epsilon`)."""
    if privacy.delta * records >= 1:  # delta ~ 1/N would let the mechanism release a whole record
        raise ValueError(f"privacy.delta={privacy.delta:g} is not below 1 / this site's {records} training records; "
                         "set it well below (the usual choice is under 1 / records)")  # fmt: skip
    if not ledger.started:
        ledger.sample_rate = sample_rate(batch, records)
        ledger.noise_multiplier = privacy.noise_multiplier
        if privacy.target_epsilon > 0:
            from opacus.accountants.utils import get_noise_multiplier

            ledger.noise_multiplier = float(get_noise_multiplier(
                target_epsilon=privacy.target_epsilon, target_delta=privacy.delta,
                sample_rate=ledger.sample_rate, steps=rounds * steps, accountant="rdp",
            ))  # fmt: skip
    if privacy.budget > 0:
        would_be = ledger.epsilon(privacy.delta, ledger.steps + steps)
        if would_be > privacy.budget:
            ledger.sat_out += 1
            raise OverBudget(ledger.epsilon(privacy.delta), would_be, privacy.budget)
    return RecordDP(ledger.noise_multiplier, privacy.clipping_norm, ledger.sample_rate * records)


def poisson_steps(data, rate: float, collate: Callable, pad_id: int, together: bool = False) -> Iterator:  # noqa: ANN001
    """An endless stream of steps, each the list of its Poisson-drawn records, each
    record collated alone (`collate([row], pad_id)`); `together`: the step's records as
    one batch, or None when none was drawn (zeroth-order steps score them all at once).
    `data` is a client's training set (`example(i)` is None for a record truncation
    drops: it is drawn, and adds nothing)."""
    rng = np.random.default_rng(_secure_seed())
    while True:
        drawn = np.flatnonzero(rng.random(len(data)) < rate)
        rows = [row for row in (data.example(int(i)) for i in drawn) if row is not None]
        if together:
            yield collate(rows, pad_id) if rows else None
        else:
            yield [collate([row], pad_id) for row in rows]


#: Reply metrics that read neither a record's content nor how many were drawn, which may
#: leave a site under privacy=dp_sgd; the rest (its loss, its token and drawn-record
#: counts, a task's figures) stay there. Seconds and memory follow the drawn count: a
#: timing side channel, outside the guarantee as it is outside DP-SGD's analysis.
RELEASED = frozenset({
    "num-examples", "seconds", "peak-memory-mb", "torch-threads", "partition-id",
    "lr", "model-load-seconds", "process-start-seconds", "model-layers", "model-parameters", "catch-up-seconds",
})  # fmt: skip


def released(metrics: dict, ledger: DpLedger, delta: float) -> dict:
    """The reply metrics of a DP-SGD round: the released ones and the site's budget."""
    out = {k: v for k, v in metrics.items() if k in RELEASED}
    out.update({"dp-epsilon": ledger.epsilon(delta), "dp-steps": ledger.steps,
                "dp-noise-multiplier": ledger.noise_multiplier, "dp-sample-rate": ledger.sample_rate})  # fmt: skip
    return out
