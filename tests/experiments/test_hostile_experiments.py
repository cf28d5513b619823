"""The experiment commands and the other writers (capacity, mqar, table1, demo, bench) attacked at their CLI:
NaN parameters, unwritable outputs refused before any computation, a disk that fills while results are saved."""
import pytest

from hostile import cli, one_line_error, remount_read_only, temp_names, tmpfs
from metaplastic.errors import UserError

WRITERS = [  # (argv before the output path, how the output is given)
    (["capacity", "--quick", "--out"], "dir"),
    (["mqar", "--out"], "dir"),
    (["demo", "--out"], "dir"),
    (["table1", "--out"], "file"),
    (["bench", "kernels", "--quick", "--json"], "file"),
    (["bench", "convert", "--json"], "file"),
]


@pytest.mark.parametrize("argv", [
    ["capacity", "--power", "nan"], ["capacity", "--power", "inf"], ["mqar", "--lrs", "nan"],
    ["mqar", "--lrs=-0.1"], ["capacity", "--trials", "0"]])
def test_nan_and_out_of_range_parameters_are_refused_by_name(capsys, tmp_path, argv):
    rc, err = cli(capsys, *argv, "--out", tmp_path / "out")
    assert rc == 2
    one_line_error(err, argv[1].split("=")[0])


@pytest.mark.parametrize("argv, kind", WRITERS, ids=[" ".join(a[:2]) for a, _ in WRITERS])
def test_an_output_under_a_file_is_refused_before_any_work(capsys, tmp_path, argv, kind):
    (tmp_path / "file").write_text("x")
    rc, err = cli(capsys, *argv, tmp_path / "file" / "out")
    assert rc == 2
    one_line_error(err, "is not a directory")


@pytest.mark.parametrize("argv, kind", WRITERS, ids=[" ".join(a[:2]) for a, _ in WRITERS])
def test_a_read_only_output_is_refused_before_any_work(capsys, tmp_path, argv, kind):
    with tmpfs(tmp_path / "ro") as mnt:
        remount_read_only(mnt)
        rc, err = cli(capsys, *argv, mnt / "out")
        assert rc == 2
        one_line_error(err, "read-only file system")


def test_results_saved_on_a_full_disk_leave_no_partial_files(tmp_path):
    from metaplastic.experiments.plotting import save_run
    result = {"config": {"seconds": 0.0}, "results": {"x": list(range(50_000))}}

    def plot(res, path):
        path.write_bytes(b"png")

    with tmpfs(tmp_path / "small", size="64k") as mnt:
        with pytest.raises(UserError, match="no space left on device"):
            save_run(result, mnt / "out", "capacity", plot, lambda r: "")
        assert not (mnt / "out" / "capacity.json").exists()
        assert temp_names(mnt / "out") == []
