"""A streaming safetensors writer: the header first, then each tensor's bytes as it arrives.

``safetensors.torch.save_file`` needs every tensor in memory at once (and serialises a second copy);
a converter that moves one tensor at a time writes the header from the known shapes and dtypes, then
appends tensors in the same order. The file is the standard format (8-byte little-endian header length,
JSON header padded with spaces to a multiple of 8, contiguous little-endian data).
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import BinaryIO, Dict, List, Optional, Sequence, Tuple

import torch

DTYPE_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    """Bytes of a tensor of ``shape`` and ``dtype``."""
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


class StreamingSafetensorsWriter:
    """``with StreamingSafetensorsWriter(path, [(name, shape, dtype), ...]) as w: w.write(name, tensor)``.

    Tensors must be written in the declared order with the declared shapes; they are cast to the declared
    dtype. Closing checks that every declared tensor was written.
    """

    def __init__(self, path: Path, layout: Sequence[Tuple[str, Sequence[int], torch.dtype]],
                 metadata: Optional[Dict[str, str]] = None) -> None:
        self.path = Path(path)
        self.layout: List[Tuple[str, Tuple[int, ...], torch.dtype]] = [(n, tuple(int(s) for s in sh), d)
                                                                       for n, sh, d in layout]
        header: Dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for name, shape, dtype in self.layout:
            if dtype not in DTYPE_CODES:
                raise ValueError(f"{name}: dtype {dtype} cannot be stored in safetensors")
            size = nbytes(shape, dtype)
            header[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self.total_bytes = offset
        self._file: BinaryIO = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(blob)))
        self._file.write(blob)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor`` as the next declared entry ``name`` (cast to its declared dtype)."""
        if self._next >= len(self.layout):
            raise ValueError(f"{name}: more tensors written than declared")
        want_name, shape, dtype = self.layout[self._next]
        if name != want_name:
            raise ValueError(f"expected tensor {want_name!r} next, got {name!r}")
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name}: shape {list(tensor.shape)} differs from the declared {list(shape)}")
        data = tensor.detach().to(device="cpu", dtype=dtype).contiguous()
        self._file.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
        self._next += 1

    def close(self) -> None:
        self._file.close()
        if self._next != len(self.layout):
            raise ValueError(f"{self.path}: {len(self.layout) - self._next} declared tensors were not written "
                             f"(next: {self.layout[self._next][0]!r})")

    def __enter__(self) -> "StreamingSafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._file.close()
