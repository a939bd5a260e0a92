"""``mcloss import``: checkpoints of the official code, FGVCLib, Kurumi233 and torchvision, read safely and exactly.

Each source model is our own transcription of that project's code (``transcribed.py``), filled with random
weights and non-trivial BN statistics, saved the way that project saves it, then imported.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torchvision
import transcribed as T
from PIL import Image
from safetensors import safe_open

from mcloss.cli import main as cli
from mcloss.core.checkpoint import DIGEST_KEY, load_checkpoint, rewrite_card, weights_digest
from mcloss.core.errors import ParameterError
from mcloss.core.groups import split_channels
from mcloss.interop.sources import SourceError, import_checkpoint, import_model, read_class_list, read_source


def _mc_reference(f: torch.Tensor, groups: list[int]) -> torch.Tensor:
    """CCMP then GAP over each consecutive group of the source's F, written out by hand."""
    out, start = [], 0
    for size in groups:
        out.append(f[:, start : start + size].amax(1).mean((1, 2)))
        start += size
    return torch.stack(out, 1)


def _save(src, path: Path, setting: dict | None) -> None:
    if setting is not None:
        src.save(path, setting)
    else:
        src.save(path)


#: (id, source builder, input side, setting.txt, layout, backbone, groups, transform resize/crop/mean[0])
CASES = [
    ("official-vgg16-cuda", lambda: T.OfficialVGG(200, 3), 224, None, "official-vgg16", "vgg16_bn", [3] * 200,
     ([224, 224], None, 0.5)),
    ("official-vgg16-early", lambda: T.OfficialVGG(20, 3, early=True), 224, None, "official-vgg16-early", "vgg16_bn",
     [3] * 20, ([224, 224], None, 0.5)),
    ("official-resnet18", lambda: T.OfficialResNet("resnet18", 20, 3), 224, None, "official-resnet", "resnet18",
     [3] * 20, ([224, 224], None, 0.5)),
    # ξ·C = 512, ResNet-18's own width: the script still rebuilds layer4 at stride 1 (F 14 × 14 at 224 px)
    ("official-resnet18-512", lambda: T.OfficialResNet("resnet18", 128, 4), 224, None, "official-resnet", "resnet18",
     [4] * 128, ([224, 224], None, 0.5)),
    ("official-resnet50", lambda: T.OfficialResNet("resnet50", 200), 448, None, "official-resnet", "resnet50",
     [10] * 152 + [11] * 48, ([600, 600], [448, 448], 0.5)),
    ("fgvclib-vgg16", lambda: T.FGVCLibMCL(20, 3), 224, None, "fgvclib-vgg16", "vgg16", [3] * 20,
     ([224, 224], None, 0.5)),
    ("kurumi-scratch-dense", lambda: T.Kurumi(20, 3), 224, {"model_name": "vgg16bn", "eps": 3, "inp_size": 224},
     "kurumi", "vgg16_bn", [3] * 20, ([224, 224], None, 0.5)),
    ("kurumi-scratch-linear", lambda: T.Kurumi(20, 3, metric="linear"), 224, {"eps": 3, "inp_size": 224}, "kurumi",
     "vgg16_bn", [3] * 20, ([224, 224], None, 0.5)),
    ("kurumi-resnet50", lambda: T.Kurumi(200, pretrained="resnet50"), 448, {"pretrained": 1, "inp_size": 448},
     "kurumi", "resnet50", [10] * 152 + [11] * 48, ([600, 600], [448, 448], 0.485)),
    ("torchvision-resnet50", lambda: T.TorchvisionCE("resnet50", 20), 224, None, "torchvision", "resnet50",
     split_channels(2048, 20), (256, [224, 224], 0.485)),
    ("torchvision-resnet34", lambda: T.TorchvisionCE("resnet34", 7), 224, None, "torchvision", "resnet34",
     split_channels(512, 7), (256, [224, 224], 0.485)),
    ("torchvision-resnet18-dropout-head", lambda: T.TorchvisionCE("resnet18", 5, dropout=0.3), 224, None,
     "torchvision", "resnet18", split_channels(512, 5), (256, [224, 224], 0.485)),
    ("torchvision-vgg16_bn", lambda: T.TorchvisionCE("vgg16_bn", 20), 224, None, "torchvision", "vgg16_bn",
     split_channels(512, 20), (256, [224, 224], 0.485)),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_each_layout_imports_exactly(case, tmp_path):
    _, make, size, setting, layout, backbone, groups, (resize, crop, mean0) = case
    src = T.randomize(make(), seed=3)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        nchw_logits, nchw_f = src(x)
        # mcloss runs backbones on channels-last batches: the reference runs on the same layout, so that only
        # the import is compared; the layouts themselves differ by float rounding (checked below)
        ref_logits, ref_f = src(x.contiguous(memory_format=torch.channels_last))
    assert ((nchw_f - ref_f).abs().max() / nchw_f.abs().max()).item() <= 1e-5
    assert ((nchw_logits - ref_logits).abs().max() / nchw_logits.abs().max()).item() <= 1e-5
    path = tmp_path / "ckpt.pth"
    _save(src, path, setting)

    model = import_model(path)
    with torch.no_grad():
        f = model.forward_features(x)
        logits, mc = model.head_logits(f), model.mc_logits(f)
    assert ((logits - ref_logits).abs().max() / ref_logits.abs().max()).item() <= 1e-4
    assert (f - ref_f).abs().max().item() <= 1e-5
    assert model.groups == groups and model.config["backbone"] == backbone
    assert torch.allclose(mc, _mc_reference(ref_f, groups), rtol=1e-5, atol=1e-5)
    assert model.forward(x).argmax(1).tolist() == ref_logits.argmax(1).tolist()

    card = model.card
    assert card["imported"] is True and card["training"] is None
    assert card["source"]["layout"] == layout and card["source"]["file"] == "ckpt.pth"
    assert card["source"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert card["source"]["key_mapping"], "the key mapping used is recorded"
    tf = model.transform.to_dict()
    assert (tf["resize"], tf["crop"], tf["mean"][0]) == (resize, crop, mean0)


def test_official_keys_with_and_without_the_dataparallel_infix(tmp_path):
    src = T.randomize(T.OfficialResNet("resnet18", 5, 3), seed=1)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref, _ = src(x)
    src.save(tmp_path / "cpu.pth", data_parallel=False)
    src.save(tmp_path / "cuda.pth", data_parallel=True)
    assert any(".module." in k for k in torch.load(tmp_path / "cuda.pth", weights_only=True))
    for name, infix in (("cpu.pth", False), ("cuda.pth", True)):
        model = import_model(tmp_path / name)
        assert model.card["source"]["data_parallel_keys"] is infix
        with torch.no_grad():
            assert torch.allclose(model(x), ref, rtol=1e-5, atol=1e-4)


def test_keys_under_a_wrappers_prefix_import_and_the_prefix_is_recorded(tmp_path, capsys):
    """A Lightning module's ``model.`` inside its ``state_dict`` (with DataParallel's ``module.`` under it), and a
    ``{'net': state_dict, 'acc', 'epoch'}`` file's ``net.``; keys that fit nothing keep the message's example."""
    tv = T.randomize(T.TorchvisionCE("resnet18", 6), seed=2)
    official = T.randomize(T.OfficialResNet("resnet18", 4, 3), seed=5)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        tv_ref, official_ref = tv(x)[0], official(x)[0]
    tv_state = tv.net.state_dict()
    lightning = {
        "state_dict": {f"model.module.{k}": v for k, v in official.state_dict().items()},
        "epoch": 7, "global_step": 350, "pytorch-lightning_version": "2.4.0",
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.001}]}], "hyper_parameters": {"lr": 0.001},
    }  # fmt: skip
    torch.save(lightning, tmp_path / "lightning.ckpt")
    torch.save({"net": tv_state, "acc": 81.25, "epoch": 30}, tmp_path / "net.pth")
    for name, ref, prefix, layout in (("lightning.ckpt", official_ref, "model.", "official-resnet"),
                                      ("net.pth", tv_ref, "net.", "torchvision")):  # fmt: skip
        model = import_model(tmp_path / name)
        assert model.card["source"]["key_prefix"] == prefix and model.card["source"]["layout"] == layout
        with torch.no_grad():
            assert torch.allclose(model(x), ref, rtol=1e-5, atol=1e-4)
    assert import_model(tmp_path / "net.pth").card["source"]["extras"] == {"acc": 81.25, "epoch": 30}
    _write(tmp_path / "names.txt", "a\nb\nc\nd\n")
    argv = ["import", str(tmp_path / "lightning.ckpt"), "--out", str(tmp_path / "l.safetensors"), "--classes"]
    assert cli([*argv, str(tmp_path / "names.txt")]) == 0
    assert "imported lightning.ckpt (official-resnet, DataParallel keys, keys under 'model.') as resnet18" in capsys.readouterr().out
    torch.save({f"model.{k}": v for k, v in tv_state.items() if not k.startswith("fc.")}, tmp_path / "trunk.pth")
    with pytest.raises(SourceError, match=r"trunk\.pth: not any known layout \(keys begin model\.conv1\.weight"):
        import_model(tmp_path / "trunk.pth")


