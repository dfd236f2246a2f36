"""Message compression for adapter tensors: codecs and client-side error feedback.

Plain NumPy, no Flower: `fedllm_flwr.transport` turns what a codec encodes into
message records. Every codec works on the adapter flattened into one vector,
with the manifest (tensor names and shapes, in order) giving tensor boundaries.

| codec | payload per value | what is lost |
|---|---|---|
| `fp32` | 4 bytes | nothing |
| `fp16` | 2 bytes | fp16 rounding (default) |
| `int8` | 1 byte, plus one fp32 scale per tensor (or per row) | uniform rounding to 255 levels of max abs |
| `topk` | 6 bytes (int32 index + fp16 value) per kept value | all but the `topk_ratio` largest of each tensor |

On SmolLM2's LoRA (r=8 on q,v: 460,800 values in 120 tensors) that is 1.84 MB,
0.92 MB, 0.46 MB (+480 bytes of per-tensor scales, or +94 KB for 23,520 row scales) and, at
`topk_ratio=0.1`, 0.28 MB per message before Flower's framing.

Lossy codecs are meant for updates (the trained adapter minus the adapter the
client was sent), which is what clients send up. Whatever compression drops
from an update, `ErrorFeedback` keeps on the client and adds to its next one,
so dropped coordinates are delayed rather than lost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

Manifest = list[tuple[str, tuple[int, ...]]]

CODECS = ("fp32", "fp16", "int8", "topk")
#: Codecs that may carry a whole adapter (the server's downlink). Top-k of the
#: weights themselves would zero most of them.
DENSE_CODECS = ("fp32", "fp16", "int8")
LOSSY_CODECS = ("int8", "topk")
INT8_SCALES = ("tensor", "row")


def sizes_of(manifest: Manifest) -> list[int]:
    return [math.prod(shape) for _, shape in manifest]


@dataclass(frozen=True)
class Codec:
    """How adapter tensors are encoded for the wire."""

    name: str = "fp16"
    int8_scale: str = "tensor"
    """int8: one scale per tensor, or per row (first dimension) of each tensor."""
    topk_ratio: float = 0.1
    """topk: share of each tensor's values that is sent (at least one)."""

    def __post_init__(self) -> None:
        if self.name not in CODECS:
            raise ValueError(f"unknown codec {self.name!r}; use one of {', '.join(CODECS)}")
        if self.int8_scale not in INT8_SCALES:
            raise ValueError(f"int8 scale {self.int8_scale!r}: use tensor or row")
        if not 0.0 < self.topk_ratio <= 1.0:
            raise ValueError(f"topk ratio must be in (0, 1], got {self.topk_ratio}")

    @property
    def lossy(self) -> bool:
        return self.name in LOSSY_CODECS

    def describe(self) -> dict[str, str | float]:
        """The parameters a receiver needs, recorded in the message manifest."""
        out: dict[str, str | float] = {"codec": self.name}
        if self.name == "int8":
            out["int8-scale"] = self.int8_scale
        if self.name == "topk":
            out["topk-ratio"] = self.topk_ratio
        return out

    @classmethod
    def from_description(cls, values: dict) -> Codec:
        return cls(
            name=str(values.get("codec", "fp16")),
            int8_scale=str(values.get("int8-scale", "tensor")),
            topk_ratio=float(values.get("topk-ratio", 0.1)),
        )

    # -- encoding -------------------------------------------------------------

    def encode(self, flat: np.ndarray, manifest: Manifest) -> dict[str, np.ndarray]:
        """Named arrays that carry `flat` (fp32, the manifest's tensors in order)."""
        flat = np.asarray(flat, dtype=np.float32).reshape(-1)
        if flat.size != sum(sizes_of(manifest)):
            raise ValueError(f"{flat.size} values for a manifest of {sum(sizes_of(manifest))}")
        if self.name in ("fp32", "fp16"):
            return {"values": flat.astype(self.name.replace("fp", "float"))}
        if self.name == "int8":
            groups = self._groups(manifest)
            scales = np.maximum.reduceat(np.abs(flat), _starts(groups)) / 127.0 if flat.size else np.zeros(0)
            scales = scales.astype(np.float32)
            per_value = np.repeat(scales, groups)
            safe = np.where(per_value > 0, per_value, 1.0)
            quantized = np.clip(np.rint(flat / safe), -127, 127).astype(np.int8)
            return {"values": quantized, "scales": scales}
        indices, values = [], []
        offset = 0
        for size in sizes_of(manifest):
            part = flat[offset : offset + size]
            k = self.kept(size)
            top = np.argpartition(np.abs(part), size - k)[size - k :] if k < size else np.arange(size)
            top = np.sort(top)
            indices.append(top + offset)
            values.append(part[top])
            offset += size
        return {
            "indices": np.concatenate(indices).astype(np.int32) if indices else np.zeros(0, np.int32),
            "values": np.concatenate(values).astype(np.float16) if values else np.zeros(0, np.float16),
        }

    def decode(self, arrays: dict[str, np.ndarray], manifest: Manifest) -> np.ndarray:
        """The fp32 vector `arrays` encode; ValueError says what does not fit,
        including a value that is not finite once decoded (finite int8 values
        times finite scales can still leave fp32: 127 x 3e38 is inf)."""
        return _finite(self._decode(arrays, manifest), manifest)

    def _decode(self, arrays: dict[str, np.ndarray], manifest: Manifest) -> np.ndarray:
        """`decode` before its finiteness check."""
        total = sum(sizes_of(manifest))
        expected = {"fp32": {"values"}, "fp16": {"values"}, "int8": {"values", "scales"}, "topk": {"indices", "values"}}
        if set(arrays) != expected[self.name]:
            raise ValueError(f"codec {self.name} expects arrays {sorted(expected[self.name])}, got {sorted(arrays)}")
        values = arrays["values"]
        if values.ndim != 1:
            raise ValueError("encoded values must be one flat array")
        if self.name in ("fp32", "fp16"):
            if values.dtype not in (np.float16, np.float32):
                raise ValueError(f"dtype {values.dtype} (accepted for {self.name}: float16, float32)")
            _check_size(values.size, total, "packed array")
            return values.astype(np.float32)
        if self.name == "int8":
            scales = arrays["scales"]
            groups = self._groups(manifest)
            if values.dtype != np.int8:
                raise ValueError(f"int8 codec: values have dtype {values.dtype}")
            _check_size(values.size, total, "packed array")
            if scales.dtype != np.float32 or scales.shape != (len(groups),):
                raise ValueError(f"int8 codec: expected {len(groups)} float32 scales, got {scales.size} {scales.dtype}")
            if not np.isfinite(scales).all() or (scales < 0).any():
                raise ValueError("int8 codec: scales must be finite and non-negative")
            if (values == -128).any():
                raise ValueError("int8 codec: value -128 is outside the symmetric range")
            with np.errstate(over="ignore"):  # an overflow becomes inf, which `decode` refuses
                return values.astype(np.float32) * np.repeat(scales, groups)
        indices = arrays["indices"]
        count = sum(self.kept(size) for size in sizes_of(manifest))
        if indices.dtype != np.int32 or values.dtype != np.float16:
            raise ValueError(
                f"topk codec: expected int32 indices and float16 values, got {indices.dtype}, {values.dtype}"
            )
        if indices.shape != (count,) or values.shape != (count,):
            raise ValueError(f"topk codec: expected {count} indices and values, got {indices.size} and {values.size}")
        if count and (indices[0] < 0 or indices[-1] >= total or (np.diff(indices) <= 0).any()):
            raise ValueError(f"topk codec: indices must be increasing and within 0..{total - 1}")
        per_tensor = np.searchsorted(np.cumsum(sizes_of(manifest)), indices, side="right")
        if not np.array_equal(
            np.bincount(per_tensor, minlength=len(manifest)), [self.kept(s) for s in sizes_of(manifest)]
        ):
            raise ValueError("topk codec: the number of values per tensor does not match the ratio")
        out = np.zeros(total, dtype=np.float32)
        out[indices] = values.astype(np.float32)
        return out

    def kept(self, size: int) -> int:
        """topk: how many of a tensor's `size` values are sent."""
        return min(size, max(1, math.ceil(self.topk_ratio * size)))

    def _groups(self, manifest: Manifest) -> list[int]:
        """int8: the number of values under each scale, in order."""
        if self.int8_scale == "tensor":
            return sizes_of(manifest)
        groups: list[int] = []
        for _, shape in manifest:
            rows = shape[0] if len(shape) > 1 else 1
            groups.extend([math.prod(shape) // rows] * rows if rows else [])
        return groups


def _starts(groups: list[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(groups)[:-1]]).astype(np.int64)


def _check_size(got: int, want: int, what: str) -> None:
    if got != want:
        raise ValueError(f"{what} holds {got} values, the manifest {want}")


def _finite(flat: np.ndarray, manifest: Manifest) -> np.ndarray:
    if not np.isfinite(flat).all():
        bad = int(np.flatnonzero(~np.isfinite(flat))[0])
        name = manifest[int(np.searchsorted(np.cumsum(sizes_of(manifest)), bad, side="right"))][0]
        raise ValueError(f"{name}: non-finite values")
    return flat


class ErrorFeedback:
    """What lossy compression dropped from past updates, added to the next one.

    `compress(update)` returns the encoded arrays of update + residual and keeps
    the new residual: (update + residual) - decode(encoded). A client holds one
    `residual` vector the size of its adapter update (fp32).
    """

    def __init__(self, codec: Codec, residual: np.ndarray | None = None) -> None:
        self.codec = codec
        self.residual = residual

    def compress(self, update: np.ndarray, manifest: Manifest) -> dict[str, np.ndarray]:
        corrected = np.asarray(update, dtype=np.float32).reshape(-1)
        if self.residual is not None and self.residual.shape == corrected.shape:
            corrected = corrected + self.residual
        encoded = self.codec.encode(corrected, manifest)
        self.residual = corrected - self.codec.decode(encoded, manifest)
        return encoded


def codecs(cfg) -> tuple[Codec, Codec]:
    """(downlink, uplink) codecs of a `CompressionConfig`."""
    return (
        Codec(cfg.down, cfg.int8_scale, cfg.topk_ratio),
        Codec(cfg.up, cfg.int8_scale, cfg.topk_ratio),
    )
