"""Benchmark CLI: runs the requested paths on a tiny model and reports images/s and ratios."""

from __future__ import annotations

import json

from mcloss.cli.bench import main


def test_bench_cli_tiny(tmp_path, capsys, monkeypatch):
    out = tmp_path / "b.json"
    code = main(["--backbone", "resnet18", "--img-size", "32", "--classes", "2", "--device", "cpu", "--json", str(out),
                 "--batch-size", "2", "--repeats", "2", "--warmup", "0",
                 "--paths", "forward_only,channel_maps,captum_gradcam,channel_maps_and_gradcam"])
    assert code == 0
    report = json.loads(out.read_text())
    assert set(report["paths"]) == {"forward_only", "channel_maps", "captum_gradcam", "channel_maps_and_gradcam"}
    assert all(len(p["times_s"]) == 2 and p["images_per_s"] > 0 for p in report["paths"].values())
    r = report["ratios"]["channel_maps / forward_only"]
    want = report["paths"]["channel_maps"]["images_per_s"] / report["paths"]["forward_only"]["images_per_s"]
    assert abs(r["ratio"] - want) < 1e-9 and "channel_maps_and_gradcam / pytorch_grad_cam" not in report["ratios"]
    assert "images/s" in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MCLOSS_CHECKPOINT", str(tmp_path / "gone.safetensors"))
    assert main(["--json", "x.json"]) == 2
    assert "gone.safetensors: checkpoint not found" in capsys.readouterr().err
    assert main(["--backbone", "resnet18", "--json", "x.json", "--paths", "nope"]) == 2


def test_bench_export_path_is_the_real_export_and_precision_is_recorded(tmp_path, capsys):
    out = tmp_path / "e.json"
    code = main(["--backbone", "resnet18", "--img-size", "32", "--classes", "2", "--device", "cpu", "--json", str(out),
                 "--batch-size", "2", "--repeats", "1", "--warmup", "0", "--workers", "0", "--precision", "fp32",
                 "--export-batches", "3", "--paths", "forward_only,export_end_to_end,export_no_montage"])  # fmt: skip
    assert code == 0
    report = json.loads(out.read_text())
    export = report["paths"]["export_end_to_end"]
    assert export["images"] == 6 and report["paths"]["forward_only"]["images"] == 2  # 3 batches of 2 birds
    assert abs(export["images_per_s"] - 6 / export["median_s"]) < 1e-9
    assert report["paths"]["export_no_montage"]["images"] == 6
    assert report["precision"] == "fp32" and not report["setup"]["bf16"] and not report["channels_last"]  # CPU
    assert set(report["ratios"]) == {"export_end_to_end / forward_only", "export_no_montage / forward_only"}
    assert report["ratios"]["export_end_to_end / forward_only"]["goal"] == 0.7
    assert main(["--backbone", "resnet18", "--json", str(out), "--precision", "fp16"]) == 2
    # explain and export autocast on CUDA only: a CPU run asked for bf16 would be fp32 under a bf16 label
    assert main(["--backbone", "resnet18", "--device", "cpu", "--json", str(out), "--precision", "bf16"]) == 2
    assert "bf16 runs on CUDA only; on cpu the paths run fp32" in capsys.readouterr().err


def test_bench_export_paths_draw_montages_only_with_them(tmp_path, monkeypatch):
    from mcloss.explainability import outputs

    drawn = []
    real = outputs.explanation_montage
    monkeypatch.setattr(outputs, "explanation_montage", lambda *a, **k: drawn.append(1) or real(*a, **k))
    args = ["--backbone", "resnet18", "--img-size", "32", "--classes", "2", "--device", "cpu", "--batch-size", "2",
            "--repeats", "1", "--warmup", "0", "--workers", "0", "--export-batches", "1"]  # fmt: skip
    assert main([*args, "--json", str(tmp_path / "a.json"), "--paths", "export_no_montage"]) == 0
    assert not drawn
    assert main([*args, "--json", str(tmp_path / "b.json"), "--paths", "export_end_to_end"]) == 0
    assert len(drawn) == 2  # one montage per image of the timed run
