"""The config schema (what the workflow validates and documents) and the defaults each command
applies agree, so a key left out of the config means the same in the workflow and by hand."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from tiny_workflow import snakemake

from eps.config import INFER_DEFAULTS, MASK_DEFAULTS, SCHEMA, TRAIN_DEFAULTS
from eps.crf import CRF_DEFAULTS
from eps.predict import PREDICT_DEFAULTS
from eps.report import REPORT_DEFAULTS
from eps.segment import SEGMENT_DEFAULTS

PROPS = yaml.safe_load(SCHEMA.read_text())["properties"]
BLOCKS = {
    "classifier": (PROPS["classifier"], TRAIN_DEFAULTS),
    "infer": (PROPS["infer"], INFER_DEFAULTS),
    "pseudo_masks": (PROPS["pseudo_masks"], MASK_DEFAULTS),
    "crf": (PROPS["crf"], CRF_DEFAULTS),
    "segmenter": (PROPS["segmenter"], SEGMENT_DEFAULTS),
    "segmenter.predict": (PROPS["segmenter"]["properties"]["predict"], PREDICT_DEFAULTS),
    "report": (PROPS["report"], REPORT_DEFAULTS),
}
# keys only one side has: the workflow fills crf's threshold from pseudo_masks.bg_threshold;
# which variants get a segmenter and the predict block are the workflow's
COMMAND_ONLY = {("crf", "bg_threshold")}
WORKFLOW_ONLY = {("segmenter", "variants"), ("segmenter", "predict")}


@pytest.mark.parametrize("name", list(BLOCKS))
def test_schema_defaults_are_the_commands_defaults(name):
    block, defaults = BLOCKS[name]
    props = block["properties"]
    for key, spec in props.items():
        if (name, key) in WORKFLOW_ONLY:
            continue
        assert key in defaults, f"{name}.{key}: in the schema, not a parameter of the command"
        if "default" in spec:
            assert spec["default"] == defaults[key], f"{name}.{key}: schema {spec['default']!r}, command {defaults[key]!r}"
    for key in defaults:
        assert key in props or (name, key) in COMMAND_ONLY, f"{name}.{key}: a parameter the schema does not know"


def test_one_key_for_the_background_threshold(tmp_path):
    """pseudo_masks.bg_threshold is also the CRF's: the old crf.bg_threshold is refused by name,
    and the crf jobs receive the pseudo-mask threshold."""
    root = Path(__file__).resolve().parents[1]
    cfg = yaml.safe_load((root / "config.yaml").read_text())
    cfg["pseudo_masks"]["bg_threshold"] = 0.35

    def dry_run():
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(cfg))
        proc = snakemake(["-n", "-p", "--cores", "1", "-s", str(root / "Snakefile"), "--directory", str(tmp_path),
                          "--configfile", str(path)], timeout=300)
        return proc.returncode, proc.stdout + proc.stderr

    code, out = dry_run()
    crf_commands = [line for line in out.splitlines() if "eps crf " in line]
    assert code == 0 and crf_commands and all('"bg_threshold": 0.35' in c for c in crf_commands), out[-2000:]
    cfg["crf"]["bg_threshold"] = 0.2
    code, out = dry_run()
    assert code != 0 and "crf.bg_threshold: no longer a key" in out and "pseudo_masks.bg_threshold" in out


def test_a_coco_split_is_evaluated_only_with_its_masks(tmp_path):
    root = Path(__file__).resolve().parents[1]
    cfg = yaml.safe_load((root / "configs" / "coco14.yaml").read_text())
    cfg["dataset"]["splits"]["val"] = "val2014"  # images only: labels from the instances JSON
    path = tmp_path / "coco.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = snakemake(["-n", "--cores", "1", "-s", str(root / "Snakefile"), "--directory", str(tmp_path),
                      "--configfile", str(path)], timeout=300)
    assert proc.returncode != 0
    assert "evaluation.splits: split 'val' has no masks" in proc.stdout + proc.stderr
