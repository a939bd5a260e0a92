"""The analysis scripts behind docs/ablation_discussion.md, on the shipped checkpoint and tiny synthetic data."""

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import mcloss
from mcloss.data.cub import CUBDataset
from mcloss.data.synth import generate_dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from peak_cells import peak_cell_shares  # noqa: E402

CHECKPOINT = ROOT / "checkpoints" / "default.safetensors"


@pytest.fixture(scope="module")
def birds(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("peaks") / "birds"
    generate_dataset(root, classes=12, per_class=2, size=96, seed=5, test_fraction=1.0)
    return root


def test_peak_cell_shares_count_the_argmax_cells(birds):
    result = peak_cell_shares(str(CHECKPOINT), str(birds), batch=5)
    model = mcloss.load_checkpoint(CHECKPOINT)
    records = CUBDataset(birds, "test").records
    counters = [Counter() for _ in range(3)]
    with torch.no_grad():
        for rec in records:
            x = model.transform(mcloss.load_image(rec.path))[None]
            maps = model.forward_features(x)[0, model.group_slice(rec.label)]
            h, w = maps.shape[1:]
            for j, flat in enumerate(maps.flatten(1).argmax(1).tolist()):
                counters[j][(flat % w, flat // w)] += 1
    n = len(records)
    assert result["images"] == n == 24
    assert result["top_cell_share"] == [round(c.most_common(1)[0][1] / n, 3) for c in counters]
    assert result["distinct_cells"] == len(sum(counters, Counter()))
    assert result["map"] == f"{h}x{w}" and result["cells"] == h * w
    assert result["border_cells_share"] == round((h * w - (h - 2) * (w - 2)) / (h * w), 3)


def _run(row: str, seed: int, hit: float, bf16: bool) -> dict:
    keys = ["top1_fc", "top1_mc", "hit_rate", "distinct_parts", "overlap", "deletion_auc", "insertion_auc",
            "gc_hit_rate", "gc_deletion_auc", "gc_insertion_auc", "random_hit_rate"]  # fmt: skip
    return {k: 0.5 for k in keys} | {"row": row, "seed": seed, "hit_rate": hit, "train_seconds": 60.0, "cpu_bf16": bf16}


def test_ablation_report_gives_mean_and_sample_std_per_row_and_the_precision_per_run():
    from ablation import DATA, FRESH, report

    results = [_run("mc", 0, 0.8, True), _run("mc", 1, 0.6, True), _run("mc", 2, 0.7, False), _run("ce", 0, 0.4, False)]
    data, fresh = dict(DATA, size=224, design="combo"), dict(FRESH, size=224, design="combo")
    text = report(results, [0, 1, 2], 7, "fig.png", data, fresh, "d.md", "make ablation", "CE, then MC")
    mc = next(line for line in text.splitlines() if line.startswith("| CE + L_dis + L_div"))
    assert "| 0.700 ± 0.100 |" in mc  # sample std (ddof 1) of 0.8, 0.6, 0.7
    ce = next(line for line in text.splitlines() if line.startswith("| CE only"))
    assert "| 0.400 |" in ce and "±" not in ce  # one run: no spread is invented
    assert not any(line.startswith("| CE + L_dis |") for line in text.splitlines())  # rows without runs are left out
    runs = [line for line in text.splitlines() if line.startswith("| mc |")]
    assert [line.rsplit("|", 2)[1].strip() for line in runs] == ["bf16", "bf16", "fp32"]
    assert all(line.split("|")[7].strip() == "–" for line in runs)  # scored before separated parts existed
    assert "--design combo" in text and "14×14 maps" in text and "Regenerate with `make ablation`" in text


def _defining(ccmp: float, channels: float, gradcam: float, peak_share: float, chance: float = 0.3) -> dict:
    methods = {"ccmp": {"mass_ratio": ccmp}, "gradcam": {"mass_ratio": gradcam}}
    methods["channels"] = {"mass_ratio": channels, "peak_share": peak_share, "peak_chance": chance}
    return {"methods": methods}


def test_default_seeds_report_names_each_seeds_missed_goals_and_the_spread():
    from default_seeds import report, seed_row

    twin = _defining(2.4, 0.8, 7.6, 0.7)
    rows = [
        seed_row(0, {"fc_top1": 0.94, "mc_top1": 0.96}, _defining(6.0, 7.0, 5.5, 0.86), twin),  # every goal
        seed_row(1, {"fc_top1": 0.89, "mc_top1": 0.95}, _defining(5.0, 6.0, 4.8, 0.59), twin),  # top-1, peaks 1.97x
        seed_row(2, {"fc_top1": 0.92, "mc_top1": 0.93}, _defining(1.9, 0.7, 2.5, 0.70), twin),  # ratios, GC, twin
    ]
    lines = report(rows, twin_channels=0.8).splitlines()
    by_seed = {line.split("|")[1].strip(): line.rsplit("|", 2)[1].strip() for line in lines if line.startswith("| ")}
    assert by_seed["0"] == "none"
    assert by_seed["1"] == "peaks ≥ 2 × chance, top-1 ≥ 0.90"
    assert by_seed["2"] == "CCMP ≥ 2.0, channels ≥ 1.5, above Grad-CAM, above the CE twin's channels"
    assert by_seed["mean ± std"] == "1 of 3 seeds meet every goal"
    mean = next(line for line in lines if line.startswith("| mean ± std"))
    assert "| 0.917 ± 0.025 |" in mean  # FC top-1: mean and sample std of 0.94, 0.89, 0.92
    assert "| 4.30 ± 2.14 |" in mean  # CCMP: 6.0, 5.0, 1.9


def test_default_seeds_report_says_tie_when_a_paired_interval_holds_1_and_counts_it_unmet():
    from default_seeds import report, seed_row

    twin = _defining(2.4, 0.8, 7.6, 0.7)
    rows = []
    for seed, ccmp_ci in enumerate([(1.01, 1.19), (0.99, 1.19), (0.80, 0.95)]):
        defining = _defining(6.0, 7.0, 5.5, 0.86)  # every ratio above Grad-CAM's
        defining["versus_gradcam"] = {"ccmp": {"quotient": 1.08, "ci": list(ccmp_ci)}, "channels": {"quotient": 1.3, "ci": [1.2, 1.45]}}
        rows.append(seed_row(seed, {"fc_top1": 0.94, "mc_top1": 0.96}, defining, twin))
    lines = report(rows, twin_channels=0.8).splitlines()
    by_seed = {line.split("|")[1].strip(): line.rsplit("|", 2)[1].strip() for line in lines if line.startswith("| ")}
    assert [by_seed[s] for s in "012"] == ["none", "above Grad-CAM (tie)", "above Grad-CAM"]
    assert by_seed["mean ± std"] == "1 of 3 seeds meet every goal"


def test_default_seeds_versus_table_calls_an_interval_that_holds_1_a_tie():
    from default_seeds import seed_row, versus_report

    twin = _defining(2.4, 0.8, 7.6, 0.7)
    rows = []
    for seed, (ccmp_ci, channels_ci) in enumerate([((0.99, 1.19), (1.20, 1.45)), ((0.80, 0.95), (1.01, 1.30))]):
        defining = _defining(6.0, 7.0, 5.5, 0.86)
        defining["versus_gradcam"] = {"ccmp": {"quotient": 1.08, "ci": list(ccmp_ci)}, "channels": {"quotient": 1.3, "ci": list(channels_ci)}}
        rows.append(seed_row(seed, {"fc_top1": 0.94, "mc_top1": 0.96}, defining, twin))
    lines = [line for line in versus_report(rows).splitlines() if line[:4] in ("| 0 ", "| 1 ")]
    assert [[c.strip() for c in line.split("|")[1:-1]] for line in lines] == [
        ["0", "1.08 (0.99–1.19)", "tie", "1.30 (1.20–1.45)", "above"],
        ["1", "1.08 (0.80–0.95)", "below", "1.30 (1.01–1.30)", "above"],
    ]
    rows[0]["versus_gradcam"] = {}  # a scoring from before the intervals: no table rather than a partial one
    assert versus_report(rows) == ""


def test_default_seeds_variant_trains_runs_of_its_own_with_its_flags(tmp_path, monkeypatch, capsys):
    import default_seeds

    (tmp_path / "default-parts-ce").mkdir()
    (tmp_path / "default-parts-ce" / "summary.json").write_text(json.dumps({"defining": _defining(2.4, 0.8, 7.6, 0.7)}))
    trained = []
    monkeypatch.setattr(default_seeds, "ensure_dataset", lambda spec, root: None)
    monkeypatch.setattr(default_seeds, "run_training", lambda args, run, epochs: trained.append((run.name, args)))
    monkeypatch.setattr(default_seeds, "load_checkpoint", lambda path: path)
    monkeypatch.setattr(default_seeds, "score_parts", lambda *a, **k: {"defining": _defining(6.0, 7.0, 5.5, 0.86)})
    monkeypatch.setattr(default_seeds, "top1", lambda model, root: {"fc_top1": 0.94, "mc_top1": 0.96})
    docs = tmp_path / "variant.md"
    argv = ["--work", str(tmp_path), "--variant", "a3", "--train-args", "--alpha 3", "--seeds", "1", "0", "--docs", str(docs)]
    assert default_seeds.main(argv) == 0
    # the variant trains exactly the listed seeds, seed 0 too, beside (never over) the shipped default's run
    assert [name for name, _ in trained] == ["variant-a3-train-seed1", "variant-a3-train-seed0"]
    assert all(args[-2:] == ["--alpha", "3"] and "--dis-topk" in args for _, args in trained)  # the recipe, plus its flags
    assert json.loads(docs.with_suffix(".json").read_text())["train_args"] == ["--alpha", "3"]
    assert "(variant a3)" in docs.read_text() and "with `--alpha 3`" in docs.read_text()
    with pytest.raises(SystemExit):  # a variant needs its flags or its own length
        default_seeds.main(["--work", str(tmp_path), "--variant", "a3"])
    assert "--variant needs --train-args or other --epochs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        default_seeds.main(["--work", str(tmp_path), "--train-args", "--alpha 3"])
    assert "--train-args needs --variant" in capsys.readouterr().err
    trained.clear()
    with pytest.raises(SystemExit):  # the default's own runs keep their length
        default_seeds.main(["--work", str(tmp_path), "--epochs", "48"])
    assert "--epochs other than the default's 24 needs --variant" in capsys.readouterr().err
    assert not trained
    argv = ["--work", str(tmp_path), "--variant", "e48", "--epochs", "48", "--seeds", "1", "--docs", str(docs)]
    assert default_seeds.main(argv) == 0  # a longer run of the recipe as it is
    (name, args), = trained
    assert name == "variant-e48-train-seed1" and args[args.index("--epochs") + 1] == "48"


@pytest.mark.slow
def test_gpu_check_runs_as_a_cpu_smoke(tmp_path):
    import gpu_check

    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--smoke", "--device", "cpu", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["device"]["device"] == "cpu" and report["device"]["torch"] == torch.__version__
    assert [(r["backbone"], r["precision"]) for r in report["bench"]] == [("resnet18", "fp32")]  # bf16: CUDA only
    for row in report["bench"]:
        assert set(row["images_per_s"]) == set(gpu_check.PATHS) and all(v > 0 for v in row["images_per_s"].values())
        ratio = row["images_per_s"]["export_end_to_end"] / row["images_per_s"]["forward_only"]
        assert row["goals"]["export_end_to_end / forward_only"]["ratio"] == pytest.approx(ratio)
        jpg = row["images_per_s"]["export_jpg"] / row["images_per_s"]["forward_only"]
        assert row["goals"]["export_jpg / forward_only"] == {"ratio": pytest.approx(jpg), "goal": 0.7, "met": jpg >= 0.7}
    training = report["training"]
    assert training["ok"] and training["epochs"] == [1, 2, 3] and training["exit_codes"] == [0, 0]
    latency = report["app_latency"]
    assert len(latency["times_s"]) == 3 and latency["median_s"] == pytest.approx(sorted(latency["times_s"])[1])
    steady = report["steady_export"]
    assert steady["images"] == 8 and steady["batch_size"] == 4 and steady["forward_ms"] > 0
    assert steady["writer_processes"] == 0  # on a CPU the export's own writers are threads
    for choice in ("no_montage", "jpg", "png", "no_montage_threads", "jpg_threads", "png_threads"):
        row = steady[choice]
        assert row["all_s"] > 0 and row["ms_per_image"] == pytest.approx((row["all_s"] - row["one_batch_s"]) * 1000 / 4)
        assert row["over_forward"] == pytest.approx(steady["forward_ms"] / row["ms_per_image"])
    encoding = report["montage_encoding"]
    assert encoding["torchvision_device"] == "cpu" and encoding["montages"] == 2
    assert all(encoding[k] > 0 for k in ("png_cpu_ms", "jpg_cpu_ms", "jpg_torchvision_ms"))
    assert encoding["jpg_torchvision_psnr_db"] >= 30  # torchvision's JPEG is 4:2:0: a few dB under mcloss's 4:4:4
    assert encoding["draw_jpg_cpu_ms"] > 0 and encoding["draw_jpg_device_ms"] > 0
    assert encoding["device_montage_psnr_db"] >= 38 and encoding["device_jpg_psnr_db"] >= 35  # tiny random model
    assert [r["batch"] for r in report["explain_overhead"]] == [1, 2]
    for row in report["explain_overhead"]:
        assert all(row[f"{path}_s"] > 0 for path in ("forward_only", "channel_maps", "after_forward"))
        assert row["after_forward_per_image_s"] == pytest.approx(row["after_forward_s"] / row["batch"])
    writers = report["writer_scaling"]
    assert [(r["format"], r["way"], r["count"]) for r in writers["rows"]] == [
        (f, way, n) for f in ("jpg", "png") for way, n in (("threads", 1), ("threads", 2), ("processes", 2))
    ]
    assert all(r["ms_per_image"] > 0 for r in writers["rows"]) and writers["cpus"] >= 1
    assert [r["speedup"] for r in writers["rows"] if r["count"] == 1] == [1.0, 1.0]


def test_gpu_check_runs_only_the_stages_asked_for(tmp_path, capsys):
    import gpu_check

    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--smoke", "--device", "cpu", "--out", str(out), "--stages", "app_latency"]) == 0
    report = json.loads(out.read_text())
    assert set(report) == {"started", "smoke", "device", "app_latency", "stage_seconds"}
    assert set(report["stage_seconds"]) == {"app_latency"} and len(report["app_latency"]["times_s"]) == 3
    with pytest.raises(SystemExit):
        gpu_check.main(["--out", str(out), "--stages", "bench,warp"])
    assert "unknown stage(s) warp" in capsys.readouterr().err


def test_export_profile_reports_the_model_threads_time(tmp_path, capsys):
    import export_profile

    out = tmp_path / "profile.txt"
    args = ["--device", "cpu", "--images", "8", "--size", "32", "--batch-size", "4", "--workers", "0", "--top", "5"]
    assert export_profile.main([*args, "--montage-format", "jpg", "--out", str(out)]) == 0
    report = out.read_text()
    assert report.startswith("8 images, cpu, batch 4, 0 decoders, no writer processes, jpg montages")
    assert "--- by tottime" in report and "--- by cumulative" in report and "export.py" in report
    assert report == capsys.readouterr().out


def test_gradcam_groups_weights_rebuild_the_exports_gradcam(birds):
    from gradcam_groups import gradcam_weights

    from mcloss.explainability.explanation import explain

    model = mcloss.load_checkpoint(CHECKPOINT)
    records = CUBDataset(birds, "test").records[:4]
    images = [mcloss.load_image(r.path) for r in records]
    labels = [r.label for r in records]
    x = torch.stack([model.transform(im) for im in images])
    alpha, _ = gradcam_weights(model, x, labels)
    with torch.no_grad():
        cams = torch.relu(torch.einsum("bk,bkhw->bhw", torch.as_tensor(alpha), model.forward_features(x))).numpy()
    for cam, exp in zip(cams, explain(model, images, targets=labels, maps=("channels", "gradcam")), strict=True):
        assert cam == pytest.approx(exp.groups[0].gradcam, rel=1e-4, abs=1e-6)


def test_gradcam_groups_mass_ratios_are_those_of_mcloss_parts(tmp_path):
    from gradcam_groups import group_report

    from mcloss.evaluation.parts import evaluate_parts

    root = tmp_path / "varied"  # the default's classes, with part masks
    generate_dataset(root, classes=12, per_class=1, size=112, seed=3, test_fraction=1.0, design="varied", object_scale=1.6)
    report = group_report(str(CHECKPOINT), str(root))
    assert report["images"] == 12 and report["channel_share"]["own"] == pytest.approx(3 / 36)
    assert sum(report["positive_share"].values()) == pytest.approx(1.0)
    methods = evaluate_parts(mcloss.load_checkpoint(CHECKPOINT), root, faithfulness=False).summary["defining"]["methods"]
    for kind in ("gradcam", "ccmp"):
        assert report["mass_ratio"][kind] == pytest.approx(methods[kind]["mass_ratio"], rel=1e-4)
    assert all(report["mass_ratio"][f"gradcam_{k}"] > 0 for k in ("own", "sharing", "other"))


def test_gradcam_groups_sorts_channels_by_shared_defining_parts():
    from gradcam_groups import group_kinds, positive_shares

    kinds = group_kinds([2, 2, 2], [["wing"], ["wing", "tail"], ["beak"]], 0)
    assert kinds.tolist() == ["own", "own", "sharing", "sharing", "other", "other"]
    assert group_kinds([1, 1], [[], []], 1).tolist() == ["other", "own"]  # no defining parts: shares with nobody
    shares = positive_shares(np.array([1.0, -1.0, 2.0, 0.0, 1.0, -5.0]), kinds)
    assert shares == {"own": 0.25, "sharing": 0.5, "other": 0.25}  # negative weights are not evidence


def test_contrast_designs_scores_every_design_beside_the_maps(tmp_path):
    from contrast_designs import design_blocks

    from mcloss.explainability.contrast import CONTRAST_DESIGNS

    root = tmp_path / "birds"
    generate_dataset(root, classes=12, per_class=2, size=160, seed=4, test_fraction=1.0, object_scale=1.6, design="varied")
    block = design_blocks([str(CHECKPOINT)], str(root), limit=4)[str(CHECKPOINT)]
    methods = block["methods"]
    assert {f"design_{d}" for d in CONTRAST_DESIGNS} < set(methods)
    # the chosen design is the contrast map kind, and the "difference" design is the baseline row
    assert methods["design_channels"]["mass_ratio"] == pytest.approx(methods["contrast"]["mass_ratio"])
    assert methods["design_difference"]["mass_ratio"] == pytest.approx(methods["difference"]["mass_ratio"])


def test_loader_handover_times_both_batch_forms(capsys):
    import loader_handover

    assert loader_handover.main(["--images", "8", "--size", "32", "--batch-size", "4", "--workers", "1", "--rounds", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("8 images at 32 px, batches of 4, 1 workers, median of 1 rounds")
    assert [line.split(":")[0].strip() for line in out[1:]] == ["one block per batch", "one block per image"]
    assert all("ms per image, of which the main process's CPU" in line for line in out[1:])
