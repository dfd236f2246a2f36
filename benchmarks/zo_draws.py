"""What drawing z costs, and whether every CPU kernel torch picks here draws the same z.

    python benchmarks/zo_draws.py [--out benchmarks/results/zo_draws.json] [--threads 1]
        [--repeats-adapter 20] [--repeats-full 3]

Times one perturbation, w += s z(seed) over every tuned tensor (a MeZO step does three,
catching up one a pair), on SmolLM2-135M's shapes built in memory (no model is loaded):
the default adapter (LoRA r=8 on q_proj and v_proj, 460,800 values) and every base
weight (zo.params=full, 134.5M). Three ways:

- `numpy-float64` (`fedllm_flwr.algorithms.zo.mezo.perturb`): z from numpy's PCG64 in float64, the step
  s z rounded once to float32, then added; the same bits under every CPU kernel;
- `torch-float64`: the same with torch's float64 normal kernel (also the same bits under
  every kernel seen here, slower);
- `torch-float32`: the draw `perturb` replaced, z in float32 added with
  `add_(z, alpha=s)`, whose normal kernel and fused multiply-add differ between
  torch's default and AVX2 builds.

Also times the weights' fingerprint (`fedllm_flwr.algorithms.zo.mezo.weights_fingerprint`: what the
server computes once a round and a node once a message). Then applies the same three
steps to a few tensors in a subprocess per CPU capability this machine offers
(ATEN_CPU_CAPABILITY=default, avx2, avx512) and records the digest of the result, both
ways. Medians over the repeats, on `--threads` torch threads. Prints one JSON object and
writes it to `--out`. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedllm_flwr.algorithms.zo.mezo import perturb, weights_fingerprint  # noqa: E402

# SmolLM2-135M: hidden 576, 30 layers, 9 query and 3 key/value heads of 64, MLP 1536, vocabulary 49,152.
HIDDEN, LAYERS, KV, MLP, VOCAB = 576, 30, 192, 1536, 49152


def adapter_shapes() -> list[tuple[int, ...]]:
    """LoRA r=8 on q_proj (576 -> 576) and v_proj (576 -> 192): 30 x 15,360 = 460,800 values."""
    return [s for _ in range(LAYERS) for s in ((8, HIDDEN), (HIDDEN, 8), (8, HIDDEN), (KV, 8))]


def full_shapes() -> list[tuple[int, ...]]:
    """Every base weight in the model's order (the head is tied to the embedding): 134,515,008."""
    layer = [(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN), (MLP, HIDDEN), (MLP, HIDDEN),
             (HIDDEN, MLP), (HIDDEN,), (HIDDEN,)]  # fmt: skip
    return [(VOCAB, HIDDEN), *[s for _ in range(LAYERS) for s in layer], (HIDDEN,)]


@torch.no_grad()
def perturb_torch_float64(params: list[torch.Tensor], seed: int, scale: float) -> None:
    generator = torch.Generator().manual_seed(int(seed))
    for param in params:
        z = torch.randn(param.shape, generator=generator, dtype=torch.float64)
        param.add_(z.mul_(scale).to(torch.float32))


@torch.no_grad()
def perturb_torch_float32(params: list[torch.Tensor], seed: int, scale: float) -> None:
    """The draw `perturb` replaced."""
    generator = torch.Generator().manual_seed(int(seed))
    for param in params:
        param.add_(torch.randn(param.shape, generator=generator, dtype=torch.float32), alpha=scale)


WAYS = {"numpy-float64": perturb, "torch-float64": perturb_torch_float64, "torch-float32": perturb_torch_float32}


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return round(statistics.median(times), 4)


def costs(shapes: list[tuple[int, ...]], repeats: int) -> dict:
    params = [torch.zeros(s) for s in shapes]
    out = {"values": sum(p.numel() for p in params), "tensors": len(params)}
    for name, fn in WAYS.items():
        out[f"perturb-seconds-{name}"] = median_seconds(lambda fn=fn: fn(params, 12345, 1e-3), repeats)
    before = out["perturb-seconds-torch-float32"]  # the draw `perturb` replaced
    for name in ("numpy-float64", "torch-float64"):
        out[f"times-torch-float32-{name}"] = round(out[f"perturb-seconds-{name}"] / before, 2)
    out["fingerprint-seconds"] = median_seconds(lambda: weights_fingerprint(params), repeats)
    return out


AGREEMENT = """
import hashlib, json, sys, torch
sys.path[:0] = [{root!r}, {here!r}]
from zo_draws import WAYS
out = {{"capability": torch.backends.cpu.get_cpu_capability()}}
for name, fn in WAYS.items():
    params = [torch.zeros(64, 48), torch.full((1000,), 0.5), torch.zeros(7)]
    for seed, scale in ((3, 1e-3), (9, -2.5e-4), (3, 7e-5)):
        fn(params, seed, scale)
    out[name] = hashlib.sha1(b"".join(p.numpy().tobytes() for p in params)).hexdigest()[:16]
print(json.dumps(out))
"""


def agreement() -> dict:
    """Per CPU capability torch can run here, the digest of the same steps applied both ways."""
    capabilities = ["default", "avx2", "avx512"]
    best = torch.backends.cpu.get_cpu_capability().lower()
    capabilities = capabilities[: capabilities.index(best) + 1] if best in capabilities else ["default"]
    out = {}
    for capability in capabilities:
        env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
        script = AGREEMENT.format(root=str(ROOT), here=str(ROOT / "benchmarks"))
        run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
        out[capability] = json.loads(run.stdout)
    for name in WAYS:
        out[f"{name}-agrees"] = len({v[name] for k, v in out.items() if isinstance(v, dict)}) == 1
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "zo_draws.json"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats-adapter", type=int, default=20)
    parser.add_argument("--repeats-full", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = {
        "torch": torch.__version__,
        "numpy": np.__version__,
        "machine": platform.machine(),
        "processor": _cpu_name(),
        "cpu-capability": torch.backends.cpu.get_cpu_capability(),
        "threads": args.threads,
        "load-average-at-start": [round(x, 2) for x in os.getloadavg()],  # other work on the machine
        "adapter": costs(adapter_shapes(), args.repeats_adapter),
        "full": costs(full_shapes(), args.repeats_full),
        "agreement": agreement(),
    }
    text = json.dumps(result, indent=2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")
    print(text)


def _cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")


if __name__ == "__main__":
    main()
