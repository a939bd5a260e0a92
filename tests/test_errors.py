"""Errors in the library's own terms, and what the ``mcloss`` command makes of them (exit codes, flags)."""

from __future__ import annotations

import argparse
import pickle

import pytest
import torch
from torch.utils.data import DataLoader

import mcloss
import mcloss.cli.synth as synth_cli
import mcloss.cli.train as train_cli
import mcloss.data.synth.writing as writing
from mcloss.cli import main as cli_main
from mcloss.cli._common import DEBUG_ENV, flag_table, naming_flags, progress_bars, run
from mcloss.core.errors import (
    DatasetError,
    MclossError,
    OutOfRangeError,
    OutputError,
    ParameterError,
    UnknownClassError,
    first_line,
)
from mcloss.data.io import ImageLoadError

SYNTH = ["synth", "--classes", "2", "--per-class", "2", "--size", "48"]


def _err(capsys) -> str:
    return capsys.readouterr().err.strip()


# ------------------------------------------------------------------------------------------------ library


def test_every_error_type_is_an_mclosserror_and_the_builtin_it_replaces():
    assert issubclass(ParameterError, ValueError) and issubclass(DatasetError, ValueError)
    assert issubclass(UnknownClassError, KeyError) and issubclass(OutOfRangeError, IndexError)
    assert issubclass(OutputError, OSError)
    for kind in (ParameterError, DatasetError, UnknownClassError, OutOfRangeError, OutputError):
        assert issubclass(kind, MclossError)
        exc = kind("lr must be > 0", parameter="lr")
        assert str(exc) == "lr must be > 0" and exc.parameters == ("lr",) and exc.parameter == "lr"
        copy = pickle.loads(pickle.dumps(exc))  # DataLoader workers and DDP ranks hand errors over pickled
        assert type(copy) is kind and copy.parameters == ("lr",)
    assert MclossError("x").parameters == () and MclossError("x").parameter is None
    assert ParameterError("x", parameter=("alpha", "beta")).parameters == ("alpha", "beta")


def test_naming_flags_writes_the_first_mention_of_each_parameter_as_its_flag():
    flags = {"lr": "--lr", "data": "--data", "dis_topk": "--dis-topk", "dis_topk_from": "--dis-topk-from",
             "amp": "--no-amp", "download": "--download"}  # fmt: skip
    assert naming_flags("lr must be > 0, got -1.0", ["lr"], flags) == "--lr must be > 0, got -1.0"
    # the value after the name is left alone, even when it reads like the name
    assert naming_flags("data data: the training split is empty", ["data"], flags) == "--data data: the training split is empty"
    assert naming_flags("dis_topk_from must be in [dis_topk, 1]", ["dis_topk_from", "dis_topk"], flags) == (
        "--dis-topk-from must be in [--dis-topk, 1]"
    )
    assert naming_flags("loss is not finite; try a lower lr.", ["lr"], flags) == "loss is not finite; try a lower --lr."
    assert naming_flags("(only amp and data may change)", ["amp", "data"], flags) == "(only --no-amp and --data may change)"
    assert naming_flags("/x: not found (pass download=True to fetch it)", ["download"], flags) == (
        "/x: not found (pass --download to fetch it)"
    )
    assert naming_flags("/runs/lr/x: unreadable", ["lr"], flags) == "--lr: /runs/lr/x: unreadable"  # paths are not mentions
    assert naming_flags("seed must be >= 0", ["seed"], flags) == "seed must be >= 0"  # no such flag: as it is


def test_flag_table_reads_the_parser():
    p = argparse.ArgumentParser()
    p.add_argument("--batch-size", type=int)
    p.add_argument("--no-amp", dest="amp", action="store_false")
    p.add_argument("-n", "--limit", type=int)
    assert flag_table(p) == {"help": "--help", "batch_size": "--batch-size", "amp": "--no-amp", "limit": "--limit"}


# ----------------------------------------------------------------------------------------------- exit codes


def _command(body, flags=None, argv=()):
    p = argparse.ArgumentParser(prog="mcloss demo")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--baseline", help="a checkpoint")
    p.add_argument("--deletion-fill")
    return run("demo", p, list(argv), body, flags=flags)


def _raise(exc: BaseException):
    def body(args):
        raise exc

    return body


def test_an_mcloss_error_exits_2_with_one_line_naming_the_flag(capsys):
    assert _command(_raise(ParameterError("batch_size must be >= 1, got 0", parameter="batch_size"))) == 2
    assert _err(capsys) == "mcloss demo: error: --batch-size must be >= 1, got 0"
    # a command maps a library parameter to another flag where its own flag of that name means something else
    error = ParameterError("baseline must be one of blur, mean, got 'x'", parameter="baseline")
    assert _command(_raise(error), flags={"baseline": "--deletion-fill"}) == 2
    assert _err(capsys) == "mcloss demo: error: --deletion-fill must be one of blur, mean, got 'x'"
    assert _command(_raise(UnknownClassError("unknown class 'zebra'"))) == 2
    assert _err(capsys) == "mcloss demo: error: unknown class 'zebra'"


