"""``metaplastic finetune --nproc-per-node N``: check every input here, then start N workers on this machine.

    metaplastic finetune --nproc-per-node N --model DIR --data tokens.npy --out RUN [options]

This process runs every check a user can fail (the arguments, the model, the data file, the state of
``--out`` and its lock) before any worker starts, holds the lock on ``--out`` for the whole job, and starts
the workers through torch's elastic launcher (``torch.distributed.launcher.api.elastic_launch``, the
launcher behind ``torchrun --standalone``): ``python -m metaplastic finetune [options]`` with the
environment of a torchrun worker. Its outcome, on stderr:

- success: exit 0;
- a user error a worker found once the ranks had joined (a ``--resume`` checkpoint that does not fit, a full
  disk): the worker's one line, printed once by this process, exit 2;
- any other failure of a worker (a crash, a signal): one line naming the worker, its exit code or signal,
  and where its traceback is, exit 1; the worker's own output is above it.

One machine only: several nodes are started with ``torchrun --nnodes ...`` (docs/finetune.md).
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from metaplastic.errors import UserError

# Set by the launcher in the environment of its workers: this process's pid (a worker whose parent it is
# knows the lock on --out is already held for it) and the folder where a worker leaves its user error.
LAUNCHER_PID_ENV = "METAPLASTIC_FINETUNE_LAUNCHER_PID"
ERRORS_ENV = "METAPLASTIC_FINETUNE_ERRORS"
PROG = "metaplastic finetune"


def under_launcher() -> bool:
    """True in a worker started by :func:`launch` (its parent process is the launcher)."""
    return os.environ.get(LAUNCHER_PID_ENV) == str(os.getppid()) and bool(os.environ.get(ERRORS_ENV))


def leave_user_error(message: str) -> None:
    """A worker's user error, left for the launcher to print once (``ERRORS/rank-RANK``)."""
    from .safe_io import atomic_write
    atomic_write(Path(os.environ[ERRORS_ENV]) / f"rank-{os.environ.get('RANK', '0')}", message)


def worker_argv(cfg) -> List[str]:
    """The ``metaplastic finetune`` options that give a worker the same :class:`FinetuneConfig` ``cfg``."""
    argv: List[str] = []
    for field in dataclasses.fields(cfg):
        value, flag = getattr(cfg, field.name), "--" + field.name.replace("_", "-")
        if value is None or value is False:
            continue
        # FLAG=VALUE: a value that starts with "-" (a path) stays a value
        argv.append(flag if value is True else f"{flag}={repr(value) if isinstance(value, float) else value}")
    return argv


def check_devices(cfg, nproc: int) -> None:
    """One GPU per worker when the workers run on GPUs."""
    import torch
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but torch sees no CUDA device")
    if torch.cuda.device_count() < nproc:
        raise UserError(f"--nproc-per-node {nproc}, but torch sees {torch.cuda.device_count()} CUDA device(s): "
                        "one worker per GPU (or --device cpu)")


def launch(cfg, nproc: int, prepare: Callable[..., object]) -> int:
    """Check ``cfg`` for ``nproc`` workers, hold the lock on ``--out``, run the workers; the exit code.
    ``prepare(cfg, world=nproc)`` is finetune's own check of every input (passed in: this module sits below
    :mod:`metaplastic.finetune`, which imports it)."""
    from .safe_io import DirLock
    if nproc < 1:
        raise UserError(f"--nproc-per-node must be at least 1, got {nproc}")
    check_devices(cfg, nproc)
    prepare(cfg, world=nproc)  # arguments, --out, model, data: the workers load them again
    gc.collect()
    lock = DirLock(Path(cfg.out), "--out").acquire()
    scratch = Path(tempfile.mkdtemp(prefix="metaplastic-finetune-"))
    code: Optional[int] = None
    line: Optional[str] = None
    try:
        (scratch / "errors").mkdir()
        env = {LAUNCHER_PID_ENV: str(os.getpid()), ERRORS_ENV: str(scratch / "errors")}
        if "OMP_NUM_THREADS" not in os.environ and nproc > 1:
            env["OMP_NUM_THREADS"] = "1"  # as torchrun does: one intra-op thread per worker
        with _environment(env), _agent_logs_hidden():
            try:
                _elastic_launch(nproc, scratch / "logs", worker_argv(cfg))
                code = 0
            except BaseException as exc:  # noqa: BLE001  (the launcher's failures, sorted below)
                code, line = _outcome(exc, scratch / "errors")
                if code is None:
                    raise
        if line:
            print(f"{PROG}: error: {line}", file=sys.stderr, flush=True)
        return code
    finally:
        lock.release()
        if not (line and str(scratch) in line):  # kept when the line points at a worker's error file in it
            shutil.rmtree(scratch, ignore_errors=True)