def test_keys_beside_the_models_are_left_out_only_by_a_chosen_prefix(tmp_path, capsys):
    """A Lightning module with an EMA copy (AveragedModel: ``module.`` and ``n_averaged``) and a loss's class
    weights: nothing is left out unasked; the message names the prefixes that fit, and --prefix chooses."""
    from torch.optim.swa_utils import AveragedModel

    live, averaged = (T.randomize(T.TorchvisionCE("resnet18", 4), seed=s).net.eval() for s in (7, 8))
    state = {f"model.{k}": v for k, v in live.state_dict().items()}
    state |= {f"ema.{k}": v for k, v in AveragedModel(averaged).state_dict().items()}
    state["criterion.weight"] = torch.ones(4)
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "run.ckpt")
    with pytest.raises(SourceError) as info:
        import_model(tmp_path / "run.ckpt")
    assert str(info.value) == (
        f"{tmp_path / 'run.ckpt'}: the keys as saved fit no layout, but those under 'model.' and 'ema.' each fit one "
        "(beside criterion.); choose the model's keys with mcloss import --prefix"
    )
    x = torch.randn(1, 3, 224, 224)
    chosen = (("model.", "model.", live, ["ema.", "criterion."]), ("ema", "ema.", averaged, ["model.", "criterion.", "ema.n_averaged"]))
    for prefix, recorded, net, left_out in chosen:
        model = import_model(tmp_path / "run.ckpt", prefix=prefix)
        assert (model.card["source"]["key_prefix"], model.card["source"]["left_out"]) == (recorded, left_out)
        # the EMA's module. is its AveragedModel's, not DataParallel's
        assert not model.card["source"]["data_parallel_keys"]
        assert model.card["source"]["averaged_model"] is (prefix == "ema")
        with torch.no_grad():
            assert torch.allclose(model(x), net(x), rtol=1e-5, atol=1e-4)
    firsts = r"\(the keys' first segments: model\., ema\., criterion\.\)$"
    with pytest.raises(SourceError, match=rf"run\.ckpt: no key begins 'loss\.' {firsts}"):
        import_model(tmp_path / "run.ckpt", prefix="loss")
    _write(tmp_path / "names.txt", "a\nb\nc\nd\n")
    argv = ["import", str(tmp_path / "run.ckpt"), "--out", str(tmp_path / "m.safetensors"), "--classes"]
    assert cli([*argv, str(tmp_path / "names.txt"), "--prefix", "model."]) == 0
    assert "(torchvision, keys under 'model.', left out ema., criterion.) as resnet18" in capsys.readouterr().out
    assert cli([*argv, str(tmp_path / "names.txt"), "--prefix", "ema."]) == 0
    summary = "(torchvision, AveragedModel keys, keys under 'ema.', left out model., criterion., ema.n_averaged) as"
    assert summary in capsys.readouterr().out


