"""Reading checkpoints, one tensor at a time, and writing safetensors files, one tensor at a time.

- :class:`TensorStore`: name -> tensor, loaded lazily from ``model.safetensors``, the shards listed in
  ``model.safetensors.index.json``, or ``pytorch_model.bin`` (:func:`open_store`); shapes are known
  without reading data.
- :func:`read_config`: ``config.json`` of a checkpoint directory (transformers' ``inf`` objects decoded).
- :func:`compare_keys`: the keys and shapes a config implies against those a checkpoint holds.
- :class:`StreamingSafetensorsWriter`: the header first (from the known shapes and dtypes), then each
  tensor's bytes as it arrives. ``safetensors.torch.save_file`` needs every tensor in memory at once (and
  serialises a second copy); this writes the standard format (8-byte little-endian header length, JSON
  header padded with spaces to a multiple of 8, contiguous little-endian data).

Every problem with a checkpoint raises :class:`CheckpointError` (a ``ValueError``) with a one-line message.
"""
from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path
from typing import BinaryIO, Dict, List, Optional, Sequence, Tuple

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted; the message names the problem in one line."""


# --- reading tensors -------------------------------------------------------------------------------

class TensorStore:
    """Name → tensor, loaded lazily one at a time. ``shapes`` is known without reading any data."""

    shapes: Dict[str, Tuple[int, ...]]

    def get(self, name: str) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def rename(self, old: str, new: str) -> None:
        self._aliases[new] = self._aliases.pop(old, old)
        self.shapes[new] = self.shapes.pop(old)

    def _source_name(self, name: str) -> str:
        return self._aliases.get(name, name)


class SafetensorsStore(TensorStore):
    """One or several ``.safetensors`` files, memory-mapped."""

    def __init__(self, files: List[Path]) -> None:
        from safetensors import safe_open
        self._handles, self._where, self.shapes, self._aliases = [], {}, {}, {}
        for path in files:
            try:
                handle = safe_open(str(path), framework="pt")
                names = list(handle.keys())
                shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in names}
            except Exception as exc:
                raise CheckpointError(f"cannot read {path.name}: {_one_line(exc)} (truncated or not a safetensors file?)")
            self._handles.append(handle)
            for name in names:
                self._where[name] = handle
            self.shapes.update(shapes)

    def get(self, name: str) -> torch.Tensor:
        src = self._source_name(name)
        try:
            return self._where[src].get_tensor(src)
        except Exception as exc:
            raise CheckpointError(f"cannot read tensor {src!r}: {_one_line(exc)}")


class TorchBinStore(TensorStore):
    """A ``pytorch_model.bin`` state dict, memory-mapped where the file format allows it."""

    def __init__(self, path: Path) -> None:
        self._aliases = {}
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:
            try:  # the legacy (non-zip) format cannot be memory-mapped
                state = torch.load(str(path), map_location="cpu", weights_only=True)
            except Exception:
                raise CheckpointError(f"cannot read {path.name}: {_one_line(exc)} (truncated or not a torch file?)")
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{path.name} does not hold a state dict of tensors")
        self._state = state
        self.shapes = {name: tuple(t.shape) for name, t in state.items()}

    def get(self, name: str) -> torch.Tensor:
        return self._state[self._source_name(name)]


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def open_store(directory: Path) -> TensorStore:
    index = directory / "model.safetensors.index.json"
    single = directory / "model.safetensors"
    binary = directory / "pytorch_model.bin"
    if index.exists():
        data = _read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index.name} has no 'weight_map'")
        files = sorted(set(weight_map.values()))
        missing = [name for name in files if not (directory / name).exists()]
        if missing:
            raise CheckpointError(f"shard {missing[0]} listed in {index.name} is missing")
        return SafetensorsStore([directory / name for name in files])
    if single.exists():
        return SafetensorsStore([single])
    if binary.exists():
        return TorchBinStore(binary)
    raise CheckpointError(f"no weights in {directory}: expected model.safetensors, "
                          "model.safetensors.index.json or pytorch_model.bin")


_SPECIAL_FLOATS = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}


def _decode_floats(obj):
    """transformers writes ``inf`` as ``{"__float__": "Infinity"}``; turn such objects back into floats."""
    if isinstance(obj, dict):
        if set(obj) == {"__float__"} and obj["__float__"] in _SPECIAL_FLOATS:
            return _SPECIAL_FLOATS[obj["__float__"]]
        return {key: _decode_floats(val) for key, val in obj.items()}
    if isinstance(obj, list):
        return [_decode_floats(val) for val in obj]
    return obj


def _read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            return _decode_floats(json.load(f))
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found")
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path.name}: {_one_line(exc)}")


# --- configs and keys --------------------------------------------------------------------------

def read_config(path) -> Tuple[Path, dict]:
    """``(directory, config.json as a dict)`` of a checkpoint directory; ``CheckpointError`` naming the problem."""
    directory = Path(path)
    if not directory.exists():
        raise CheckpointError(f"{directory} does not exist")
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory")
    cfg = _read_json(directory / "config.json")
    if not isinstance(cfg, dict):
        raise CheckpointError("config.json is not a JSON object")
    return directory, cfg


MAX_SIZE = 2 ** 24  # the largest size field (vocabulary, width, layers, heads, ...) a config may give


def get_int(cfg: dict, key: str, default: Optional[int] = None, minimum: int = 1, maximum: int = MAX_SIZE) -> int:
    """``cfg[key]`` as an integer in ``[minimum, maximum]``; ``CheckpointError`` naming the key otherwise."""
    value = cfg.get(key, default)
    if value is None:
        raise CheckpointError(f"config.json has no {key!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or int(value) != value:
        raise CheckpointError(f"config.json: {key}={_short(value)} is not an integer")
    if not minimum <= value <= maximum:
        raise CheckpointError(f"config.json: {key}={int(value)} is outside [{minimum}, {maximum}]")
    return int(value)


def get_float(cfg: dict, key: str, default: Optional[float] = None, positive: bool = True) -> float:
    """``cfg[key]`` as a finite float (positive unless ``positive=False``); ``CheckpointError`` naming the key."""
    value = cfg.get(key, default)
    if value is None:
        raise CheckpointError(f"config.json has no {key!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CheckpointError(f"config.json: {key}={_short(value)} is not a finite number")
    if positive and value <= 0:
        raise CheckpointError(f"config.json: {key}={value} must be positive")
    return float(value)


def get_bool(cfg: dict, key: str, default: bool) -> bool:
    """``cfg[key]`` as a bool (JSON true/false only); ``CheckpointError`` naming the key otherwise."""
    value = cfg.get(key, default)
    if not isinstance(value, bool):
        raise CheckpointError(f"config.json: {key}={_short(value)} is not true or false")
    return value


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def stored_layers(names) -> int:
    """The number of blocks a checkpoint's tensor names hold (1 + the largest ``layers.N.`` index; 0 if none)."""
    found = [int(m[1]) for name in names if (m := LAYER_INDEX.search(name))]
    return max(found) + 1 if found else 0


def compare_keys(want: Dict[str, Tuple[int, ...]], have: Dict[str, Tuple[int, ...]]) -> None:
    """Every key of ``want`` is in ``have`` with its shape, and nothing else is; ``CheckpointError`` otherwise."""
    missing = [k for k in want if k not in have]
    unexpected = [k for k in have if k not in want]
    if missing:
        raise CheckpointError(f"missing key {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if unexpected:
        raise CheckpointError(f"unexpected key {unexpected[0]!r}"
                              + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    for key, shape in want.items():
        if tuple(have[key]) != shape:
            raise CheckpointError(f"shape mismatch for {key!r}: checkpoint has {list(have[key])}, the config implies "
                                  f"{list(shape)}")


# --- writing safetensors -------------------------------------------------------------------------

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
