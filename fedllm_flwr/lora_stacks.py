"""The merged delta of strategy=stacking (FLoRA), as the server and every node hold it.

Per LoRA module the delta is a sum of parts, each keyed by the round that made it:

- a round's stack: the clients' factors side by side, B_cat diag(w) A_cat with
  w = p_k on each of client k's r_k ranks, so that its product is sum_k p_k B_k A_k;
- a compaction: when a module's stacked rank would pass min(in, out), the server
  re-factors all its parts by a QR at rank min(in, out), B diag(w) A = Q_b (R_b A)
  when out is the smaller, (B R_a^T) Q_a^T when in is (B diag(w) = Q_b R_b,
  A^T = Q_a R_a): the same product, up to rounding. It lists the rounds it covers
  and takes the place of their parts.

A part's A (R x in) and B (out x R) are kept and sent in the downlink's wire type
(fp16, or fp32 under compression.down=fp32), every row of A and column of B scaled to
unit norm, and w (R, fp32) carries the scale: the client's weight times the two norms.
Folding p_k into fp16 B would underflow with many clients (1/200 x 1e-4 is ~5e-7,
deep in fp16's subnormals); unit vectors sit in fp16's normal range whatever the scale.

Only the server computes parts (stacks, compactions). A node keeps what it is sent and
`receive`s it exactly as the server does, so every node holds the server's parts bit
for bit, and `merged_factors` (w applied in fp32, elementwise) gives both the same
delta. Plain NumPy: no Flower, no torch.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

Part = dict[str, np.ndarray]
"""One round's part: "<module>/A", "<module>/B", "<module>/w" and, for a
compaction, "<module>/rounds" (int64: the rounds it covers), per LoRA module."""
Parts = dict[int, Part]
"""Round -> its part: everything one party holds."""

FIELDS = ("A", "B", "w", "rounds")


def module_of(key: str) -> str:
    """The LoRA layer's module path of an adapter tensor name (`...q_proj.lora_A.weight`)."""
    return key.split(".lora_A.")[0].split(".lora_B.")[0]


def _split(key: str) -> tuple[str, str]:
    module, field = key.rsplit("/", 1)
    return module, field


def stack_part(module: str, a_list: list[np.ndarray], b_list: list[np.ndarray], weights, wire) -> Part:
    """Client k's A_k (r_k x in) and B_k (out x r_k), weighted p_k (`weights`), as one
    stacked part whose A and B are of dtype `wire`."""
    a = np.concatenate([np.asarray(x, np.float64) for x in a_list], axis=0)
    b = np.concatenate([np.asarray(x, np.float64) for x in b_list], axis=1)
    w = np.repeat(np.asarray(weights, np.float64), [x.shape[0] for x in a_list])
    return _unit_part(module, a, b, w, wire)


def _unit_part(module: str, a: np.ndarray, b: np.ndarray, w: np.ndarray, wire) -> Part:
    """B diag(w) A with each rank's vectors of unit norm and their norms moved into w (fp32)."""
    norm_a, norm_b = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=0)
    a = a / np.where(norm_a > 0, norm_a, 1.0)[:, None]  # a zero vector stays zero (and its weight 0)
    b = b / np.where(norm_b > 0, norm_b, 1.0)[None, :]
    return {
        f"{module}/A": a.astype(wire),
        f"{module}/B": b.astype(wire),
        f"{module}/w": (w * norm_a * norm_b).astype(np.float32),
    }


def parts_of(flat: Mapping[str, np.ndarray]) -> Parts:
    """Parts from their flat form, "<round>/<module>/<field>" -> array (messages, node state)."""
    parts: Parts = {}
    for key, value in flat.items():
        done, name = key.split("/", 1)
        parts.setdefault(int(done), {})[name] = value
    return parts


def flat_of(parts: Parts) -> dict[str, np.ndarray]:
    """The flat form `parts_of` reads, rounds in order."""
    return {f"{t}/{k}": v for t, part in sorted(parts.items()) for k, v in part.items()}


