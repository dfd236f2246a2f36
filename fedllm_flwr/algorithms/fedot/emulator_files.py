"""FedOT's emulator on the wire: its folder's files as message records, sent once to each node."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

from fedllm_flwr.keys import EMULATOR_FILES_KEY


def emulator_record(files: dict[str, bytes]) -> RecordDict:
    """A FedOT emulator folder's files as message records (each a uint8 array)."""
    arrays = ArrayRecord({name: Array(np.frombuffer(data, dtype=np.uint8)) for name, data in files.items()})
    return RecordDict({EMULATOR_FILES_KEY: arrays})


def emulator_files(content: RecordDict) -> dict[str, bytes] | None:
    """The emulator files a message carries, if any."""
    arrays = content.array_records.get(EMULATOR_FILES_KEY)
    if arrays is None:
        return None
    return {name: array.numpy().tobytes() for name, array in arrays.items()}
