"""The `eps` command: user errors are one line on stderr and exit status 2; evaluate-masks works."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from eps.cli import main
from eps.data.io import write_index_png


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_user_error(capsys, argv, *names) -> str:
    code, _, err = run(capsys, *argv)
    assert code == 2, err
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("eps: error: ")
    assert "Traceback" not in err
    for name in names:
        assert str(name) in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def synth_index(tiny_world, tmp_path) -> Path:
    """An index of the session's synthetic world of this test's own (a test removes its classes.json)."""
    from eps.data.build import build_index

    index = tmp_path / "idx" / "index.csv"
    build_index({"name": "t", "type": "synthetic", "root": str(tiny_world["data"])}, index)
    return index


# Three 2x2 masks, 3 classes (0 = background), 255 = void; hand-computed histogram
# (rows ground truth, columns prediction): [[4, 1, 0], [0, 3, 0], [1, 0, 2]]
GT = {"a": [[0, 0], [1, 1]], "b": [[2, 2], [0, 0]], "c": [[1, 255], [2, 0]]}
PRED = {"a": [[0, 1], [1, 1]], "b": [[2, 0], [0, 0]], "c": [[1, 2], [2, 0]]}
IOU = [4 / 6, 3 / 4, 2 / 3]


@pytest.fixture
def masks(tmp_path) -> dict:
    for folder, data in (("gt", GT), ("pred", PRED)):
        for image_id, mask in data.items():
            write_index_png(tmp_path / folder / f"{image_id}.png", np.array(mask, np.uint8))
    ids = tmp_path / "ids.txt"
    ids.write_text("a\nb\n\nc\n")
    return {"gt": tmp_path / "gt", "pred": tmp_path / "pred", "ids": ids, "out": tmp_path / "metrics"}


def evaluate_args(m, **changes):
    args = {"--pred": m["pred"], "--gt": m["gt"], "--ids": m["ids"], "--num-classes": 3, "--out": m["out"]}
    args.update(changes)
    return ["evaluate-masks"] + [str(x) for kv in args.items() for x in kv]


# ---------------------------------------------------------------------------- happy paths


def test_evaluate_masks_writes_metrics_and_per_class(capsys, masks):
    code, out, err = run(capsys, *evaluate_args(masks))
    assert code == 0, err
    metrics = json.loads((masks["out"] / "metrics.json").read_text())
    assert metrics["hist"] == [[4, 1, 0], [0, 3, 0], [1, 0, 2]]
    assert metrics["miou"] == pytest.approx(sum(IOU) / 3)
    assert metrics["num_images"] == 3 and metrics["num_classes"] == 3
    assert [c["iou"] for c in metrics["per_class"]] == pytest.approx(IOU)
    with open(masks["out"] / "per_class.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["iou"]) for r in rows] == pytest.approx(IOU)
    assert float(rows[0]["precision"]) == pytest.approx(4 / 5) and float(rows[2]["recall"]) == pytest.approx(2 / 3)
    assert f"mIoU {100 * sum(IOU) / 3:.2f} over 3 images" in out


def test_python_m_eps_help():
    result = subprocess.run([sys.executable, "-m", "eps", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for command in ("synth", "index", "saliency", "train-classifier", "infer-cams", "pseudo-masks",
                    "export-masks", "evaluate-masks", "summary"):
        assert command in result.stdout


# ---------------------------------------------------------------------------- user errors


def test_missing_ids_file(capsys, masks, tmp_path):
    missing = tmp_path / "nope" / "val.txt"
    assert_user_error(capsys, evaluate_args(masks, **{"--ids": missing}), missing, "file not found")
    assert not masks["out"].exists()


def test_missing_prediction(capsys, masks):
    (masks["pred"] / "b.png").unlink()
    assert_user_error(capsys, evaluate_args(masks), masks["pred"] / "b.png", "file not found")
    assert not (masks["out"] / "metrics.json").exists()


def test_prediction_of_another_size(capsys, masks):
    write_index_png(masks["pred"] / "c.png", np.zeros((3, 2), np.uint8))
    assert_user_error(capsys, evaluate_args(masks), masks["pred"] / "c.png", "differs from the ground truth")


def test_bad_pairs_json(capsys, masks, synth_index):
    args = evaluate_args(masks) + ["--classes", str(synth_index), "--pairs", "[[rail, train]]"]
    assert_user_error(capsys, args, "--pairs")
    args = evaluate_args(masks) + ["--classes", str(synth_index), "--pairs", '[["rail"]]']
    assert_user_error(capsys, args, "--pairs")


def test_params_with_unknown_key(capsys, tmp_path, synth_index):
    out = tmp_path / "m" / "classifier.pt"
    line = assert_user_error(capsys, ["train-classifier", "--index", synth_index, "--out", out,
                                      "--params", '{"lr": 0.1, "learning_rate": 0.1}'],
                             "--params", "learning_rate")
    assert "known:" in line
    params_file = tmp_path / "params.yaml"
    params_file.write_text("lr: 0.1\nitrations: 3\n")
    assert_user_error(capsys, ["train-classifier", "--index", synth_index, "--out", out,
                               "--params", params_file], params_file, "itrations")
    assert not out.parent.exists()


def test_params_invalid_json_and_invalid_yaml_file(capsys, tmp_path, synth_index):
    out = tmp_path / "m" / "classifier.pt"
    assert_user_error(capsys, ["train-classifier", "--index", synth_index, "--out", out,
                               "--params", '{"lr": }'], "--params", "not valid JSON")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [0.1\n  iterations: {\n")
    assert_user_error(capsys, ["infer-cams", "--index", synth_index, "--classifier", out, "--split", "val",
                               "--out", tmp_path / "c.h5", "--params", bad], bad)
    assert_user_error(capsys, ["pseudo-masks", "--cams", tmp_path / "c.h5", "--dataset", "t",
                               "--out", tmp_path / "m.h5", "--params", "[0.2]"], "--params", "mapping")


def test_index_with_unknown_dataset_key(capsys, tmp_path):
    (tmp_path / "data").mkdir()
    dataset = json.dumps({"type": "synthetic", "root": str(tmp_path / "data"), "saliency": "SAL"})
    assert_user_error(capsys, ["index", "--dataset", dataset, "--out", tmp_path / "idx" / "index.csv"],
                      "dataset.saliency", "unknown key")
    assert_user_error(capsys, ["index", "--dataset", "[1, 2]", "--out", tmp_path / "index.csv"], "--dataset")
    assert_user_error(capsys, ["index", "--dataset", "{type: voc}", "--out", tmp_path / "index.csv"], "--dataset")
    assert not (tmp_path / "idx").exists()


def test_train_classifier_without_classes_json(capsys, tmp_path, synth_index):
    classes = synth_index.parent / "classes.json"
    classes.unlink()
    out = tmp_path / "m" / "classifier.pt"
    assert_user_error(capsys, ["train-classifier", "--index", synth_index, "--out", out,
                               "--params", '{"loss": "cam", "iterations": 1}'], classes, "file not found")
    assert not out.parent.exists()


def test_train_classifier_without_index(capsys, tmp_path):
    missing = tmp_path / "results" / "index.csv"
    assert_user_error(capsys, ["train-classifier", "--index", missing, "--out", tmp_path / "m" / "c.pt"],
                      missing, "index not found")


def test_infer_cams_with_missing_classifier(capsys, tmp_path, synth_index):
    missing = tmp_path / "m" / "classifier.pt"
    out = tmp_path / "cams" / "shard-1-of-1.h5"
    assert_user_error(capsys, ["infer-cams", "--index", synth_index, "--classifier", missing, "--split", "val",
                               "--out", out, "--params", '{"device": "cpu"}'], missing)
    assert not out.exists() and not out.with_name(out.name + ".tmp").exists()


def test_multiline_error_message_is_printed_on_one_line(capsys, monkeypatch):
    import eps.cli as cli
    from eps.errors import EpsError

    def boom(args):
        raise EpsError("some/file.h5: cannot read\n  (details on a second line)")

    monkeypatch.setattr(cli, "cmd_summary", boom)
    assert_user_error(capsys, ["summary", "--entry", "a:b:c", "--out", "x.csv"], "some/file.h5", "second line")


def test_version_and_every_option_has_help(capsys):
    import argparse

    from eps.cli import build_parser

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("eps ")
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    lacking = [f"{name} {'/'.join(action.option_strings) or action.dest}"
               for name, command in sub.choices.items() for action in command._actions
               if not isinstance(action, argparse._HelpAction) and not action.help]
    assert lacking == []
    text = sub.choices["saliency"].format_help()
    assert "(default: classical)" in " ".join(text.split())


def test_index_takes_the_dataset_block_from_a_config_file(tiny_world, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(f"dataset:\n  name: t\n  type: synthetic\n  root: {tiny_world['data']}\n")
    assert main(["index", "--dataset", str(config), "--out", str(tmp_path / "idx" / "index.csv")]) == 0
    assert (tmp_path / "idx" / "ids" / "train.txt").read_text().split()[0] == "syn_train_00000"


def test_status_reads_where_each_stage_is(tmp_path, capsys):
    logs = tmp_path / "results" / "logs"
    (logs / "train_classifier").mkdir(parents=True)
    (logs / "index.log").write_text("# rerun: cd /x && eps index --dataset d --out i.csv\n# eps index: done in 0.8 s\n")
    (logs / "train_classifier" / "eps.log").write_text(
        "# rerun: cd /x && eps train-classifier ...\ntrain eps:  10%|#  | 60/600 [01:00<09:00, 1.0s/it]\n")
    (logs / "train_classifier" / "cam.log").write_text("# rerun: ...\neps: error: img.jpg: cannot decode image\n")
    assert main(["status", str(tmp_path / "results")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["index", "done", "0.8"]
    assert out[1].split()[:3] == ["train_classifier/cam", "failed", "img.jpg:"]
    assert out[2].split()[:2] == ["train_classifier/eps", "running"] and "60/600" in out[2]
    assert out[3] == "1 done, 1 failed, 1 running"
    assert main(["status", str(tmp_path / "nothing")]) == 2


# ---------------------------------------------------------------------------- parallel defaults


def test_workers_default_to_the_cores_the_job_has(capsys, masks, monkeypatch):
    """evaluate-masks, crf and predict use every core they are given unless told otherwise:
    EPS_THREADS (Snakemake's threads), else the cores the process may run on."""
    import os

    import eps.metrics
    from eps.config import usable_cores

    seen = []
    real = eps.metrics.evaluate_masks
    monkeypatch.setattr(eps.metrics, "evaluate_masks", lambda *a, **k: seen.append(k["workers"]) or real(*a, **k))
    monkeypatch.delenv("EPS_THREADS", raising=False)
    assert usable_cores() == len(os.sched_getaffinity(0))
    assert run(capsys, *evaluate_args(masks))[0] == 0
    monkeypatch.setenv("EPS_THREADS", "3")
    assert usable_cores() == 3
    assert run(capsys, *evaluate_args(masks))[0] == 0
    assert run(capsys, *evaluate_args(masks), "--workers", "1")[0] == 0
    assert seen == [len(os.sched_getaffinity(0)), 3, 1]
    assert_user_error(capsys, evaluate_args(masks) + ["--workers", "0"], "--workers", "positive")
    monkeypatch.setenv("EPS_THREADS", "two")
    assert_user_error(capsys, evaluate_args(masks), "EPS_THREADS", "'two'")