class HeldStacks:
    """The parts one party (the server, a node) holds, and what the delta they make is."""

    def __init__(self, parts: Parts | None = None) -> None:
        self.parts: Parts = parts if parts is not None else {}

    def modules(self) -> list[str]:
        return sorted({_split(k)[0] for part in self.parts.values() for k in part})

    def _of(self, module: str) -> list[tuple[int, dict[str, np.ndarray]]]:
        """The module's (round, {field: array}) parts, in round order."""
        out = []
        for t, part in sorted(self.parts.items()):
            fields = {f: part[f"{module}/{f}"] for f in FIELDS if f"{module}/{f}" in part}
            if fields:
                out.append((t, fields))
        return out

    def rounds_of(self, module: str) -> set[int]:
        """The rounds whose stacks the module's parts hold (a compaction holds several)."""
        return {int(r) for t, f in self._of(module) for r in f.get("rounds", [t])}

    def rounds_held(self) -> int:
        """How many rounds' stacks every module holds: what ROUNDS_HELD_KEY checks."""
        modules = self.modules()
        return len(set.intersection(*(self.rounds_of(m) for m in modules))) if modules else 0

    def rank(self, module: str) -> int:
        return sum(f["A"].shape[0] for _, f in self._of(module))

    def max_rank(self) -> int:
        """The largest rank a module holds: the exported adapter's `r`."""
        return max((self.rank(m) for m in self.modules()), default=0)

    def receive(self, parts: Parts) -> None:
        """Take `parts` (a message's, or the server's new ones), in round order: each
        module's part replaces what the module held of the rounds it covers (a round
        sent twice, or every round a compaction re-factored)."""
        for t, part in sorted(parts.items()):
            for module in sorted({_split(k)[0] for k in part}):
                covered = {int(r) for r in part.get(f"{module}/rounds", [t])}
                for held in [h for h in self.parts if h in covered]:
                    self.parts[held] = {k: v for k, v in self.parts[held].items() if _split(k)[0] != module}
                    if not self.parts[held]:
                        del self.parts[held]
                fields = {k: v for k, v in part.items() if _split(k)[0] == module}
                self.parts.setdefault(t, {}).update(fields)

    def compact(self, server_round: int, wire) -> list[str]:
        """The server's step after adding a round's stack: every module whose rank now
        passes min(in, out) is re-factored at rank min(in, out) (see the module's
        docstring), as a part of `server_round`. Returns the modules compacted."""
        done = []
        for module in self.modules():
            parts = self._of(module)
            # In fp64 from the held (wire-type) factors: what every node holds too.
            a = np.concatenate([f["A"].astype(np.float64) for _, f in parts], axis=0)
            b = np.concatenate([f["B"].astype(np.float64) for _, f in parts], axis=1)
            w = np.concatenate([f["w"].astype(np.float64) for _, f in parts])
            fan_out, fan_in = b.shape[0], a.shape[1]
            if a.shape[0] <= min(fan_in, fan_out):
                continue
            if fan_out <= fan_in:
                q_b, r_b = np.linalg.qr(b * w)  # B diag(w) = Q_b R_b: Q_b out x out, R_b out x R
                new_b, new_a = q_b, r_b @ a
            else:
                q_a, r_a = np.linalg.qr(a.T)  # A^T = Q_a R_a: Q_a in x in, R_a in x R
                new_b, new_a = (b * w) @ r_a.T, q_a.T
            part = _unit_part(module, new_a, new_b, np.ones(new_a.shape[0]), wire)
            part[f"{module}/rounds"] = np.array(sorted(self.rounds_of(module)), np.int64)
            self.receive({server_round: part})
            done.append(module)
        return done

    def merged_factors(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Module path -> (A, B diag(w)) in fp32, all its parts side by side in round
        order: the product is the merged delta (before the LoRA scaling)."""
        out = {}
        for module in self.modules():
            parts = [f for _, f in self._of(module)]
            a = np.concatenate([f["A"].astype(np.float32) for f in parts], axis=0)
            b = np.concatenate([f["B"].astype(np.float32) * f["w"].astype(np.float32)[None, :] for f in parts], axis=1)
            out[module] = (a, b)
        return out
