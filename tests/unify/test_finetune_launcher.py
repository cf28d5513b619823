"""``metaplastic finetune --nproc-per-node N``, the parts that need no worker: the workers' arguments give the
launcher's configuration back, and the elastic launcher's failure report (``ChildFailedError`` with torch's
``ProcessFailure`` records and error files written by torch's ``ErrorHandler``) becomes one line and an exit
code: 2 for a user error a worker left, 1 for anything else."""
import json
import os
from pathlib import Path

import pytest

pytest.importorskip("torch.distributed.elastic")

from torch.distributed.elastic.multiprocessing.errors import (  # noqa: E402
    ChildFailedError, ErrorHandler, ProcessFailure)

from metaplastic.cli import build_parser  # noqa: E402
from metaplastic.finetune import FinetuneConfig, config_from_args  # noqa: E402
from metaplastic.finetune_launch import _outcome, worker_argv  # noqa: E402


@pytest.mark.parametrize("changes", [{}, {"resume": "latest", "stop_after": 3, "micro_batch": 2, "lr": 1e-3 / 3},
                                     {"resume": "-odd/step_0000004", "overwrite": True, "out": "-run",
                                      "min_lr_ratio": 0.0, "grad_clip": 0.0, "precision": "fp32"}])
def test_worker_arguments_give_the_same_config(changes):
    cfg = FinetuneConfig(**{"model": "model", "data": "tokens.npy", "out": "run", "train": "all", "steps": 7,
                            **changes})
    args = build_parser(["finetune"]).parse_args(["finetune", *worker_argv(cfg)])
    assert config_from_args(args) == cfg
    assert args.nproc_per_node is None  # a worker starts no workers


def failure(tmp_path: Path, rank: int, exitcode: int, exception: BaseException = None) -> ProcessFailure:
    """torch's record of a failed worker; with ``exception``, its error file written by torch's ErrorHandler."""
    error_file = tmp_path / f"error-{rank}.json"
    if exception is not None:
        os.environ["TORCHELASTIC_ERROR_FILE"] = str(error_file)
        try:
            raise exception
        except BaseException as exc:  # noqa: BLE001
            ErrorHandler().record_exception(exc)
        finally:
            del os.environ["TORCHELASTIC_ERROR_FILE"]
        assert json.loads(error_file.read_text())  # torch wrote it
    return ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=exitcode, error_file=str(error_file))


def outcome(tmp_path: Path, failures: dict, left: dict):
    errors = tmp_path / "errors"
    errors.mkdir()
    for rank, line in left.items():
        (errors / f"rank-{rank}").write_text(line)
    return _outcome(ChildFailedError("metaplastic", failures), errors)


def test_a_user_error_of_rank_0_is_printed_as_it_is(tmp_path):
    failures = {0: failure(tmp_path, 0, 2), 1: failure(tmp_path, 1, -15)}  # rank 1 stopped while it waited
    assert outcome(tmp_path, failures, {0: "bad seed", 1: "bad seed"}) == (2, "bad seed")


def test_a_user_error_of_another_rank_names_it(tmp_path):
    failures = {1: failure(tmp_path, 1, 2), 0: failure(tmp_path, 0, -15)}
    assert outcome(tmp_path, failures, {1: "disk full"}) == (2, "rank 1: disk full")


def test_a_crash_is_exit_code_1_naming_the_worker_its_exception_and_its_error_file(tmp_path):
    failures = {1: failure(tmp_path, 1, 1, RuntimeError("boom\nsecond line"))}
    code, line = outcome(tmp_path, failures, {})
    assert code == 1
    assert line == (f"worker rank 1 (pid 1001) failed with exit code 1 (RuntimeError: boom); its traceback is "
                    f"above and in {tmp_path / 'error-1.json'}")


def test_a_crash_beside_a_user_error_is_not_a_user_error(tmp_path):
    """Rank 1 left a user error and was stopped while it waited; rank 0 crashed first: exit code 1."""
    failures = {0: failure(tmp_path, 0, 1), 1: failure(tmp_path, 1, -15)}
    code, line = outcome(tmp_path, failures, {1: "bad seed"})
    assert code == 1 and line.startswith("worker rank 0 (pid 1000) failed with exit code 1; its output is above")


def test_a_killed_worker_is_named_with_its_signal(tmp_path):
    code, line = outcome(tmp_path, {0: failure(tmp_path, 0, -9)}, {})
    assert (code, line) == (1, "worker rank 0 (pid 1000) was killed by signal SIGKILL; its output is above")


def test_what_is_not_a_worker_failure_is_left_alone(tmp_path):
    assert _outcome(ValueError("x"), tmp_path) == (None, None)
