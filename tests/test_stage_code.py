"""The modules whose edit reruns a stage come from the imports (workflow/stage_code.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("stage_code", ROOT / "workflow" / "stage_code.py")
stage_code = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(stage_code)


def closure(*entries) -> set[str]:
    return {p.relative_to(ROOT).as_posix() for p in stage_code.code_closure(ROOT, *entries)}


def test_a_stage_hashes_what_its_modules_import():
    usps = closure("eps/saliency/usps.py")
    assert {"eps/crf.py", "eps/saliency/classical.py", "eps/saliency/__init__.py", "eps/__init__.py"} <= usps
    evaluation = closure("eps/metrics.py")
    assert "eps/data/io.py" in evaluation and "eps/errors.py" in evaluation
    assert not {"eps/train.py", "eps/segment.py", "eps/crf.py"} & evaluation
    assert closure("eps/models") >= {"eps/models/efficientnet.py", "eps/models/deeplab.py"}
    # the dispatcher imports every stage; as the workflow hashes it (shallow), it brings none,
    # and a shallow helper that a stage imports is followed as any other module
    assert "eps/train.py" in closure("eps/cli.py")
    common = ["eps/cli.py", "eps/config.py"]
    evaluation = {p.relative_to(ROOT).as_posix() for p in stage_code.code_closure(ROOT, *common, "eps/metrics.py",
                                                                                   shallow=common)}
    assert {"eps/cli.py", "eps/config.py"} <= evaluation and not {"eps/train.py", "eps/gpus.py"} & evaluation
    training = {p.relative_to(ROOT).as_posix() for p in stage_code.code_closure(ROOT, *common, "eps/train.py",
                                                                                 shallow=common)}
    assert "eps/gpus.py" in training  # train.py calls eps.config.choose_device, which imports it


def test_stages_that_use_a_trained_network_do_not_hash_its_training():
    """CAM inference, prediction and the report load trained networks; the shard stages only
    read shards: none of them reruns for an edit to a training loop."""
    training = {"eps/train.py", "eps/training.py", "eps/segment.py", "eps/saliency/supervised.py"}
    for entry in ("eps/infer.py", "eps/predict.py", "eps/report.py", "eps/shards.py", "eps/crf.py"):
        assert not training & closure(entry), entry
    assert not {"eps/infer.py", "eps/models/classifier.py"} & closure("eps/crf.py")
    for entry in ("eps/train.py", "eps/segment.py", "eps/saliency/supervised.py"):
        assert "eps/training.py" in closure(entry), entry


def test_reading_shards_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, eps.crf, eps.shards; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_an_edit_reruns_exactly_the_stages_that_import_it(tmp_path):
    write(tmp_path / "eps/__init__.py", "")
    write(tmp_path / "eps/stage.py", "def run():\n    from eps.helper import f\n    return f()\n")
    write(tmp_path / "eps/helper.py", "from eps.sub import deep\n\ndef f():\n    return deep.g()\n")
    write(tmp_path / "eps/sub/__init__.py", "")
    write(tmp_path / "eps/sub/deep.py", "def g():\n    return 1\n")
    write(tmp_path / "eps/other.py", "import numpy\n")
    before = stage_code.code_hash(tmp_path, "eps/stage.py")
    assert [p.relative_to(tmp_path).as_posix() for p in stage_code.code_closure(tmp_path, "eps/stage.py")] == [
        "eps/__init__.py", "eps/helper.py", "eps/stage.py", "eps/sub/__init__.py", "eps/sub/deep.py"]
    write(tmp_path / "eps/other.py", "import numpy  # edited\n")
    stage_code.imported_modules.cache_clear()
    assert stage_code.code_hash(tmp_path, "eps/stage.py") == before
    write(tmp_path / "eps/sub/deep.py", "def g():\n    return 2\n")  # two imports away, inside a function
    stage_code.imported_modules.cache_clear()
    assert stage_code.code_hash(tmp_path, "eps/stage.py") != before
    with pytest.raises(FileNotFoundError, match="eps/missing.py"):
        stage_code.code_closure(tmp_path, "eps/missing.py")


def test_no_module_of_eps_imports_itself_back():
    """No import circles (anywhere in a file, functions included): the dataset readers and the
    index share eps.data.rows, the saliency networks and their training eps.saliency.network_file."""
    files = sorted((ROOT / "eps").rglob("*.py"))
    graph = {f: {m for n in stage_code.imported_modules(f) if (m := stage_code.module_file(ROOT, n)) and m != f}
             for f in files}
    for start in files:
        reached, todo = set(), list(graph[start])
        while todo:
            f = todo.pop()
            if f not in reached:
                reached.add(f)
                todo.extend(graph[f])
        assert start not in reached, f"{start.relative_to(ROOT)} imports itself back"
    assert ROOT / "eps/data/voc.py" in graph[ROOT / "eps/data/build.py"]  # the graph is read, not empty