def test_what_lies_beside_the_model_is_named_never_taken_as_it(tmp_path):
    """A backbone beside a head of the user's own is refused without a suggestion (the backbone's unused fc is
    not the head); a nested prefix is chosen and what it leaves out is named to its depth; timm's
    state_dict_ema beside state_dict and an AveragedModel's count under a shared prefix are named too."""
    from torch.optim.swa_utils import AveragedModel

    net = T.randomize(T.TorchvisionCE("resnet18", 4), seed=9).net.eval()
    weights = net.state_dict()
    composite = {f"model.backbone.{k}": v for k, v in weights.items()} | {"model.head.weight": torch.ones(4, 512)}
    torch.save({"state_dict": composite}, tmp_path / "composite.ckpt")
    with pytest.raises(SourceError, match=r"composite\.ckpt: not any known layout \(keys begin model\.backbone\."):
        import_model(tmp_path / "composite.ckpt")
    nested = {f"model.net.{k}": v for k, v in weights.items()} | {"model.criterion.weight": torch.ones(4)}
    torch.save({"state_dict": nested}, tmp_path / "nested.ckpt")
    with pytest.raises(SourceError, match=r"under 'model\.net\.' fit one \(beside model\.criterion\.\); choose"):
        import_model(tmp_path / "nested.ckpt")
    model = import_model(tmp_path / "nested.ckpt", prefix="model.net")
    assert (model.card["source"]["key_prefix"], model.card["source"]["left_out"]) == ("model.net.", ["model.criterion."])
    torch.save({"state_dict": weights, "state_dict_ema": weights, "epoch": 3}, tmp_path / "timm.pth")
    assert import_model(tmp_path / "timm.pth").card["source"]["left_out"] == ["state_dict_ema"]
    torch.save({"net": AveragedModel(net).state_dict()}, tmp_path / "swa.pth")
    model = import_model(tmp_path / "swa.pth")
    assert (model.card["source"]["key_prefix"], model.card["source"]["left_out"]) == ("net.", ["net.n_averaged"])
    assert model.card["source"]["averaged_model"] and not model.card["source"]["data_parallel_keys"]
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(model(x), net(x), rtol=1e-5, atol=1e-4)


def test_what_training_scripts_save_beside_the_weights_is_read_not_run(tmp_path):
    """numpy scalars (a best accuracy from np.mean) and the run's argparse.Namespace are plain values, read without
    running code; the numbers go into the card. An object array or a class of the script stays refused."""
    import argparse

    import numpy as np

    state = T.randomize(T.OfficialResNet("resnet18", 4, 3), seed=4).state_dict()
    torch.save({"state_dict": state, "best_acc": np.float64(0.7125), "epoch": np.int64(41),
                "args": argparse.Namespace(lr=0.002, arch="resnet18")}, tmp_path / "run.pth")  # fmt: skip
    model = import_model(tmp_path / "run.pth")
    assert model.card["source"]["extras"] == {"best_acc": 0.7125, "epoch": 41}
    torch.save({"state_dict": state, "names": np.array(["a", None], dtype=object)}, tmp_path / "objects.pth")
    with pytest.raises(SourceError, match=r"objects\.pth: holds pickled Python objects"):
        import_model(tmp_path / "objects.pth")
    # a Lightning .ckpt whose save_hyperparameters() kept a module: the weights are under 'state_dict'
    torch.save({"state_dict": state, "hyper_parameters": {"loss": torch.nn.MSELoss()}}, tmp_path / "run.ckpt")
    with pytest.raises(SourceError) as info:
        import_model(tmp_path / "run.ckpt")
    assert "holds pickled Python objects (torch.nn.modules.loss.MSELoss)" in str(info.value)
    assert str(info.value).endswith(
        f"torch.save(torch.load({str(tmp_path / 'run.ckpt')!r}, weights_only=False)['state_dict'], 'weights.pth')"
    )


def test_the_written_checkpoint_loads_as_an_ordinary_one(tmp_path):
    src = T.randomize(T.OfficialResNet("resnet18", 4, 3), seed=2)
    src.save(tmp_path / "w.pth")
    names = ["Albatross", "Bunting", "Crow", "Dove"]
    made = import_checkpoint(tmp_path / "w.pth", tmp_path / "m.safetensors", classes=names)
    loaded = load_checkpoint(tmp_path / "m.safetensors")
    assert loaded.class_names == names and loaded.card == json.loads(json.dumps(made.card))
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(loaded(x), made(x))
    assert loaded.config["head"]["grid"] == [1, 1]  # MaxPool2d(14) on the 14 × 14 map


def test_auto_names_both_layouts_when_two_fit(tmp_path):
    official = T.randomize(T.OfficialResNet("resnet18", 4, 3)).state_dict()
    tv = T.TorchvisionCE("resnet18", 4).net.state_dict()
    torch.save(official | tv, tmp_path / "both.pth")
    with pytest.raises(SourceError, match=r"both\.pth: fits two layouts, official-resnet and torchvision; choose one"):
        import_model(tmp_path / "both.pth")