def test_anything_else_is_a_fault_exit_1_with_one_line(capsys, monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    assert _command(_raise(RuntimeError("CUDA error: out of memory\nmore detail"))) == 1
    assert _err(capsys) == "mcloss demo: error: RuntimeError: CUDA error: out of memory"
    assert _command(_raise(ValueError("a bug"))) == 1  # a plain ValueError is not raised on purpose
    assert _err(capsys) == "mcloss demo: error: ValueError: a bug"
    assert _command(_raise(KeyboardInterrupt())) == 130
    assert _err(capsys) == "mcloss demo: interrupted"


def test_a_fault_in_a_real_command(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)

    def boom(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(synth_cli, "generate_dataset", boom)
    assert cli_main([*SYNTH, "--out", str(tmp_path / "o")]) == 1
    err = _err(capsys)
    assert err == "mcloss synth: error: RuntimeError: boom" and "Traceback" not in err


@pytest.mark.parametrize("how", ["before", "after", "env"])
def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch, how):
    monkeypatch.delenv(DEBUG_ENV, raising=False)

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(synth_cli, "generate_dataset", boom)
    argv = [*SYNTH, "--out", str(tmp_path / "o")]
    if how == "before":
        argv = ["--debug", *argv]
    elif how == "after":
        argv = [*argv, "--debug"]
    else:
        monkeypatch.setenv(DEBUG_ENV, "1")
    assert cli_main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "in boom" in err
    assert err.rstrip().splitlines()[-1] == "mcloss synth: error: RuntimeError: boom"


def test_debug_shows_the_traceback_of_an_mcloss_error_too(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    assert cli_main(["--debug", *SYNTH, "--out", str(tmp_path / "o"), "--seed", "-1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().splitlines()[-1] == "mcloss synth: error: --seed must be a non-negative integer, got -1"
    monkeypatch.setenv(DEBUG_ENV, "0")  # 0 is off
    assert cli_main([*SYNTH, "--out", str(tmp_path / "o"), "--seed", "-1"]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_train_names_the_flag_of_a_bad_setting_and_takes_debug(tmp_path, capsys, monkeypatch):
    assert train_cli.main(["--data", "d", "--out", str(tmp_path / "o"), "--backbone", "resnet18", "--lr", "-1"]) == 2
    assert _err(capsys) == "mcloss train: error: --lr must be > 0"
    assert train_cli.main(["--data", "d", "--out", str(tmp_path / "o"), "--backbone", "resnet18", "--batch-size", "1"]) == 2
    assert _err(capsys) == "mcloss train: error: --batch-size must be >= 2 (the FC head has BatchNorm)"
    seen = {}

    def fake_train(config, **kwargs):
        seen["config"] = config
        return {"status": "complete", "rank": 0, "best_epoch": 0}

    monkeypatch.setattr(train_cli, "train", fake_train)  # --debug is the command's, not a training setting
    assert train_cli.main(["--data", "d", "--out", str(tmp_path / "o"), "--backbone", "resnet18", "--debug"]) == 0
    assert "--debug" in seen["config"].command



class _Unreadable(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int):
        if index == 1:
            try:
                raise OSError("Truncated File Read")
            except OSError as exc:  # a chained cause, as the image reader raises it
                raise ImageLoadError("birds/b.jpg: corrupt or truncated image: Truncated File Read") from exc
        return torch.zeros(1)


@pytest.mark.parametrize("workers", [0, 1])
def test_first_line_of_an_error_from_a_dataloader_worker_is_the_original_reason(workers):
    with pytest.raises(ImageLoadError) as caught:
        list(DataLoader(_Unreadable(), batch_size=1, num_workers=workers))
    # torch re-raises a worker's error as "Caught ImageLoadError in DataLoader worker process 0." + traceback
    assert str(caught.value).startswith("Caught ImageLoadError") == (workers > 0)
    assert first_line(caught.value) == "birds/b.jpg: corrupt or truncated image: Truncated File Read"
    assert first_line(RuntimeError("Caught nothing in x.\nOriginal Traceback (most recent call last):\n")) == "Caught nothing in x."


def test_train_names_a_corrupt_image_read_in_a_worker(tmp_path, capsys):
    assert cli_main([*SYNTH, "--out", str(tmp_path / "d")]) == 0
    bad = sorted((tmp_path / "d" / "images").rglob("*.jpg"))[0]
    bad.write_bytes(bad.read_bytes()[:300])
    capsys.readouterr()
    out = tmp_path / "run"
    argv = ["--data", str(tmp_path / "d"), "--out", str(out), "--backbone", "resnet18", "--xi", "2", "--img-size", "32",
            "--epochs", "1", "--batch-size", "2", "--workers", "1", "--device", "cpu"]  # fmt: skip
    assert train_cli.main(argv) == 2
    assert _err(capsys) == f"mcloss train: error: {bad}: corrupt or truncated image: Truncated File Read"
    assert not out.exists()


def test_every_command_with_a_bar_takes_no_progress(tmp_path, monkeypatch, capsys):
    import sys

    from mcloss.cli import domain, parts
    from mcloss.cli import eval as eval_cli
    from mcloss.cli._common import show_progress

    needed = {eval_cli: ["--checkpoint", "c", "--data", "d"], domain: ["--checkpoint", "c", "--data", "d", "--out", "o"],
              parts: ["--data", "d"], train_cli: ["--out", "o"]}  # fmt: skip
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    for module, argv in needed.items():
        parser = module.build_parser()
        assert show_progress(parser.parse_args(argv)) and not show_progress(parser.parse_args([*argv, "--no-progress"]))
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert not show_progress(eval_cli.build_parser().parse_args(needed[eval_cli]))
    seen = {}

    def fake_train(config, progress=None):
        seen["config"], seen["progress"] = config, progress
        return {"status": "complete", "rank": 0, "best_epoch": 0}

    monkeypatch.setattr(train_cli, "train", fake_train)  # not a training setting: the config never sees it
    assert train_cli.main(["--data", "d", "--out", str(tmp_path / "o"), "--backbone", "resnet18", "--no-progress"]) == 0
    assert seen["progress"] is None and "--no-progress" in seen["config"].command

def test_an_unwritable_output_is_the_users_input_exit_2(tmp_path, capsys, monkeypatch):
    def full(job):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writing, "_render_job", full)
    assert cli_main([*SYNTH, "--out", str(tmp_path / "o")]) == 2
    err = _err(capsys)
    assert err == f"mcloss synth: error: --out {tmp_path / 'o'}: cannot write the dataset ([Errno 28] No space left on device)"


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["bench", "--repeats", "0"], "--repeats must be >= 1, got 0"),
        (["bench", "--batch-size", "-1"], "--batch-size must be >= 1, got -1"),
        (["bench", "--threads", "0"], "--threads must be >= 1, got 0"),
        (["bench", "--backbone", "resnet18", "--classes", "0"], "--classes must be >= 1, got 0"),
        (["sanity", "--data", "d", "--seed", "99999999999999999999"], "argument --seed: must be an integer in 0..4294967295"),
        (["domain", "--checkpoint", "c", "--data", "d", "--out", "o.safetensors", "--seed", "-1"], "argument --seed: must be"),
        (["train", "--data", "d", "--seed", "5000000000"], "argument --seed: must be an integer in 0..4294967295"),
        (["atlas", "--data", "d", "--noise", "nan"], "argument --noise: must be a finite number, got nan"),
        (["atlas", "--data", "d", "--radius", "inf"], "argument --radius: must be a finite number, got inf"),
        (["parts", "--data", "d", "--radius", "inf"], "argument --radius: must be a finite number, got inf"),
    ],
    ids=lambda v: v if isinstance(v, str) else "-".join(v[:1] + v[-2:]),
)
def test_values_no_run_can_use_are_refused_in_one_line(tmp_path, capsys, argv, said):
    """Each used to crash (exit 1: a StatisticsError, a ZeroDivisionError, numpy's seed overflow) or to run
    and report numbers that mean nothing (a NaN noise, an infinite hit radius)."""
    if argv[0] == "bench":
        argv = [*argv, "--json", str(tmp_path / "b.json")]
    assert cli_main(argv) == 2
    err = _err(capsys)
    assert len(err.splitlines()) == 1 and said in err, err


def test_an_output_that_cannot_be_written_is_refused_before_the_work(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "folder.safetensors").mkdir()
    checkpoint = str(mcloss.default_checkpoint())
    for argv, said in (
        (["bench", "--json", str(tmp_path / "afile" / "x.json")], f"--json {tmp_path / 'afile' / 'x.json'}: {tmp_path / 'afile'} is a file"),
        (["sanity", "--data", str(tmp_path), "--out", str(tmp_path / "afile")], f"--out {tmp_path / 'afile'}: is a file, not a folder"),
        (["domain", "--checkpoint", checkpoint, "--data", str(tmp_path), "--out", str(tmp_path / "folder.safetensors")],
         "is a folder, not a file"),
    ):
        assert cli_main(argv) == 2, argv
        assert said in _err(capsys)


def test_progress_bars_start_a_bar_per_pass(capsys):
    with progress_bars(True) as bars:
        first = bars("epoch 1/2")
        first(0, 3)
        first(3, 3)
        second = bars("eval")
        second(0, 1)
        second(1, 1)
    with progress_bars(False) as none:
        assert none is None
    err = capsys.readouterr().err
    assert "epoch 1/2" in err and "eval" in err
