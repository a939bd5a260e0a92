"""Training and evaluation: end to end, exact resume, Ctrl-C, loss variants, DDP, and clear refusals."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, TensorDataset

import mcloss.cli.train as train_cli
import mcloss.training.loop as loop_mod
import mcloss.training.setup as setup_mod
import mcloss.training.writer as writer_mod
from mcloss.cli import main as cli_main
from mcloss.core.checkpoint import load_checkpoint, read_metadata
from mcloss.core.loss import MCLoss
from mcloss.core.model import build_model
from mcloss.data.synth import class_definitions, generate_dataset
from mcloss.evaluation.classification import evaluate
from mcloss.training.config import RECIPES, TrainError, config_for_resume, make_config
from mcloss.training.loop import dis_topk_share, div_warmup_factor, train
from mcloss.training.run_dir import METRIC_COLUMNS, load_resume_state, read_metrics, save_resume_state
from mcloss.training.setup import milestones, param_groups, pretrained_parameter_names

CLASSES, PER_CLASS, SIZE, SYNTH_SEED = 3, 6, 32, 0
TINY = {"backbone": "resnet18", "xi": 2, "batch_size": 4, "img_size": 32, "lr": 0.01, "workers": 0, "device": "cpu", "seed": 1}
TINY_ARGS = ["--backbone", "resnet18", "--xi", "2", "--batch-size", "4", "--img-size", "32", "--lr", "0.01",
             "--workers", "0", "--device", "cpu", "--seed", "1"]  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread():
    """Two intra-op threads on a shared 2-core machine are far slower than one for these tiny models."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "birds"
    generate_dataset(root, CLASSES, PER_CLASS, SIZE, SYNTH_SEED)
    return root


@pytest.fixture(scope="module")
def finished_run(synth_data, tmp_path_factory) -> Path:
    """A completed 2-epoch run (read-only for tests: copy it before changing anything)."""
    out = tmp_path_factory.mktemp("runs") / "done"
    torch.set_num_threads(1)
    summary = train(make_config(data=str(synth_data), out=str(out), epochs=2, **TINY))
    assert summary["status"] == "complete"
    return out