def test_a_named_source_that_does_not_fit_is_refused(tmp_path):
    T.FGVCLibMCL(4, 3).save(tmp_path / "fgvclib.pth")
    with pytest.raises(SourceError, match=r"fgvclib\.pth: not a kurumi layout \(keys begin backbone\.features"):
        import_model(tmp_path / "fgvclib.pth", layout="kurumi")
    with pytest.raises(SourceError, match=r"fgvclib\.pth: not an official layout"):
        import_model(tmp_path / "fgvclib.pth", layout="official")
    with pytest.raises(ParameterError, match="layout must be auto or one of"):
        import_model(tmp_path / "fgvclib.pth", layout="timm")
    _write(tmp_path / "setting.txt", "eps:3\n")  # Kurumi233's file, given for another project's checkpoint
    with pytest.raises(ParameterError, match=r"^setting: only Kurumi233 checkpoints come with a setting\.txt; .*fgvclib\.pth is fgvclib-vgg16$"):
        import_model(tmp_path / "fgvclib.pth", setting=tmp_path / "setting.txt")
    with pytest.raises(SourceError, match="weights are a resnet18, not the resnet50 of --arch"):
        T.TorchvisionCE("resnet18", 4).save(tmp_path / "tv.pth")
        import_model(tmp_path / "tv.pth", arch="resnet50")


_PICKLER = """
import os, sys, torch
from torch import nn

class model_bn(nn.Module):  # defined in __main__, as the official scripts define it
    def __init__(self):
        super().__init__()
        self.classifier = nn.Linear(4, 2)

class Payload:
    def __reduce__(self):
        return (os.system, ("touch " + sys.argv[2],))

torch.save(model_bn(), sys.argv[1] + "/whole.pth")
torch.save({"net": Payload()}, sys.argv[1] + "/payload.pth")
"""


def test_a_pickled_model_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"
    subprocess.run([sys.executable, "-c", _PICKLER, str(tmp_path), str(marker)], check=True)
    with pytest.raises(SourceError) as info:
        import_model(tmp_path / "whole.pth")
    message = str(info.value)
    assert "whole.pth: holds pickled Python objects (__main__.model_bn)" in message
    assert "torch.save(net.state_dict(), 'weights.pth')" in message and "\n" not in message
    with pytest.raises(SourceError, match="payload.pth: holds pickled Python objects"):
        import_model(tmp_path / "payload.pth")
    assert not marker.exists()


def test_a_torchscript_archive_is_refused_with_how_to_save_its_weights(tmp_path, capsys):
    """torch.load refuses a TorchScript archive under weights_only (after a warning); mcloss says so in one line
    that says how to save its weights, the command shows nothing else, and the weights saved that way import."""
    net = T.randomize(T.TorchvisionCE("resnet18", 3), seed=6).net.eval()
    x = torch.randn(1, 3, 224, 224)
    torch.jit.trace(net, x).save(tmp_path / "traced.pt")
    with pytest.raises(SourceError) as info:
        import_model(tmp_path / "traced.pt")
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'traced.pt'}: a TorchScript archive") and "\n" not in message
    assert f"torch.save(torch.jit.load({str(tmp_path / 'traced.pt')!r}).state_dict(), 'weights.pth')" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # python -W error: torch's warning is raised before its refusal
        with pytest.raises(SourceError, match=r"traced\.pt: a TorchScript archive"):
            import_model(tmp_path / "traced.pt")
    _write(tmp_path / "names.txt", "a\nb\nc\n")
    argv = ["import", str(tmp_path / "traced.pt"), "--out", str(tmp_path / "t.safetensors"), "--classes"]
    assert cli([*argv, str(tmp_path / "names.txt")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "a TorchScript archive" in err, err  # torch's warning is not shown
    torch.save(torch.jit.load(tmp_path / "traced.pt").state_dict(), tmp_path / "weights.pth")
    with torch.no_grad():
        assert torch.allclose(import_model(tmp_path / "weights.pth")(x), net(x), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"", "empty or truncated"), (b"\x80\x02garbage" * 4, "not a readable PyTorch file"), (None, "no such file"),
     ("dir", "is a directory, not a checkpoint file"),
     (b"hello, this is not a checkpoint\n", r"not a PyTorch file \(neither torch\.save's zip archive nor its older format\)"),
     (pickle.dumps({"w": [1.0, 2.0]}, protocol=0), r"a plain pickle \(pickle\.dump\)"),
     # a 75-byte file declaring 2**40 bytes: refused in one line (reading the declared length failed once)
     (b"\x80\x04\x8e" + (1 << 40).to_bytes(8, "little") + b"x" * 64, "not a readable PyTorch file"),
     # megabytes of opcodes torch refuses at once: told a plain pickle from a bounded probe
     (b"\x80\x04" + b"N" * (3 << 20) + b".", r"a plain pickle \(pickle\.dump\)"),
     (pickle.dumps({"w": [1.0, 2.0]}, protocol=4), r"a plain pickle \(pickle\.dump\), not a file torch\.save wrote"),
     (pickle.dumps({"run": os.system}, protocol=4), r"a plain pickle \(pickle\.dump\)")],
    ids=["empty", "garbage", "missing", "dir", "text", "protocol-0", "huge-length", "long-stream", "plain-pickle",
         "plain-pickle-with-code"],
)
def test_unreadable_sources_give_one_line_naming_the_file(tmp_path, content, reason):
    """One reason each, and nothing else: torch's warning on a pickle protocol it did not write is not shown."""
    path = tmp_path / "src.pth"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(SourceError, match=rf"src\.pth: {reason}"):
        warnings.simplefilter("always")
        read_source(path)
    assert not caught, [str(w.message) for w in caught]


def test_an_mcloss_checkpoint_given_to_import_is_named_as_one(tmp_path):
    out = tmp_path / "m.safetensors"
    T.OfficialVGG(4, 3).save(tmp_path / "w.pth")
    import_checkpoint(tmp_path / "w.pth", out)
    with pytest.raises(SourceError, match=r"m\.safetensors: already an mcloss checkpoint \(mcloss/1\); use it as it is"):
        import_model(out)


