"""Writing DST safely (docs/safety.md): refuse a destination that would lose anything, refuse a disk without
room, hold the lock ``.DST.lock`` (SIGTERM handled as SIGINT: the partial directory and the lock are removed),
and write the converted model beside DST, renamed in at the end, so a failure leaves no DST.

``--force`` replaces only an earlier output of ``metaplastic convert``, recognised by its ``config.json`` and the
marker ``conversion.json``; never SRC, a directory containing SRC or one inside it.
"""
from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Tuple

import torch
from tqdm.auto import tqdm

from metaplastic.safe_io import DirLock, atomic_dir, check_output_location, sigterm_as_interrupt

from ..checkpoint_io import StreamingSafetensorsWriter
from ..configuration import MetaplasticConfig
from .reading import ConversionError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json", "vocab.txt")
MARKER = "conversion.json"  # written into every DST: what --force may replace
WRITTEN_BY = "metaplastic convert"


def is_conversion_output(path: Path) -> bool:
    """``path`` is a directory written by this command: a metaplastic ``config.json`` and the marker file."""
    try:
        marker = json.loads((path / MARKER).read_text())
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("written_by") == WRITTEN_BY and isinstance(config, dict) \
        and config.get("model_type") == MetaplasticConfig.model_type


def check_destination(src: Path, dst: Path, force: bool) -> None:
    """Refuse a DST that would lose anything: SRC itself, a directory containing SRC or inside it, an existing
    DST without ``--force``, and with ``--force`` anything but an earlier output of this command."""
    s, d = src.resolve(), dst.resolve()
    if d == s:
        raise ConversionError("DST must differ from SRC")
    if d in s.parents:
        raise ConversionError(f"DST {dst} contains SRC {src}: replacing it would delete the source")
    if s in d.parents:
        raise ConversionError(f"DST {dst} lies inside SRC {src}: write the conversion elsewhere")
    check_output_location(dst, what="DST", kind="dir")
    if not dst.exists():
        return
    if not force:
        raise ConversionError(f"{dst} already exists (use --force to replace an earlier conversion)")
    if is_conversion_output(dst) or (dst.is_dir() and not any(dst.iterdir())):
        return
    raise ConversionError(f"--force replaces only an earlier output of metaplastic convert, and {dst} is not one "
                          f"(no {MARKER} beside a metaplastic config.json); remove it yourself if it may go")


def check_free_space(dst: Path, needed: int) -> None:
    """Refuse, before any work, a file system without room for the converted weights."""
    where = dst.absolute().parent
    while not where.exists():
        where = where.parent
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return
    if needed > free:
        raise ConversionError(f"DST {dst}: the converted weights need {needed / 2**20:.1f} MiB, "
                              f"{where} has {free / 2**20:.1f} MiB free")


@contextmanager
def locked_destination(src: Path, dst: Path, force: bool) -> Iterator[None]:
    """Hold DST's lock for the block, with SIGTERM handled as SIGINT (an interrupted block removes the partial
    DST and the lock); DST is checked again under the lock (another writer may have finished meanwhile)."""
    with sigterm_as_interrupt(), DirLock(dst, "DST"):
        check_destination(src, dst, force)
        yield


def write_destination(src: Path, dst: Path, layout: List[Tuple[str, Tuple[int, ...], torch.dtype]],
                      tensors: Iterable[Tuple[str, torch.Tensor]], config: MetaplasticConfig, marker: Dict,
                      check: Callable[[str, torch.Tensor], None], total: int, progress: bool = True) -> None:
    """Write DST (under :func:`locked_destination`) beside its place and rename it in: ``tensors`` streamed into
    ``model.safetensors`` in ``layout`` (each passed to ``check`` once written), ``config``, SRC's tokenizer files
    and the ``marker``; ``total``: the weights' bytes (the progress bar's length)."""
    dtype = layout[0][2] if layout else torch.float32
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the work is copying: one thread avoids OpenMP start-up on every small op
    try:
        with atomic_dir(dst, replace=True) as tmp:  # replace: check_destination allowed it
            with StreamingSafetensorsWriter(tmp / "model.safetensors", layout) as writer, \
                    tqdm(total=total, unit="B", unit_scale=True, desc="convert", disable=not progress) as bar:
                for name, tensor in tensors:
                    writer.write(name, tensor)
                    check(name, tensor)
                    bar.update(tensor.numel() * torch.empty((), dtype=dtype).element_size())
            config.save_pretrained(tmp)
            for name in TOKENIZER_FILES:
                if (src / name).is_file():
                    shutil.copy2(src / name, tmp / name)
            (tmp / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
    finally:
        torch.set_num_threads(threads)