def _temp_files(out: Path) -> list[str]:
    return [p.name for p in out.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")]


def _state(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


# --------------------------------------------------------------------------------------------- end to end


def test_end_to_end_synth_train_resume_eval(tmp_path, capsys, monkeypatch):
    data, out, report = tmp_path / "birds", tmp_path / "run", tmp_path / "eval.json"
    assert cli_main(["synth", "--out", str(data), "--classes", "3", "--per-class", "6", "--size", "32", "--seed", "0"]) == 0
    assert cli_main(["train", "--data", str(data), "--epochs", "2", "--out", str(out), *TINY_ARGS]) == 0
    assert [r["epoch"] for r in read_metrics(out / "metrics.csv")] == [1, 2]
    assert cli_main(["train", "--out", str(out), "--resume", "--epochs", "3"]) == 0

    for name in ("metrics.csv", "curves.png", "config.json", "best.safetensors", "last.safetensors", "resume.pt"):
        assert (out / name).is_file(), name
    assert _temp_files(out) == []
    header = (out / "metrics.csv").read_text().splitlines()[0]
    assert header.split(",") == list(METRIC_COLUMNS)
    rows = read_metrics(out / "metrics.csv")
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    run = json.loads((out / "config.json").read_text())
    assert run["command"].startswith("mcloss train --data")
    assert run["config"]["epochs"] == 3 and run["config"]["seed"] == 1
    assert run["data_root"] == str(data.resolve())
    assert [r["from_epoch"] for r in run["resumes"]] == [2]
    assert run["resumes"][0]["command"] == f"mcloss train --out {out} --resume --epochs 3"
    assert {"torch", "torchvision", "mcloss", "python"} <= set(run["versions"])

    last = load_checkpoint(out / "last.safetensors")
    card = last.card
    assert card["epoch"] == 3 and card["epochs"] == 3 and card["seed"] == 1
    assert card["data_root"] == str(data.resolve())
    assert card["command"] == f"mcloss train --out {out} --resume --epochs 3"
    assert card["dataset"] == {"classes": 3, "per_class": 6, "size": 32, "seed": 0, "design": "single"}
    # the defining parts travel from synth.json into the card (the base bird changes nothing)
    assert card["defining_parts"] == {c.name: list(c.changed) for c in class_definitions(3)}
    assert card["defining_parts"][last.class_names[0]] == []
    assert card["metrics"]["epoch"] == 3
    assert card["metrics"]["test_acc_fc"] == pytest.approx(rows[2]["test_acc_fc"], abs=1e-8)
    assert last.class_names == run["class_names"] and len(last.class_names) == 3

    best_card = read_metadata(out / "best.safetensors")["card"]
    best_acc = max(r["test_acc_fc"] for r in rows)
    first_best = next(r for r in rows if r["test_acc_fc"] == best_acc)
    assert best_card["epoch"] == first_best["epoch"]

    capsys.readouterr()
    monkeypatch.setenv("MCLOSS_CHECKPOINT", str(out / "last.safetensors"))  # eval's default, as export's
    assert cli_main(["eval", "--data", str(data), "--device", "cpu", "--workers", "0", "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "FC" in printed and "MC" in printed and "top-1" in printed
    result = json.loads(report.read_text())
    assert result["checkpoint"] == str((out / "last.safetensors").resolve())
    assert result["n"] == CLASSES * PER_CLASS // 2 and result["topk"] == 3
    # The run's own test metrics of the last epoch are reproduced exactly by a separate evaluation.
    assert result["fc"]["top1"] == pytest.approx(rows[2]["test_acc_fc"], abs=1e-8)
    assert result["mc"]["top1"] == pytest.approx(rows[2]["test_acc_mc"], abs=1e-8)
    assert result["loss"] == pytest.approx(rows[2]["test_loss"], rel=1e-5)
    assert result["fc"]["top3"] == 1.0 and result["mc"]["top3"] == 1.0  # top-k over all 3 classes


# ---------------------------------------------------------------------------------------------- resume


def test_resume_is_exact(synth_data, tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    a = train(make_config(data=str(synth_data), out=str(straight), epochs=3, **TINY))
    assert a["status"] == "complete" and a["epochs_completed"] == 3

    def stop_in_epoch_3(epoch, index):
        if epoch == 3 and index == 1:
            raise KeyboardInterrupt

    b = train(make_config(data=str(synth_data), out=str(stopped), epochs=3, **TINY), on_batch_end=stop_in_epoch_3)
    assert b["status"] == "interrupted" and b["epochs_completed"] == 2
    assert [r["epoch"] for r in read_metrics(stopped / "metrics.csv")] == [1, 2]
    assert load_resume_state(stopped / "resume.pt")["epoch"] == 2
    assert read_metadata(stopped / "last.safetensors")["card"]["epoch"] == 2

    c = train(config_for_resume(stopped, {"command": "resume"}))
    assert c["status"] == "complete" and c["epochs_completed"] == 3
    wa, wc = _state(straight / "last.safetensors"), _state(stopped / "last.safetensors")
    assert wa.keys() == wc.keys()
    for key in wa:
        assert torch.equal(wa[key], wc[key]), key
    rows_a, rows_c = read_metrics(straight / "metrics.csv"), read_metrics(stopped / "metrics.csv")
    assert [r["epoch"] for r in rows_c] == [1, 2, 3]
    for ra, rc in zip(rows_a, rows_c, strict=True):
        assert {k: v for k, v in ra.items() if k != "time_s"} == {k: v for k, v in rc.items() if k != "time_s"}
    sa, sc = load_resume_state(straight / "resume.pt"), load_resume_state(stopped / "resume.pt")
    for key, value in sa["optimizer"]["state"].items():
        assert torch.equal(value["momentum_buffer"], sc["optimizer"]["state"][key]["momentum_buffer"])
    assert sa["scheduler"]["last_epoch"] == sc["scheduler"]["last_epoch"] == 3


def test_resume_state_loads_without_unpickling(finished_run):
    state = torch.load(finished_run / "resume.pt", weights_only=True)
    assert state["epoch"] == 2 and state["epochs"] == 2
    assert {"optimizer", "scheduler", "rng", "best_acc", "best_epoch", "run_id"} <= set(state)
    rng = state["rng"][0]
    assert isinstance(rng["torch"], torch.Tensor) and isinstance(rng["python"]["state"], torch.Tensor)
    assert state["run_id"] == json.loads((finished_run / "config.json").read_text())["run_id"]


def test_resume_of_a_finished_run_does_nothing(finished_run, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(finished_run, out)
    before = (out / "metrics.csv").read_text()
    assert cli_main(["train", "--out", str(out), "--resume"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert (out / "metrics.csv").read_text() == before


# ------------------------------------------------------------------------------------------------ Ctrl-C


def test_ctrl_c_keeps_the_last_completed_epoch(synth_data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    original = loop_mod.train_one_epoch

    def interrupted_in_epoch_2(*args, epoch, **kwargs):
        if epoch == 2:
            raise KeyboardInterrupt
        return original(*args, epoch=epoch, **kwargs)

    monkeypatch.setattr(loop_mod, "train_one_epoch", interrupted_in_epoch_2)
    rc = cli_main(["train", "--data", str(synth_data), "--epochs", "3", "--out", str(out), *TINY_ARGS])
    assert rc == 130
    err = capsys.readouterr().err
    assert "interrupted; kept epoch 1" in err and "--resume" in err
    assert [r["epoch"] for r in read_metrics(out / "metrics.csv")] == [1]
    assert load_resume_state(out / "resume.pt")["epoch"] == 1
    assert read_metadata(out / "last.safetensors")["card"]["epoch"] == 1
    assert _temp_files(out) == []

    monkeypatch.setattr(loop_mod, "train_one_epoch", original)
    assert cli_main(["train", "--out", str(out), "--resume"]) == 0
    assert [r["epoch"] for r in read_metrics(out / "metrics.csv")] == [1, 2, 3]


def test_ctrl_c_before_the_first_epoch_leaves_nothing(synth_data, tmp_path, capsys):
    out = tmp_path / "run"

    def stop(epoch, index):
        raise KeyboardInterrupt

    summary = train(make_config(data=str(synth_data), out=str(out), epochs=2, **TINY), on_batch_end=stop)
    assert summary["status"] == "interrupted" and summary["epochs_completed"] == 0
    assert not out.exists() or list(out.iterdir()) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_while_saving_is_deferred_until_the_epoch_is_written(synth_data, tmp_path, monkeypatch, signum):
    out = tmp_path / "run"
    real_save = writer_mod.save_checkpoint
    sent = []

    def save_and_get_signalled(model, path, **kwargs):
        if model.card["epoch"] == 2 and not sent:
            sent.append(path)
            os.kill(os.getpid(), signum)  # arrives in the middle of writing epoch 2
        real_save(model, path, **kwargs)

    monkeypatch.setattr(writer_mod, "save_checkpoint", save_and_get_signalled)
    handler = signal.getsignal(signal.SIGINT)  # Python's, or SIG_IGN when started in the background
    summary = train(make_config(data=str(synth_data), out=str(out), epochs=3, **TINY))
    assert sent and summary["status"] == "interrupted" and summary["epochs_completed"] == 2
    assert [r["epoch"] for r in read_metrics(out / "metrics.csv")] == [1, 2]
    assert load_resume_state(out / "resume.pt")["epoch"] == 2
    assert read_metadata(out / "last.safetensors")["card"]["epoch"] == 2
    assert _temp_files(out) == []
    assert signal.getsignal(signal.SIGINT) is handler  # handlers restored


# ----------------------------------------------------------------------------------- recipes and losses


def test_loss_variants_set_the_weights():
    ce = make_config(data="d", out="o", backbone="resnet18", loss="ce")
    assert (ce.alpha, ce.beta) == (0.0, 0.0)
    dis = make_config(data="d", out="o", backbone="resnet18", loss="dis")
    assert (dis.alpha, dis.beta) == (1.5, 0.0)
    dis_pre = make_config("official-pretrained", data="d", out="o", loss="dis")
    assert (dis_pre.alpha, dis_pre.beta) == (0.0005, 0.0)
    mc = make_config(data="d", out="o", backbone="resnet18", alpha=2.0)
    assert (mc.alpha, mc.beta) == (2.0, 20.0)
    with pytest.raises(TrainError, match="^loss ce .* alpha and beta must then be 0") as info:  # parameters, not flags
        make_config(data="d", out="o", backbone="resnet18", loss="ce", alpha=1.0)
    assert info.value.parameters == ("loss", "alpha", "beta")
    # the command line names each of them as its flag, once
    from mcloss.cli._common import naming_flags

    flags = {"loss": "--loss", "alpha": "--alpha", "beta": "--beta"}
    assert naming_flags(str(info.value), info.value.parameters, flags) == (
        "--loss ce trains with CE only; --alpha and --beta must then be 0 or not given"
    )
    with pytest.raises(TrainError, match="^loss dis"):
        make_config(data="d", out="o", backbone="resnet18", loss="dis", beta=1.0)
    with pytest.raises(TrainError, match="^lr must be > 0$") as info:
        make_config(data="d", out="o", backbone="resnet18", lr=-1.0)
    assert info.value.parameter == "lr"


def test_official_recipes():
    scratch = make_config(data="d", out="o", backbone="vgg16")
    assert (scratch.lr, scratch.momentum, scratch.weight_decay, scratch.batch_size) == (0.1, 0.9, 5e-4, 32)
    assert (scratch.alpha, scratch.beta, scratch.xi, scratch.normalization, scratch.schedule) == (1.5, 20.0, 3, "half", "step")
    assert milestones(300) == [150, 225] and milestones(4) == [2, 3] and milestones(100) == [50, 75]
    pre = make_config("official-pretrained", data="d", out="o")
    assert (pre.backbone, pre.pretrained, pre.xi, pre.img_size, pre.batch_size) == ("resnet50", "IMAGENET1K_V1", None, 448, 64)
    assert (pre.lr, pre.backbone_lr_factor, pre.schedule, pre.normalization) == (0.05, 0.1, "cosine", "imagenet")
    assert (pre.alpha, pre.beta) == (0.0005, 0.005)
    overridden = make_config("official-pretrained", data="d", out="o", lr=0.01, xi="auto", epochs=5)
    assert (overridden.lr, overridden.xi, overridden.epochs) == (0.01, None, 5)
    assert set(RECIPES) == {"official-scratch", "official-pretrained"}
    with pytest.raises(TrainError, match="backbone is required"):
        make_config(data="d", out="o")


def test_cli_picks_the_pretrained_recipe_with_pretrained_weights(tmp_path, monkeypatch):
    seen = {}

    def fake_train(config, **kwargs):
        seen["config"] = config
        return {"status": "complete", "rank": 0, "best_epoch": 0}

    monkeypatch.setattr(train_cli, "train", fake_train)
    assert train_cli.main(["--data", "d", "--out", str(tmp_path / "o"), "--pretrained", "IMAGENET1K_V1", "--epochs", "7"]) == 0
    config = seen["config"]
    assert (config.recipe, config.backbone, config.xi, config.epochs, config.lr) == ("official-pretrained", "resnet50", None, 7, 0.05)


@pytest.mark.parametrize(("loss", "alpha", "beta"), [("ce", 0.0, 0.0), ("dis", 1.5, 0.0)])
def test_loss_variant_runs_train_with_those_weights(synth_data, tmp_path, loss, alpha, beta):
    out = tmp_path / loss
    summary = train(make_config(data=str(synth_data), out=str(out), epochs=1, loss=loss, **TINY))
    row = summary["last"]
    assert row["train_loss"] == pytest.approx(row["train_ce"] + alpha * row["train_dis"] + beta * row["train_div"], rel=1e-6)
    assert row["train_dis"] > 0 and row["train_div"] > 0  # the MC terms are still measured
    card = read_metadata(out / "last.safetensors")["card"]
    assert (card["loss"], card["alpha"], card["beta"]) == (loss, alpha, beta)
    saved = json.loads((out / "config.json").read_text())["config"]
    assert (saved["alpha"], saved["beta"]) == (alpha, beta)


def test_div_warmup_factor():
    assert [div_warmup_factor(p, 2.0) for p in (0.0, 0.5, 1.0, 2.0, 7.0)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert div_warmup_factor(0.0, 0.0) == 1.0  # no warm-up: the official constant β from the first step


def _loss_setting_per_step(monkeypatch, name: str) -> list:
    """The MCLoss attribute ``name`` at every forward call, from now on."""
    seen: list = []
    forward = MCLoss.forward

    def spy(self, *args, **kwargs):
        seen.append(getattr(self, name))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(MCLoss, "forward", spy)
    return seen


def test_div_warmup_ramps_beta_per_step_and_is_recorded(synth_data, tmp_path, monkeypatch):
    betas = _loss_setting_per_step(monkeypatch, "beta")
    out = tmp_path / "warm"
    assert train_cli.main(["--data", str(synth_data), "--out", str(out), "--epochs", "2", "--div-warmup", "2", *TINY_ARGS]) == 0
    steps = len(betas) // 2
    expected = [20.0 * i / (2 * steps) for i in range(2 * steps)]
    assert betas == pytest.approx(expected)
    card = read_metadata(out / "last.safetensors")["card"]
    assert (card["beta"], card["div_warmup"]) == (20.0, 2.0)
    assert train_cli.main(["--data", str(synth_data), "--out", str(tmp_path / "bad"), "--div-warmup", "-1", *TINY_ARGS]) == 2


def test_dis_topk_reaches_the_loss_and_the_card_and_old_runs_resume(synth_data, tmp_path, monkeypatch, capsys):
    shares = _loss_setting_per_step(monkeypatch, "dis_topk")
    out = tmp_path / "top"
    assert train_cli.main(["--data", str(synth_data), "--out", str(out), "--epochs", "1", "--dis-topk", "0.05", *TINY_ARGS]) == 0
    assert shares and set(shares) == {0.05}
    assert read_metadata(out / "last.safetensors")["card"]["dis_topk"] == 0.05
    assert load_checkpoint(out / "last.safetensors").mc_pool_share == 0.05  # the MC head pools as L_dis did
    ce = tmp_path / "ce"  # no L_dis, no pool to match: the official GAP
    assert train_cli.main(["--data", str(synth_data), "--out", str(ce), "--epochs", "1", "--loss", "ce", "--dis-topk", "0.05", *TINY_ARGS]) == 0
    assert load_checkpoint(ce / "last.safetensors").mc_pool_share == 1.0
    for bad in ("0", "1.5"):
        assert train_cli.main(["--data", str(synth_data), "--out", str(tmp_path / "bad"), "--dis-topk", bad, *TINY_ARGS]) == 2
        assert "--dis-topk must be in (0, 1]" in capsys.readouterr().err
    # a run saved before the option existed resumes with its default (the official mean)
    old = tmp_path / "old"
    assert train_cli.main(["--data", str(synth_data), "--out", str(old), "--epochs", "1", *TINY_ARGS]) == 0
    run = json.loads((old / "config.json").read_text())
    del run["config"]["dis_topk"]
    (old / "config.json").write_text(json.dumps(run))
    assert train_cli.main(["--data", str(synth_data), "--out", str(old), "--resume", "--epochs", "2", *TINY_ARGS]) == 0


def test_dis_topk_share_narrows_geometrically_over_the_first_half():
    assert dis_topk_share(3.0, 10, 0.07) == 0.07  # no --dis-topk-from: the share throughout
    # from 1 to 0.04 over 5 of 10 epochs: 1, 0.2 (= sqrt(1 * 0.04)) half-way, then 0.04 exactly
    shares = [dis_topk_share(p, 10, 0.04, 1.0) for p in (0.0, 2.5, 5.0, 9.9)]
    assert shares[:2] == [1.0, pytest.approx(0.2)] and shares[2:] == [0.04, 0.04]


def test_dis_topk_from_reaches_the_loss_per_step_and_the_card(synth_data, tmp_path, monkeypatch, capsys):
    shares = _loss_setting_per_step(monkeypatch, "dis_topk")
    out = tmp_path / "narrow"
    args = ["--data", str(synth_data), "--out", str(out), "--epochs", "2", "--dis-topk", "0.05", "--dis-topk-from", "0.8"]
    assert train_cli.main([*args, *TINY_ARGS]) == 0
    steps = len(shares) // 2
    # epoch 1 is the first half (2 epochs): 0.8 at the first step, narrowing; the whole of epoch 2 at 0.05
    assert shares[0] == pytest.approx(0.8) and all(a > b for a, b in zip(shares[: steps - 1], shares[1:steps], strict=True))
    assert shares[steps:] == [0.05] * steps
    card = read_metadata(out / "last.safetensors")["card"]
    assert (card["dis_topk"], card["dis_topk_from"]) == (0.05, 0.8)
    assert load_checkpoint(out / "last.safetensors").mc_pool_share == 0.05  # the pool it ended with
    for bad in ("0.01", "1.5"):  # below --dis-topk, above 1
        assert train_cli.main([*args[:-1], bad, *TINY_ARGS]) == 2
        assert "--dis-topk-from must be in [--dis-topk, 1]" in capsys.readouterr().err


def test_cpu_bf16_autocasts_the_training_step_only_and_is_recorded(synth_data, tmp_path, monkeypatch):
    dtypes: list[tuple[torch.dtype, torch.dtype]] = []
    forward = MCLoss.forward

    def spy(self, logits, features, targets, **kwargs):
        dtypes.append((features.dtype, logits.dtype))
        return forward(self, logits, features, targets, **kwargs)

    monkeypatch.setattr(MCLoss, "forward", spy)
    monkeypatch.setattr(setup_mod, "cpu_has_native_bf16", lambda: True)
    out = tmp_path / "bf16"
    assert train_cli.main(["--data", str(synth_data), "--out", str(out), "--epochs", "1", "--cpu-bf16", *TINY_ARGS]) == 0
    # the backbone ran in bf16; the loss gets float logits (the FC head's output is cast back)
    assert dtypes and all(f == torch.bfloat16 and lg == torch.float32 for f, lg in dtypes)
    saved = json.loads((out / "config.json").read_text())["config"]
    assert saved["cpu_bf16"] is True
    row = read_metrics(out / "metrics.csv")[0]
    assert math.isfinite(row["train_loss"]) and 0.0 <= row["test_acc_fc"] <= 1.0
    # precision is a resumable setting: the run continues in fp32 when asked
    dtypes.clear()
    assert train_cli.main(["--out", str(out), "--resume", "--epochs", "2"]) == 0
    assert dtypes and dtypes[0][0] == torch.bfloat16
    dtypes.clear()
    assert train_cli.main(["--out", str(out), "--resume", "--epochs", "3", "--no-cpu-bf16"]) == 0
    assert dtypes and all(f == torch.float32 for f, _ in dtypes)


def test_cpu_bf16_warns_where_bf16_is_emulated(synth_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(setup_mod, "cpu_has_native_bf16", lambda: False)
    out = tmp_path / "slow"
    args = ["--data", str(synth_data), "--out", str(out), "--epochs", "1", "--limit-batches", "1", "--cpu-bf16", *TINY_ARGS]
    assert train_cli.main(args) == 0
    assert "bf16 is emulated and slower than fp32" in capsys.readouterr().err


def test_pretrained_backbone_gets_a_tenth_of_the_lr(tmp_path):
    weights = tmp_path / "resnet18.safetensors"  # stands in for downloaded ImageNet weights
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in torchvision.models.resnet18().state_dict().items()}, str(weights))

    native = build_model("resnet18", 4, xi=None, img_size=32, pretrained=str(weights))
    names = pretrained_parameter_names(native, "resnet18", str(weights))
    assert names == {f"features.{n}" for n, _ in native.features.named_parameters()}

    widened = build_model("resnet18", 4, xi=2, img_size=32, pretrained=str(weights))
    names = pretrained_parameter_names(widened, "resnet18", str(weights))
    trunk = {f"features.{n}" for n, _ in widened.features.named_parameters()}
    assert names == {n for n in trunk if not n.startswith("features.7.")}  # layer4 is new (widened to K)

    config = make_config("official-pretrained", data="d", out="o", backbone="resnet18", pretrained=str(weights), xi=2)
    groups = param_groups(widened, config, names)
    assert [g["name"] for g in groups] == ["head", "backbone"]
    assert groups[0]["lr"] == 0.05 and groups[1]["lr"] == pytest.approx(0.005)
    assert {id(p) for p in groups[1]["params"]} == {id(p) for n, p in widened.named_parameters() if n in names}


# -------------------------------------------------------------------------------------------- refusals


def test_a_run_whose_data_was_typed_relative_resumes_from_anywhere(synth_data, tmp_path, monkeypatch, capsys):
    shutil.copytree(synth_data, tmp_path / "birds")
    monkeypatch.chdir(tmp_path)
    args = ["train", "--data", "birds", "--out", "run", "--epochs", "1", "--limit-batches", "1", *TINY_ARGS]
    assert cli_main(args) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert cli_main(["train", "--out", str(tmp_path / "run"), "--resume", "--epochs", "2"]) == 0, capsys.readouterr().err
    assert [r["epoch"] for r in read_metrics(tmp_path / "run" / "metrics.csv")] == [1, 2]


def test_a_class_without_training_images_is_refused_before_training(synth_data, tmp_path, capsys):
    data = tmp_path / "birds"
    shutil.copytree(synth_data, data)
    labels = dict(line.split() for line in (data / "image_class_labels.txt").read_text().splitlines())
    split = [line.split() for line in (data / "train_test_split.txt").read_text().splitlines()]
    (data / "train_test_split.txt").write_text("".join(f"{i} {0 if labels[i] == '2' else f}\n" for i, f in split))
    out = tmp_path / "run"
    assert cli_main(["train", "--data", str(data), "--out", str(out), "--epochs", "1", *TINY_ARGS]) == 2
    assert "has no training image (1 such classes)" in capsys.readouterr().err
    assert not out.exists()  # refused before the run directory was made, and the lock's folder went with it


def test_a_second_training_into_a_live_runs_directory_is_refused(synth_data, tmp_path, capsys):
    from mcloss.core.lock import hold_folder
    from mcloss.training.loop import RUN_LOCK_STEM

    out = tmp_path / "run"
    with hold_folder(out, stem=RUN_LOCK_STEM, what="training", command="mcloss train (the first)"):
        assert cli_main(["train", "--data", str(synth_data), "--out", str(out), "--epochs", "1", *TINY_ARGS]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{out}: in use by a live" in err and str(os.getpid()) in err, err
    assert sorted(p.name for p in out.iterdir()) == []


def test_resume_refuses_a_missing_directory(tmp_path, capsys):
    assert cli_main(["train", "--out", str(tmp_path / "nope"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "nope") in err and "does not exist" in err


def test_resume_refuses_a_foreign_directory(tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("hello")
    assert cli_main(["train", "--out", str(foreign), "--resume"]) == 2
    assert "not an mcloss training run (no config.json)" in capsys.readouterr().err
    (foreign / "config.json").write_text(json.dumps({"lr": 0.1}))
    assert cli_main(["train", "--out", str(foreign), "--resume"]) == 2
    assert "not an mcloss training run" in capsys.readouterr().err


def test_new_run_refuses_an_out_dir_with_another_run(finished_run, synth_data, capsys):
    before = (finished_run / "metrics.csv").read_text()
    rc = cli_main(["train", "--data", str(synth_data), "--epochs", "1", "--out", str(finished_run), *TINY_ARGS])
    assert rc == 2
    err = capsys.readouterr().err
    assert str(finished_run) in err and "already holds a training run" in err and "--resume" in err
    assert (finished_run / "metrics.csv").read_text() == before


def test_resume_refuses_a_changed_configuration(finished_run, capsys):
    assert cli_main(["train", "--out", str(finished_run), "--resume", "--lr", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "--lr 0.5 differs from the run's 0.01" in err


def test_resume_refuses_mismatched_or_unsafe_state(finished_run, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(finished_run, out)
    (out / "resume.pt").unlink()
    assert cli_main(["train", "--out", str(out), "--resume", "--epochs", "3"]) == 2
    assert "no resume.pt" in capsys.readouterr().err

    class Exploit:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"format": "mcloss-resume/1", "payload": Exploit()}, out / "resume.pt")
    assert cli_main(["train", "--out", str(out), "--resume", "--epochs", "3"]) == 2
    err = capsys.readouterr().err
    assert "unsafe resume state refused" in err and "system" in err  # posix.system, the payload's callable
    assert "weights_only" not in err and len(err.strip().splitlines()) == 1  # no advice to load it unsafely
    assert not (tmp_path / "pwned").exists()
    (out / "resume.pt").write_bytes(b"garbage")
    assert cli_main(["train", "--out", str(out), "--resume", "--epochs", "3"]) == 2
    assert "corrupt resume state" in capsys.readouterr().err

    shutil.copy(finished_run / "resume.pt", out / "resume.pt")
    state = load_resume_state(out / "resume.pt")
    state["epoch"] = 1
    del state["format"]
    save_resume_state(out / "resume.pt", state)
    assert cli_main(["train", "--out", str(out), "--resume", "--epochs", "3"]) == 2
    assert "is from epoch 2 but resume.pt from epoch 1" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------- evaluate


def test_evaluate_both_heads_exactly():
    torch.manual_seed(0)
    model = build_model("resnet18", 6, xi=2, img_size=32).eval()
    images, labels = torch.randn(10, 3, 32, 32), torch.tensor([0, 1, 2, 3, 4, 5, 0, 1, 2, 3])
    loader = DataLoader(TensorDataset(images, labels), batch_size=4)
    model.train()
    result = evaluate(model, loader, "cpu")
    assert model.training  # mode restored
    model.eval()
    with torch.no_grad():
        feats = model.forward_features(images)
        fc, mc = model.head_logits(feats), model.mc_logits(feats)
    assert result["n"] == 10 and result["topk"] == 5
    assert result["fc_top1"] == ((fc.argmax(1) == labels).sum().item()) / 10
    assert result["mc_top1"] == ((mc.argmax(1) == labels).sum().item()) / 10
    assert result["fc_top5"] == (fc.topk(5, 1).indices == labels[:, None]).any(1).sum().item() / 10
    assert result["mc_top5"] == (mc.topk(5, 1).indices == labels[:, None]).any(1).sum().item() / 10
    assert result["loss"] == pytest.approx(torch.nn.functional.cross_entropy(fc, labels).item(), rel=1e-6)


def test_eval_cli_refuses_bad_checkpoints_and_other_datasets(finished_run, synth_data, tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint at all")
    assert cli_main(["eval", "--checkpoint", str(bad), "--data", str(synth_data), "--device", "cpu"]) == 2
    assert str(bad) in capsys.readouterr().err
    other = tmp_path / "other"
    generate_dataset(other, 4, 2, 32, 0)
    rc = cli_main(["eval", "--checkpoint", str(finished_run / "last.safetensors"), "--data", str(other),
                   "--device", "cpu", "--workers", "0"])  # fmt: skip
    assert rc == 2
    assert "do not match the checkpoint" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- DDP

DDP_SCRIPT = """
import json, logging, os, sys
import torch
import torchvision
from safetensors.torch import save_file
from mcloss.training.config import make_config
from mcloss.training.loop import train

logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)  # show the run's progress lines

out, data, dump = sys.argv[1], sys.argv[2], sys.argv[3]
rank = int(os.environ["RANK"])

def dump_weights(epoch, row, model):
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(dump, f"rank{rank}_epoch{epoch}.safetensors"))

config = make_config(data=data, out=out, epochs=2, backbone="resnet18", xi=2, batch_size=4, img_size=32, lr=0.01,
                     workers=0, device="cpu", seed=3, command="ddp test")
summary = train(config, on_epoch_end=dump_weights)
with open(os.path.join(dump, f"summary{rank}.json"), "w") as f:
    json.dump({k: v for k, v in summary.items() if k != "metrics"}, f)
"""


@pytest.mark.slow
def test_ddp_two_cpu_ranks(synth_data, tmp_path):
    out, dump = tmp_path / "run", tmp_path / "dump"
    dump.mkdir()
    script = tmp_path / "ddp_train.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", str(script), str(out), str(synth_data), str(dump)],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("epoch 1/2") == 1  # only rank 0 reports and writes
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["best.safetensors", "config.json", "curves.png", "last.safetensors", "metrics.csv", "resume.pt"]
    )
    rows = read_metrics(out / "metrics.csv")
    assert [r["epoch"] for r in rows] == [1, 2]
    run = json.loads((out / "config.json").read_text())
    assert run["world_size"] == 2
    for epoch in (1, 2):
        w0 = load_file(str(dump / f"rank0_epoch{epoch}.safetensors"))
        w1 = load_file(str(dump / f"rank1_epoch{epoch}.safetensors"))
        for key in w0:
            assert torch.equal(w0[key], w1[key]), (epoch, key)
    last = _state(out / "last.safetensors")
    for key, value in load_file(str(dump / "rank1_epoch2.safetensors")).items():
        assert torch.equal(last[key], value), key
    s0, s1 = (json.loads((dump / f"summary{r}.json").read_text()) for r in (0, 1))
    assert s0["run_id"] == s1["run_id"] == run["run_id"]
    assert s0["last"]["test_acc_fc"] == s1["last"]["test_acc_fc"] and s0["last"]["train_loss"] == s1["last"]["train_loss"]
    # Test metrics are reduced over both ranks' shards: they equal one evaluation of the whole test split.
    model = load_checkpoint(out / "last.safetensors")
    from mcloss.data.datasets import build_datasets

    _, test_ds, _ = build_datasets(str(synth_data), "auto", model.transform, model.transform)
    result = evaluate(model, DataLoader(test_ds, batch_size=8), "cpu")
    assert result["n"] == len(test_ds) == 9
    assert result["fc_top1"] == pytest.approx(rows[-1]["test_acc_fc"], abs=1e-8)
    assert result["mc_top1"] == pytest.approx(rows[-1]["test_acc_mc"], abs=1e-8)