def test_class_names_are_read_from_a_pipe(tmp_path):
    """``--classes <(cut -d' ' -f2 classes.txt)``: a pipe, not a regular file, read as one (and bounded)."""
    r, w = os.pipe()
    os.write(w, b"Crow\nWren\n")
    os.close(w)
    try:
        assert read_class_list(f"/dev/fd/{r}") == ["Crow", "Wren"]
    finally:
        os.close(r)
    with pytest.raises(SourceError, match=r"/dev/zero: more than 16 MiB, not a list of class names"):
        read_class_list("/dev/zero")


def test_truncated_and_tensorless_files(tmp_path):
    T.OfficialResNet("resnet18", 4, 3).save(tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceError, match=r"cut\.pth: not a readable PyTorch file"):
        read_source(tmp_path / "cut.pth")
    torch.save({"acc": 0.5, "epoch": 3}, tmp_path / "meta.pth")
    with pytest.raises(SourceError, match=r"meta\.pth: holds no tensors"):
        read_source(tmp_path / "meta.pth")


def test_class_names_from_a_file_an_imagefolder_root_and_a_cub_root(tmp_path):
    (tmp_path / "names.txt").write_text("Crow\nAlbatross\n\nBunting\n")
    assert read_class_list(tmp_path / "names.txt") == ["Crow", "Albatross", "Bunting"]
    root = tmp_path / "train"
    for name in ("010.Wren", "002.Crow", "001.Albatross", ".cache"):
        (root / name).mkdir(parents=True)
    (root / "notes.txt").write_text("not a class")
    assert read_class_list(root) == ["Albatross", "Crow", "Wren"]  # ImageFolder's sorted order
    cub = tmp_path / "CUB_200_2011"
    cub.mkdir()
    (cub / "classes.txt").write_text("2 002.Crow\n1 001.Albatross\n")
    assert read_class_list(cub) == ["Albatross", "Crow"]
    (tmp_path / "dup.txt").write_text("Crow\nCrow\n")
    with pytest.raises(SourceError, match=r"dup\.txt: 'Crow' appears twice"):
        read_class_list(tmp_path / "dup.txt")
    T.OfficialResNet("resnet18", 4, 3).save(tmp_path / "w.pth")
    with pytest.raises(SourceError, match="the weights have 4 classes but 3 class names were given"):
        import_model(tmp_path / "w.pth", classes=read_class_list(root))
    # the API reads a path as the CLI does, rather than taking a string's characters for names
    (root / "011.Finch").mkdir()
    assert import_model(tmp_path / "w.pth", classes=str(root)).class_names == ["Albatross", "Crow", "Wren", "Finch"]


def test_class_names_files_as_editors_and_cub_write_them(tmp_path):
    """A byte-order mark (Notepad, Excel) is not part of the first name; CUB's classes.txt given as a file reads as
    its root does; numbered lines that are not an in-order index stay whole."""
    (tmp_path / "bom.txt").write_bytes("alpha\nbeta\n".encode("utf-8-sig"))
    assert read_class_list(tmp_path / "bom.txt") == ["alpha", "beta"]
    (tmp_path / "classes.txt").write_text("1 001.Black_footed_Albatross\n2 002.Laysan_Albatross\n3 003.Sooty_Albatross\n")
    assert read_class_list(tmp_path / "classes.txt") == ["Black_footed_Albatross", "Laysan_Albatross", "Sooty_Albatross"]
    (tmp_path / "zero.txt").write_text("0 cat\n1 dog\n")
    assert read_class_list(tmp_path / "zero.txt") == ["cat", "dog"]
    (tmp_path / "cars.txt").write_text("2012 Tesla Model S\n2007 Chevrolet Malibu\n")  # years, not an index
    assert read_class_list(tmp_path / "cars.txt") == ["2012 Tesla Model S", "2007 Chevrolet Malibu"]


def test_kurumi_setting_is_read_and_checked(tmp_path):
    T.Kurumi(4, 3).save(tmp_path / "ckpt.pth", {"eps": 5, "inp_size": 224})
    with pytest.raises(SourceError, match="setting.txt says eps 5 but the weights have 3 channels per class"):
        import_model(tmp_path / "ckpt.pth")
    model = import_model(tmp_path / "ckpt.pth", setting=_write(tmp_path / "other.txt", "eps:3\ninp_size:224\n"))
    assert model.card["source"]["setting"]["eps"] == "3" and model.card["source"]["extras"] == {"acc": 0.6617, "epoch": 211}


