"""Row caches that outgrow RAM: shards of safetensors, read memory-mapped.

A sharded table is a folder of ``shard-00000.safetensors``, ``shard-00001.safetensors``, ... each holding the
same tensor names for a run of consecutive rows (first dimension), plus ``index.json`` (rows per shard),
written last: a folder without it is an unfinished cache and is rebuilt. Shards are written one at a time by
`ShardWriter`, so building a cache holds one shard in memory, and `ShardedTable` maps each file
(copy-on-write ``numpy.memmap``, pages read on first touch) and copies out only the rows a batch asks for.

The safetensors layout is read directly (8-byte little-endian header length, JSON header, then the raw
little-endian buffer), because ``safetensors.safe_open`` copies whole tensors out of the file.
"""

from __future__ import annotations

import bisect
import json
import struct
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes

from safeio import atomic_write_bytes, atomic_write_json

INDEX = "index.json"
_NUMPY = {
    "F16": np.float16,
    "F32": np.float32,
    "F64": np.float64,
    "BF16": np.int16,  # viewed back as torch.bfloat16
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class ShardWriter:
    """Append row chunks (dicts of tensors with the same names and row counts) as shards, then `finish`."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.rows: list[int] = []
        self.names: list[str] | None = None

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        counts = {name: t.shape[0] for name, t in tensors.items()}
        if len(set(counts.values())) != 1:
            raise ValueError(f"a shard's tensors must have the same number of rows, got {counts}")
        if self.names is not None and sorted(tensors) != self.names:
            raise ValueError(f"shard {len(self.rows)} has tensors {sorted(tensors)}, the first had {self.names}")
        self.names = sorted(tensors)
        path = self.folder / f"shard-{len(self.rows):05d}.safetensors"
        atomic_write_bytes(path, safetensors_bytes({k: v.contiguous().cpu() for k, v in tensors.items()}))
        self.rows.append(next(iter(counts.values())))

    def finish(self) -> Path:
        """Write ``index.json`` (the mark of a finished cache); returns the folder."""
        atomic_write_json(self.folder / INDEX, {"rows": self.rows, "names": self.names or []})
        return self.folder


def is_finished(folder: str | Path) -> bool:
    return (Path(folder) / INDEX).is_file()


def _map_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as a memory-mapped numpy array (no data read yet)."""
    with path.open("rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    header.pop("__metadata__", None)
    buffer = np.memmap(path, dtype=np.uint8, mode="c", offset=8 + n) if path.stat().st_size > 8 + n else None
    out = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        raw = buffer[begin:end] if buffer is not None else np.zeros(0, np.uint8)
        out[name] = (raw.view(_NUMPY[info["dtype"]]).reshape(info["shape"]), info["dtype"])
    return out


class ShardedTable:
    """Rows of a finished sharded cache: ``table[name][idx]`` copies rows ``idx`` (any order) into a tensor."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not is_finished(self.folder):
            raise FileNotFoundError(f"{self.folder} is not a finished sharded cache (no {INDEX})")
        index = json.loads((self.folder / INDEX).read_text())
        self.shard_rows: list[int] = index["rows"]
        self.names: list[str] = index["names"]
        self.starts = np.cumsum([0, *self.shard_rows]).tolist()
        self._maps: dict[int, dict] = {}

    def __len__(self) -> int:
        return self.starts[-1]

    def _shard(self, s: int) -> dict:
        if s not in self._maps:
            self._maps[s] = _map_safetensors(self.folder / f"shard-{s:05d}.safetensors")
        return self._maps[s]

    def rows(self, name: str, idx) -> list[torch.Tensor]:
        """Row ``i`` of tensor ``name`` for each ``i`` in ``idx``, each copied out of its shard."""
        out = []
        for i in torch.as_tensor(idx).reshape(-1).tolist():
            if not 0 <= i < len(self):
                raise IndexError(f"row {i} of a {len(self)}-row cache {self.folder}")
            s = bisect.bisect_right(self.starts, i) - 1
            array, dtype = self._shard(s)[name]
            row = torch.from_numpy(np.array(array[i - self.starts[s]]))
            out.append(row.view(torch.bfloat16) if dtype == "BF16" else row)
        return out

    def __getitem__(self, name: str) -> ShardedColumn:
        if name not in self.names:
            raise KeyError(f"{self.folder} has no tensor {name!r} (has {self.names})")
        return ShardedColumn(self, name)


class ShardedColumn:
    """One tensor name of a `ShardedTable`, indexed like a tensor's first dimension (rows of equal shape)."""

    def __init__(self, table: ShardedTable, name: str, limit: int | None = None):
        self.table, self.name = table, name
        self.limit = len(table) if limit is None else min(limit, len(table))

    def __len__(self) -> int:
        return self.limit

    @property
    def shape(self) -> tuple[int, ...]:
        """(rows, *the first shard's row shape), read off the file header without copying data."""
        array, _ = self.table._shard(0)[self.name]
        return (self.limit, *array.shape[1:])

    def head(self, n: int) -> ShardedColumn:
        """The first ``n`` rows."""
        return ShardedColumn(self.table, self.name, n)

    def __getitem__(self, idx) -> torch.Tensor:
        idx = torch.as_tensor(idx)
        if idx.numel() and int(idx.max()) >= self.limit:
            raise IndexError(f"row {int(idx.max())} of {self.limit} rows of {self.name!r}")
        rows = self.table.rows(self.name, idx)
        return torch.stack(rows) if idx.ndim else rows[0]
