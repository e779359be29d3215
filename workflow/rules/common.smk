# Validation, shard helpers and parameter hashing shared by every rule.
import json
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate


def validate_config():
    """The schema check, with a failure as one line naming the key; an overlay drops a
    variant by setting it to null (`variants: {naive: null}`)."""
    import jsonschema

    if "bg_threshold" in (config.get("crf") or {}):
        raise WorkflowError(
            "config: crf.bg_threshold: no longer a key; the CRF's background threshold is "
            "pseudo_masks.bg_threshold (one key for both)"
        )
    if isinstance(config.get("variants"), dict):
        config["variants"] = {k: v for k, v in config["variants"].items() if v is not None}
    try:
        validate(config, "../../eps/config.schema.yaml")  # also checks every command's --params
    except WorkflowError as exc:
        err = exc.__context__  # snakemake raises its WorkflowError while handling jsonschema's
        if not isinstance(err, jsonschema.exceptions.ValidationError):
            raise
        key = ".".join(str(k) for k in err.absolute_path) or "(top level)"
        raise WorkflowError(f"config: {key}: {' '.join(err.message.split())}") from None
    dataset = config["dataset"]
    if dataset["type"] == "folder":  # one split, named by `split`
        splits = {dataset.get("split", "train")}
    else:
        splits = set(dataset.get("splits") or {"train": None, "val": None})
    if config["train_split"] not in splits:
        raise WorkflowError(
            f"config: train_split: {config['train_split']!r} is not one of dataset.splits "
            f"({', '.join(sorted(splits))})"
        )
    checked = [("evaluation.splits", config["evaluation"]["splits"])]
    if config["segmenter"].get("enabled", True):
        checked.append(("segmenter.predict.split", [config["segmenter"]["predict"]["split"]]))
    for key, value in checked:
        for split in value:
            if split not in splits:
                raise WorkflowError(
                    f"config: {key}: {split!r} is not one of dataset.splits ({', '.join(sorted(splits))})"
                )
            spec = (dataset.get("splits") or {}).get(split)
            if dataset["type"] == "coco" and not (isinstance(spec, dict) and spec.get("masks")):
                # COCO masks are per split: without them the evaluation would fail after training
                raise WorkflowError(
                    f"config: {key}: split {split!r} has no masks to evaluate against "
                    f"(dataset.splits.{split}.masks: the folder of its label PNGs)"
                )


validate_config()

DATASET = config["dataset"]
DS = DATASET["name"]
RESULTS = f"results/{DS}"
# the index writes ids/{split}.txt of these: a folder dataset has its one `split`
SPLITS = (
    [DATASET.get("split", "train")]
    if DATASET["type"] == "folder"
    else list(DATASET.get("splits") or {"train": "train.txt", "val": "val.txt"})
)
EVAL_SPLITS = config["evaluation"]["splits"]
VARIANTS = list(config["variants"])
SAL_METHOD = config["saliency"]["method"]


envvars:
    "PATH",  # rules call `eps` (find_eps); cluster jobs get the same PATH


def find_eps():
    """Rules call `eps`: when it is not on PATH but installed beside the Python running
    Snakemake (`.venv/bin/snakemake` without activating .venv), that folder goes first on PATH
    (jobs inherit it); with neither, stop before any job with one line saying what to do."""
    os.environ.update(EPS_LOG_COMMAND="1")  # each rule's log starts with the command that reruns it
    here = Path(sys.executable).parent
    if shutil.which("eps") is None and (here / "eps").is_file():
        os.environ["PATH"] = f"{here}{os.pathsep}{os.environ.get('PATH', '')}"
    methods = getattr(getattr(workflow, "deployment_settings", None), "deployment_method", None) or ()
    with_conda = any(getattr(m, "name", "") == "CONDA" for m in methods)  # the environment brings its own
    if shutil.which("eps") is None and not with_conda:
        raise WorkflowError(
            "the eps command is not installed beside this snakemake nor on PATH: "
            "run `make install`, then `.venv/bin/snakemake ...` (README.md, Install)"
        )


find_eps()


scattergather:
    shard=config["shards"],