def _elastic_launch(nproc: int, log_dir: Path, argv: List[str]) -> None:
    """``torchrun --standalone --nproc-per-node NPROC -m metaplastic finetune ARGV``, in this process."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1,
                          logs_specs=DefaultLogsSpecs(log_dir=str(log_dir)))
    elastic_launch(config, sys.executable)("-u", "-m", "metaplastic", "finetune", *argv)


def _outcome(exc: BaseException, errors: Path) -> Tuple[Optional[int], Optional[str]]:
    """``(exit code, line to print)`` for a failed launch; ``(None, None)`` for what is not a worker's failure."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    if isinstance(exc, SignalException):  # this process was signalled; the agent has stopped the workers
        return 128 + int(exc.sigval), None
    if not isinstance(exc, ChildFailedError):
        return None, None
    said = _left_errors(errors)
    if said and any(f.exitcode == 2 for f in exc.failures.values()):
        rank = 0 if 0 in said else min(said)
        return 2, said[rank] if rank == 0 else f"rank {rank}: {said[rank]}"
    rank, failure = exc.get_first_failure()
    if failure.exitcode < 0:
        how = f"was killed by signal {failure.signal_name()}"
    else:
        how = f"failed with exit code {failure.exitcode}"
        said = _recorded_exception(failure)
        if said:
            how += f" ({said})"
    where = f"; its traceback is above and in {failure.error_file}" if os.path.isfile(failure.error_file) \
        else "; its output is above"
    return 1, f"worker rank {rank} (pid {failure.pid}) {how}{where}"


def _recorded_exception(failure) -> str:
    """The first line of the exception a worker recorded in its error file (``TORCHELASTIC_ERROR_FILE``), if any."""
    if not os.path.isfile(failure.error_file):
        return ""
    message = failure.message
    if isinstance(message, dict):  # the format of torch's ErrorHandler: {"message": ..., "extraInfo": ...}
        message = message.get("message", "")
    return (str(message).strip().splitlines() or [""])[0]


def _left_errors(errors: Path) -> Dict[int, str]:
    """The user errors the workers left: ``{rank: line}``."""
    said = {}
    for path in errors.glob("rank-*"):
        try:
            said[int(path.name.split("-", 1)[1])] = path.read_text().strip()
        except (OSError, ValueError):
            continue
    return {rank: line for rank, line in said.items() if line}


@contextlib.contextmanager
def _environment(values: Dict[str, str]) -> Iterator[None]:
    """``os.environ`` with ``values`` set (the workers inherit it), restored after."""
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# The loggers of the elastic agent and of the launcher (torch's own handler sits above them, on torch.distributed)
AGENT_LOGGERS = ("torch.distributed.elastic", "torch.distributed.launcher")


@contextlib.contextmanager
def _agent_logs_hidden() -> Iterator[None]:
    """The elastic agent's log records (its warnings and its report of a failed worker) are not printed: this
    process reports the outcome itself, in one line."""
    saved = []
    for name in AGENT_LOGGERS:
        logger = logging.getLogger(name)
        hide = logging.NullHandler()
        saved.append((logger, hide, logger.propagate))
        logger.addHandler(hide)
        logger.propagate = False
    try:
        yield
    finally:
        for logger, hide, propagate in saved:
            logger.removeHandler(hide)
            logger.propagate = propagate