def _raw_metadata(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_fixed_pool_refuses_another_input_size(tmp_path):
    """The source's head max-pools fixed cells (2 × 2 before VGG's 7 × 7 grid, 14 × 14 in the official ResNets):
    at another size mcloss's adaptive pool would read other cells, so the import refuses instead of differing."""
    T.OfficialVGG(4, 3).save(tmp_path / "vgg.pth")
    with pytest.raises(SourceError, match=r"at 240 px \(as given\) F is 15 × 15, but the source's head max-pools 2 × 2 cells"):
        import_model(tmp_path / "vgg.pth", img_size=240)
    T.OfficialResNet("resnet50", 4).save(tmp_path / "r50.pth")
    with pytest.raises(SourceError, match=r"F is 16 × 16.*needs F of 14 × 14; import at the source's input size \(img_size 448\)$"):
        import_model(tmp_path / "r50.pth", img_size=512)
    with pytest.raises(ParameterError, match=r"img_size must be in 16\.\.1024, got 2000"):
        import_model(tmp_path / "r50.pth", img_size=2000)
    model = import_model(tmp_path / "r50.pth")
    assert model.config["img_size"] == 448 and model.config["feature_hw"] == [14, 14]
    # torchvision's VGG runs at any size (an adaptive average after its last max-pool): the refusal says so, not
    # that 448 px is other than the source's size
    T.TorchvisionCE("vgg16", 4).save(tmp_path / "tv_vgg.pth")
    with pytest.raises(SourceError, match=r"tv_vgg\.pth: at 448 px \(as given\) torchvision's VGG pools its max-pooled "
                       r"14 × 14 cells adaptively to 7 × 7, a head mcloss does not build; mcloss reads a torchvision VGG16 at "
                       r"224 px \(img_size 224\)"):
        import_model(tmp_path / "tv_vgg.pth", img_size=448)


def test_a_lone_kurumi_checkpoint_trained_at_448_imports_at_448(tmp_path):
    """Without its setting.txt a Kurumi233 ckpt.pth still says its input size: the head reads a 14 × 14 grid of
    2 × 2 pools, so F is 28 × 28, at 448 px; the import takes that size (and says so) rather than refusing."""
    src = T.Kurumi(4, 3)
    src.metric.dense = T._dense(4 * 3 * 14 * 14, 4)
    src = T.randomize(src, seed=11)
    src.save(tmp_path / "ckpt.pth")
    assert not (tmp_path / "setting.txt").exists()
    model = import_model(tmp_path / "ckpt.pth")
    assert model.config["img_size"] == 448 and model.config["feature_hw"] == [28, 28]
    assert model.card["source"]["input_size"].startswith("448 px")
    assert model.transform.to_dict()["crop"] == [448, 448]  # Kurumi233's 600 × 600 resize and 448 crop
    x = torch.randn(1, 3, 448, 448, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = src(x.contiguous(memory_format=torch.channels_last))[0]
        assert ((model(x) - ref).abs().max() / ref.abs().max()).item() <= 1e-4
    with pytest.raises(SourceError, match=r"import at the source's input size \(img_size 448\)$"):
        import_model(tmp_path / "ckpt.pth", img_size=224)  # a size given is taken as given, or refused


def test_a_tensor_that_claims_more_than_its_storage_is_refused(tmp_path):
    """A stride-0 view in a tiny file could claim tens of GB; it is refused before any shape is used."""
    state = T.OfficialResNet("resnet18", 4, 3).state_dict()
    state["features.0.weight"] = torch.zeros(1).expand(3_000_000, 512, 3, 3)
    torch.save(state, tmp_path / "bomb.pth")
    assert (tmp_path / "bomb.pth").stat().st_size < 100_000_000
    with pytest.raises(SourceError, match=r"bomb\.pth: tensor 'features\.0\.weight' claims more elements than"):
        read_source(tmp_path / "bomb.pth")


def test_kurumi_pretrained_vgg_is_refused_by_name_and_resnet_groups_are_noted(tmp_path):
    T.Kurumi(4, pretrained="vgg16bn").save(tmp_path / "ckpt.pth", {"pretrained": 1, "inp_size": 224})
    with pytest.raises(SourceError, match="Kurumi233's pretrained vgg16bn .* is not a layout mcloss builds"):
        import_model(tmp_path / "ckpt.pth")
    T.Kurumi(4, pretrained="resnet18", metric="linear").save(tmp_path / "ckpt.pth", {"pretrained": 1, "inp_size": "x"})
    with pytest.raises(SourceError, match=r"setting\.txt: inp_size must be an integer in 16\.\.1024, got 'x'"):
        import_model(tmp_path / "ckpt.pth")
    _write(tmp_path / "setting.txt", "pretrained:1\ninp_size:2048\n")  # out of range: setting.txt is named, not --img-size
    with pytest.raises(SourceError, match=r"setting\.txt: inp_size must be an integer in 16\.\.1024, got '2048'"):
        import_model(tmp_path / "ckpt.pth")
    model = import_model(tmp_path / "ckpt.pth", img_size=224)
    assert model.groups == [128] * 4 and "assumed" in model.card["source"]["groups"]


def test_an_official_file_of_other_than_200_classes_says_which_groups_it_assumed(tmp_path, capsys):
    """The official scripts train 200 groups (3 channels each in 600; ``[10] * 152 + [11] * 48`` in a
    ResNet-50's 2048) whatever classes_num is. A file of another class count at that width may come from a script
    left so, which the weights cannot tell: the import says the groups it read are assumed, on the card and on the
    command line. A width the script's Mask would not multiply (60 channels) means its groups were changed to match:
    nothing is assumed. With only classes_num changed to 196 the 600 channels cannot be read, and the refusal says why."""
    T.OfficialVGG(100, 6).save(tmp_path / "vgg100.pth")  # 600 channels
    names = _write(tmp_path / "names.txt", "\n".join(f"c{i}" for i in range(100)))
    out = tmp_path / "vgg100.safetensors"
    assert cli(["import", str(tmp_path / "vgg100.pth"), "--out", str(out), "--classes", str(names)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "100 classes x 6 channels" in lines[0] and len(lines) == 2
    assert re.fullmatch(
        r"assumed: the official script trains 200 groups of 3 channels \(cnum = 3\) whatever classes_num is; this file "
        r"has 100 classes, read as 100 groups of 6 channels, one per class: right only if .*", lines[1]
    )
    assert load_checkpoint(out).card["source"]["assumed"] == [lines[1].removeprefix("assumed: ")]
    T.OfficialVGG(20, 3).save(tmp_path / "vgg20.pth")
    T.OfficialResNet("resnet50", 200).save(tmp_path / "r50_200.pth")
    for name in ("vgg20.pth", "r50_200.pth"):
        card = import_model(tmp_path / name).card
        assert "assumed" not in card["source"] and card["loss"] == "mc", name
    T.OfficialResNet("resnet50", 196).save(tmp_path / "r50_196.pth")
    (said,) = import_model(tmp_path / "r50_196.pth").card["source"]["assumed"]
    assert said.startswith("the official script trains 200 groups ([10] * 152 + [11] * 48) whatever classes_num is; "
                           "this file has 196 classes, read as 196 groups of 10/11 channels"), said
    T.OfficialVGG(196, width=600).save(tmp_path / "vgg196.pth")
    with pytest.raises(SourceError, match=r"vgg196\.pth: 600 channels do not split into 196 equal class groups \(an "
                       r"official script run with only classes_num changed trains 200 groups of 3 channels \(cnum = 3\) "
                       r"and leaves 4 of them to no class, which mcloss does not read\)$"):
        import_model(tmp_path / "vgg196.pth")


def test_the_official_scripts_ce_baselines(tmp_path):
    """The scripts' cross-entropy baselines keep the backbone's own 512 channels, which 200 classes do not divide.
    The VGG16 one imports as a CE model (the same logits, its channels split for display, the card saying so); the
    ResNet-18 one keeps layer4 at stride 1, which mcloss does not build for a split, and is refused saying so."""
    src = T.randomize(T.OfficialVGG(200, width=512), seed=4).eval()
    src.save(tmp_path / "vgg_ce.pth")
    model = import_model(tmp_path / "vgg_ce.pth")
    assert model.card["loss"] == "ce" and model.groups == split_channels(512, 200)
    assert "cross-entropy baseline" in model.card["source"]["groups"] and "assumed" not in model.card["source"]
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        logits, f = src(x)
        assert torch.allclose(model(x), logits, rtol=1e-4, atol=1e-4 * float(logits.abs().max()))
        assert torch.allclose(model.forward_features(x), f, rtol=1e-4, atol=1e-4 * float(f.abs().max()))
    T.OfficialResNet("resnet18", 200, width=512).save(tmp_path / "r18_ce.pth")
    with pytest.raises(SourceError, match=r"r18_ce\.pth: 512 channels over 200 classes, an official script's cross-entropy "
                       r"baseline on resnet18 \(layer4 at its own 512 planes but stride 1\)"):
        import_model(tmp_path / "r18_ce.pth")


def test_a_lone_kurumi_resnet_says_its_input_size_is_assumed(tmp_path):
    """A Kurumi233 ResNet pools globally, so its weights do not tell the size it was trained at: without a
    setting.txt (or --img-size) the import takes the README's 448 and says so; with one, nothing is assumed."""
    T.Kurumi(4, pretrained="resnet18").save(tmp_path / "ckpt.pth")
    model = import_model(tmp_path / "ckpt.pth")
    (said,) = model.card["source"]["assumed"]
    assert model.config["img_size"] == 448 and said.startswith("input 448 px: no setting.txt says inp_size"), said
    assert "assumed" not in import_model(tmp_path / "ckpt.pth", img_size=224).card["source"]
    _write(tmp_path / "setting.txt", "pretrained:1\ninp_size:224\n")
    model = import_model(tmp_path / "ckpt.pth")
    assert model.config["img_size"] == 224 and "assumed" not in model.card["source"]


def _official_state() -> dict:
    return T.OfficialVGG(4, 3).state_dict()


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        # a key where the layout shifts a layer number, with a name in its place
        (lambda: _official_state() | {"features_2.scale": torch.zeros(1)},
         r"key 'features_2\.scale' has no place in layout official-vgg16"),
        (lambda: {"state_dict": {0: torch.zeros(1)}}, r"not any known layout \(keys begin 0\)"),
        (lambda: _official_state() | {"extra": torch.zeros(2, 2).to_sparse()}, r"tensor 'extra' is sparse_coo, not a dense"),
        # a head edited by hand: its class count cannot be read
        (lambda: _official_state() | {"classifier.4.weight": torch.zeros(7, 512)},
         r"layer 'classifier\.4' has a weight of \[7, 512\] but a bias of \[4\]"),
    ],
    ids=["named-layer", "int-keys", "sparse", "head-bias"],
)
def test_malformed_sources_give_one_line_naming_the_file(tmp_path, capsys, make, reason):
    torch.save(make(), tmp_path / "bad.pth")
    names = _write(tmp_path / "names.txt", "a\nb\nc\nd\n")
    out = tmp_path / "out.safetensors"
    assert cli(["import", str(tmp_path / "bad.pth"), "--out", str(out), "--classes", str(names)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(rf"bad\.pth: .*{reason}", err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pth", "names.txt"]  # nothing written


@pytest.mark.parametrize(
    ("arch", "said"),
    [("vgg11", r"a torchvision VGG11 \(8 convolutions\)"), ("vgg19_bn", r"a torchvision VGG19-BN \(16 convolutions\)"),
     ("wide_resnet50_2", r"a ResNeXt or wide ResNet \(layer1\.0\.conv2 is \[128, 128, 3, 3\]"),
     ("resnext50_32x4d", r"a ResNeXt or wide ResNet \(layer1\.0\.conv2 is \[128, 4, 3, 3\]")],
)
def test_torchvision_architectures_mcloss_does_not_build_are_named(tmp_path, arch, said):
    """Their keys are torchvision's: the refusal names the architecture, not a key that fails to fit. Only the
    shapes the check reads are real (the rest are 1-element tensors of the same rank, to keep the file small)."""
    with torch.device("meta"):
        state = torchvision.models.get_model(arch, weights=None).state_dict()
    state = {k: torch.zeros(tuple(v.shape) if k == "layer1.0.conv2.weight" else [1] * v.dim()) for k, v in state.items()}
    torch.save(state, tmp_path / "tv.pth")
    with pytest.raises(SourceError, match=rf"tv\.pth: {said}"):
        import_model(tmp_path / "tv.pth")


def test_a_state_dict_nested_in_two_wrappers_imports_as_the_flat_one(tmp_path):
    src = T.randomize(T.OfficialResNet("resnet18", 4, 3), seed=2)
    torch.save(src.state_dict(), tmp_path / "flat.pth")
    torch.save({"model": {"state_dict": src.state_dict(), "epoch": 9}, "acc": 0.5}, tmp_path / "nested.pth")
    flat, nested = import_model(tmp_path / "flat.pth"), import_model(tmp_path / "nested.pth")
    for (k, a), (_, b) in zip(flat.state_dict().items(), nested.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert nested.card["source"]["extras"] == {"epoch": 9}


def test_nan_and_infinite_numbers_beside_the_weights_keep_the_card_strict_json(tmp_path):
    state = T.OfficialResNet("resnet18", 4, 3).state_dict()
    torch.save({"state_dict": state, "best_loss": float("nan"), "lr": float("inf"), "acc": 0.5}, tmp_path / "ckpt.pth")
    out = tmp_path / "out.safetensors"
    import_checkpoint(tmp_path / "ckpt.pth", out)

    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")

    card = json.loads(_raw_metadata(out)["card"], parse_constant=refuse)
    assert card["source"]["extras"] == {"best_loss": "nan", "lr": "inf", "acc": 0.5}
    rewrite_card(out, card)  # the card of an imported checkpoint can be edited and written back
    assert load_checkpoint(out).card["source"]["extras"]["best_loss"] == "nan"


def test_cli_import_writes_a_checkpoint_and_says_what_it_read(tmp_path, capsys):
    T.randomize(T.TorchvisionCE("resnet18", 3)).save(tmp_path / "ce.pth")
    _write(tmp_path / "names.txt", "a\nb\nc\n")
    out = tmp_path / "ce.safetensors"
    argv = ["import", str(tmp_path / "ce.pth"), "--out", str(out), "--classes", str(tmp_path / "names.txt")]
    assert cli([*argv, "--preset", "official"]) == 0
    said = capsys.readouterr().out
    assert "(torchvision) as resnet18: 3 classes x 170/171 channels" in said and "head linear" in said
    model = load_checkpoint(out)
    assert model.card["loss"] == "ce" and model.transform.to_dict()["crop"] is None
    assert _raw_metadata(out)[DIGEST_KEY] == weights_digest(out)  # an imported checkpoint's weights are checked too
    assert cli([*argv, "--from", "fgvclib"]) == 2
    assert "not a fgvclib layout" in capsys.readouterr().err
    assert cli([*argv[:3], str(tmp_path / "x.pth"), *argv[4:]]) == 2
    assert "--out must be a .safetensors file" in capsys.readouterr().err


def test_names_from_an_imagefolder_root_serve_eval_and_target_on_that_tree(tmp_path, capsys):
    """The official scripts' workflow: class names from the ImageFolder tree the model was trained on
    (``001.``-prefixed folders), then eval on that tree and a class named by its folder."""
    root = tmp_path / "birds"
    folders = ["001.Albatross", "002.Crow", "003.Wren", "004.Finch"]
    for split in ("train", "test"):
        for i, folder in enumerate(folders):
            (root / split / folder).mkdir(parents=True)
            Image.new("RGB", (40, 30), (60 * i, 90, 200 - 40 * i)).save(root / split / folder / "a.png")
    T.randomize(T.OfficialResNet("resnet18", 4, 3), seed=7).save(tmp_path / "mc.pth")
    out = tmp_path / "mc.safetensors"
    assert cli(["import", str(tmp_path / "mc.pth"), "--out", str(out), "--classes", str(root / "train")]) == 0
    assert load_checkpoint(out).class_names == ["Albatross", "Crow", "Wren", "Finch"]
    capsys.readouterr()
    assert cli(["eval", "--checkpoint", str(out), "--data", str(root), "--no-progress", "--workers", "0"]) == 0, capsys.readouterr().err
    assert cli(["export", "--checkpoint", str(out), "--input", str(root / "test" / "003.Wren" / "a.png"), "--out",
                str(tmp_path / "exp"), "--target", "003.Wren", "--no-montage", "--workers", "0", "--no-progress"]) == 0  # fmt: skip
    record = json.loads(next((tmp_path / "exp").rglob("a.png.json")).read_text())
    assert record["target"]["name"] == "Wren"


def test_an_imported_model_runs_every_command(tmp_path, capsys):
    """Export, atlas, sanity, parts, eval and bench on an imported official ResNet-18 and a torchvision CE twin."""
    from mcloss.data.synth import generate_dataset

    data = tmp_path / "synth"
    generate_dataset(data, 4, 2, 96, 0)
    T.randomize(T.OfficialResNet("resnet18", 4, 3), seed=5).save(tmp_path / "mc.pth")
    T.randomize(T.TorchvisionCE("resnet18", 4), seed=6).save(tmp_path / "ce.pth")
    for name, extra in (("mc", []), ("ce", ["--preset", "official"])):
        argv = ["import", str(tmp_path / f"{name}.pth"), "--out", str(tmp_path / f"{name}.safetensors"), "--classes", str(data)]
        assert cli([*argv, *extra]) == 0
    mc, ce = str(tmp_path / "mc.safetensors"), str(tmp_path / "ce.safetensors")
    images = str(data / "images")
    commands = [
        ["export", "--checkpoint", mc, "--input", images, "--out", str(tmp_path / "exp"), "--compare", ce],
        ["atlas", "--checkpoint", ce, "--data", str(data), "--out", str(tmp_path / "atlas")],
        ["sanity", "--checkpoint", mc, "--data", str(data), "--limit", "4", "--draws", "1", "--out", str(tmp_path / "san")],
        ["parts", "--checkpoint", mc, "--data", str(data), "--out", str(tmp_path / "parts")],
        ["eval", "--checkpoint", ce, "--data", str(data)],
        ["bench", "--checkpoint", mc, "--json", str(tmp_path / "b.json"), "--repeats", "1", "--warmup", "0",
         "--paths", "forward_only,channel_maps_and_gradcam", "--batch-size", "2"],
    ]
    for argv in commands:
        assert cli(argv) == 0, (argv[0], capsys.readouterr().err)
    manifest = json.loads((tmp_path / "exp" / "manifest.json").read_text())
    assert manifest["counts"]["ok"] == 8
    assert (tmp_path / "atlas" / "index.html").exists() or any((tmp_path / "atlas").iterdir())