sys.path.insert(0, str(Path(workflow.basedir) / "workflow"))
import stage_code  # noqa: E402  (workflow/stage_code.py: the import graph of eps)


def code_hash(*entries):
    """Hash of the eps sources a stage runs (COMMON_CODE, the entries and every eps module they
    import), so editing any of them reruns the stage."""
    return stage_code.code_hash(workflow.basedir, *COMMON_CODE, *entries, shallow=COMMON_CODE)


# what every command loads, hashed as its own text (a stage that imports one follows it)
COMMON_CODE = ["eps/cli.py", "eps/config.py", "eps/errors.py", "eps/data/io.py", "eps/data/index.py"]


CLUSTER_STAGE_THREADS = 4  # a null threads.{evaluate,crf} on a cluster run without --cores


def stage_threads(stage):
    """threads.{stage}, or where it is null the cores of the run (evaluation and CRF jobs are
    process pools that use every core they get; Snakemake never gives a job more than --cores).
    A cluster run may give no --cores (only --jobs): then CLUSTER_STAGE_THREADS per job."""
    value = config["threads"].get(stage)
    if value:
        return value
    try:
        cores = workflow.cores
    except WorkflowError:  # Snakemake 9 with a remote executor and no --cores
        cores = None
    if not cores:
        cores = CLUSTER_STAGE_THREADS
    return max(1, min(cores, os.cpu_count() or 1))


def as_json(block):
    return json.dumps(block, sort_keys=True)


def with_device(block):
    """A stage block with the global device filled in where the stage does not set one."""
    block = dict(block)
    block.setdefault("device", config["device"])
    return block


def variant_params(variant):
    """The classifier block with the variant's overrides on top."""
    params = dict(config["classifier"])
    params.update(config["variants"][variant])
    return with_device(params)


def dataset_block():
    """The dataset config block as the index stage receives it."""
    block = dict(DATASET)
    if block["type"] == "synthetic":
        block.setdefault("splits", {"train": "train.txt", "val": "val.txt"})
    return block


def dataset_root():
    return DATASET["root"]


def has_contexts():
    """Whether the index records context masks (the synthetic world's, or dataset.context_dir)."""
    return DATASET["type"] == "synthetic" or bool(DATASET.get("context_dir"))


def saliency_shards():
    return scatter.shard(f"{RESULTS}/saliency/{SAL_METHOD}/shard-{{scatteritem}}.h5")


# Each saliency method's module: eps.saliency imports it by name, which stage_code cannot see
SALIENCY_CODE = {m: [f"eps/saliency/{m}.py"] for m in ("classical", "usps", "pfan", "dss", "csnet", "precomputed")}


def saliency_code(method):
    return code_hash("eps/saliency/__init__.py", *SALIENCY_CODE[method])


def saliency_weights(wildcards):
    """The weights of a network method: usps trains its own (train_saliency), pfan / dss / csnet
    read saliency.weights (csnet also its .bin layer configuration, same stem, as a second input)."""
    if wildcards.method == "usps":
        return [f"{RESULTS}/saliency/usps/model.pt"]
    if wildcards.method in ("pfan", "dss", "csnet"):
        weights = config["saliency"].get("weights")
        if not weights:
            raise ValueError(f"saliency.weights: method {wildcards.method} needs a weights file")
        if wildcards.method == "csnet":  # eps.saliency.csnet.config_path, without importing torch here
            stem = next(
                (weights[: -len(s)] for s in (".pth.tar", ".pth", ".pt", ".tar") if weights.endswith(s)),
                os.path.splitext(weights)[0],
            )
            return [weights, f"{stem}.bin"]
        return [weights]
    return []


def pairs_args():
    """evaluate-masks --pairs for the co-occurrence confusion, when the index has context masks."""
    if not has_contexts():
        return ""
    return f"--pairs {shlex.quote(as_json(config['evaluation']['confusion_pairs']))}"


def index_inputs(wildcards):
    """The synthetic world must be generated before it is indexed."""
    return [f"{RESULTS}/data/meta.json"] if DATASET["type"] == "synthetic" else []


def train_saliency(wildcards):
    """Saliency shards feed only the eps loss."""
    return saliency_shards() if variant_params(wildcards.variant)["loss"] == "eps" else []
