"""``vitpipe``: subcommands mapped to stage functions, nothing more."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import faulthandler
import logging
import signal
import sys
from collections.abc import Callable
from typing import get_args

from .config import ConfigError
from .console import quiet_third_party
from .errors import RunStopped
from .evaluation.config import EvalConfig, KNNConfig

OVERRIDES = """\
Any recipe key can be set on the command line: --section.key VALUE (or --section.key=VALUE), e.g.
  --trainer.max_steps 100 --data.train s3://bucket/train --model.encoder.image_size "[224, 224]"
Values are read as YAML. List a recipe's sections, keys, types, defaults and what each means with:
  vitpipe recipes show RECIPE
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vitpipe", description="Self-supervised ViT pretraining pipeline")
    sub = p.add_subparsers(dest="command", required=True)
    with_overrides = {"epilog": OVERRIDES, "formatter_class": argparse.RawDescriptionHelpFormatter}

    s = sub.add_parser("shard", help="image folder or Fashion-MNIST -> WebDataset shards + manifests")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="folder with train/ and val/ (or <class>/ directly)")
    src.add_argument("--fashion-mnist", nargs="?", const="/usr/share/datasets/fashion-mnist", metavar="DIR",
                     help="Fashion-MNIST IDX files (default: the Debian package's folder)")
    src.add_argument("--index", nargs="+", metavar="TAR", help="existing WebDataset shards: write a manifest")
    s.add_argument("--out", required=True, help="output folder or fsspec URL")
    s.add_argument("--shard-size", type=int, default=None, help="samples per shard")
    s.add_argument("--workers", type=int, default=2, help="processes writing shards")
    s.add_argument("--holdout", type=float, default=0.0, help="held-out fraction for a folder without val/")
    s.add_argument("--split", default="train", help="split name for --index")
    s.add_argument("--strict", action="store_true",
                   help="--index: a truncated shard is an error (exit 2) instead of being recorded with its "
                        "readable samples")

    t = sub.add_parser("pretrain", help="pretrain with a recipe; --section.key VALUE overrides", **with_overrides)
    t.add_argument("--config", required=True, help="recipe file or built-in name (e.g. mae/vit_large16)")
    t.add_argument("--resume", default="auto",
                   help="auto (newest complete checkpoint, default), none, a step-N folder or an s3://… one")

    f = sub.add_parser("finetune", help="fine-tune a registered encoder with a recipe; --section.key overrides",
                       **with_overrides)
    f.add_argument("--model", help="models:/<name>@<alias>, models:/<name>/<version> or an export folder "
                                   "(default: the recipe's model.init)")
    f.add_argument("--config", required=True, help="recipe file or built-in name (e.g. finetune/vit_base16)")
    f.add_argument("--resume", default="auto", help="auto (default), none, or a step-N folder")

    r = sub.add_parser("register", help="export a checkpoint and register it in the MLflow model registry")
    r.add_argument("--checkpoint", required=True, help="a step-N folder or a checkpoint dir (newest complete)")
    r.add_argument("--name", required=True, help="registered model name")
    r.add_argument("--alias", default="candidate", help="alias for the new version ('latest' is reserved)")
    r.add_argument("--tracking-uri", help="default: the tracking URI of the recipe that trained it (a server's "
                                          "credentials: MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)")

    v = sub.add_parser("evaluate", help="kNN / linear-probe accuracy of a registered encoder")
    v.add_argument("--model", required=True, help="models:/<name>@<alias>, models:/<name>/<version> or a folder")
    v.add_argument("--protocol", choices=["knn", "linear", "all"], default="all",
                   help="kNN, linear probe, or both on the same features (default: all)")
    v.add_argument("--train", required=True, help="labelled split (manifest or its folder) to fit on")
    v.add_argument("--val", required=True, help="held-out labelled split to measure on")
    # Defaults live on the configs (None here: not given); the help shows them.
    v.add_argument("--max-train", type=int, help="use the first N samples of --train (default: all)")
    v.add_argument("--max-val", type=int, help="use the first N samples of --val (default: all)")
    v.add_argument("--k", type=int, help=f"kNN: neighbours that vote (default: {_default(KNNConfig, 'k')})")
    v.add_argument("--temperature", type=float,
                   help=f"kNN: votes weighted by exp(cosine / T) (default: {_default(KNNConfig, 'temperature')})")
    v.add_argument("--pool", choices=["cls", "mean"],
                   help=f"feature: the CLS token or the mean of the patch tokens (default: "
                        f"{_default(EvalConfig, 'pool')})")
    v.add_argument("--image-size", type=int, nargs="+", metavar="S",
                   help="evaluate at S (or H W) pixels, positions resampled (default: the model's own size)")
    v.add_argument("--crop-pct", type=float,
                   help="resize the shorter side to size / crop-pct, then centre-crop; 1: resize only "
                        f"(default: {_default(EvalConfig, 'crop_pct')})")
    v.add_argument("--workers", type=int,
                   help=f"loader processes reading the splits (default: {_default(EvalConfig, 'num_workers')})")
    v.add_argument("--tracking-uri",
                   help="store holding a models:/ URI (default: $MLFLOW_TRACKING_URI, else ./mlflow/mlflow.db)")
    v.add_argument("--experiment", help="default: the experiment of the run that trained the model")

    i = sub.add_parser("inspect", help="attention maps and mean attention distance of a ViT encoder")
    i.add_argument("--model", required=True, help="models:/<name>@<alias>, models:/<name>/<version> or a folder")
    i.add_argument("--images", required=True, help="shard split (manifest or its folder) to take images from")
    i.add_argument("--n", type=int, default=128, help="images to average over (default: 128)")
    i.add_argument("--image-size", type=int, nargs="+", metavar="S",
                   help="inspect at S (or H W) pixels, positions resampled (default: the model's own size)")
    i.add_argument("--out", help="folder for the CSV and figures (default: a temporary one)")
    i.add_argument("--tracking-uri",
                   help="store holding a models:/ URI (default: $MLFLOW_TRACKING_URI, else ./mlflow/mlflow.db)")
    i.add_argument("--experiment", help="default: nested under the model's training run, else vitpipe-inspect")

    c = sub.add_parser("compare", help="ViTs and CNNs side by side on this machine: speed and memory")
    c.add_argument("--models", default="vit_small_patch16_224,vit_base_patch16_224,resnet50,convnext_tiny",
                   help="comma-separated timm architectures (fresh weights, nothing downloaded)")
    c.add_argument("--image-size", type=int, default=224)
    c.add_argument("--batch", type=int, default=8, help="images per step (default: 8; 256 suits a GPU)")
    c.add_argument("--steps", type=int, default=3, help="measured steps after one warm-up step")
    c.add_argument("--out", default="vitpipe-compare", help="folder for compare.csv and compare.png")
    c.add_argument("--fashion-mnist", action="store_true",
                   help="instead: top-1 at an equal supervised budget on Fashion-MNIST (resnet10t, a tiny ViT from "
                        "scratch, the same ViT fine-tuned from MAE, a DeiT student of the CNN), trained in --out")
    c.add_argument("--train-steps", type=int, default=600, help="--fashion-mnist: supervised steps of every row")
    c.add_argument("--mae-steps", type=int, default=600, help="--fashion-mnist: MAE pretraining steps")
    c.add_argument("--eval-limit", type=int, help="--fashion-mnist: held-out images (default: all 10,000)")
    c.add_argument("--shards", help="--fashion-mnist: folder with train/ and val/ shards (default: sharded into --out)")

    d = sub.add_parser("demo", help="Fashion-MNIST on CPU: shard, pretrain, register, evaluate, compare",
                       **with_overrides)
    d.add_argument("--workdir", default="vitpipe-demo")
    d.add_argument("--steps", type=int, default=None)
    d.add_argument("--resume", default="auto")
    d.add_argument("--eval-train", type=int, help="train images for kNN / linear probe (default 5,000)")
    d.add_argument("--eval-val", type=int, help="held-out images every figure is measured on (default 2,000)")
    d.add_argument("--finetune-steps", type=int, help="steps of each of the two fine-tunes (default 150)")

    e = sub.add_parser("export", help="checkpoint -> encoder/MAE safetensors + metadata.json")
    e.add_argument("--checkpoint", required=True, help="a step-N folder, or a checkpoint dir (newest complete)")
    e.add_argument("--out", required=True)
    e.add_argument("--timm", action="store_true", help="also write timm.safetensors (timm VisionTransformer keys)")

    i = sub.add_parser("import-weights", help="a released MAE / DeiT checkpoint or timm state dict (local "
                                              "file) -> an export folder that register / finetune use")
    i.add_argument("--weights", required=True, help=".pth / .pt / .bin / .safetensors file")
    i.add_argument("--out", required=True)
    i.add_argument("--mae", action="store_true", help="import the full MAE, decoder included")
    i.add_argument("--num-heads", type=int, default=None, help="default: the standard ViT size for the width")
    i.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="needed when the position table's grid is not square")
    i.add_argument("--mean", type=float, nargs=3, default=None, help="input normalisation (default ImageNet)")
    i.add_argument("--std", type=float, nargs=3, default=None)

    c = sub.add_parser("recipes", help="list the built-in recipes, or show one's keys: recipes show NAME",
                       **with_overrides)
    c.add_argument("action", nargs="?", choices=["list", "show"], default="list")
    c.add_argument("name", nargs="?", help="with show: a built-in recipe name or a recipe file")

    u = sub.add_parser("ui", help="browse runs and registered models in MLflow's UI (local store, 127.0.0.1)")
    u.add_argument("--workdir", help="folder a run or the demo worked in: its store WORKDIR/mlflow/mlflow.db")
    u.add_argument("--tracking-uri", help="a store URI (default: $MLFLOW_TRACKING_URI, else ./mlflow/mlflow.db)")
    u.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    u.add_argument("--port", type=int, default=5000, help="port (default: 5000)")

    j = sub.add_parser("submit", help="render a stage's Slurm or Kubernetes job from jobs/ and submit (or print) it")
    j.add_argument("--target", choices=["slurm", "k8s"], required=True)
    j.add_argument("--config", required=True, help="recipe name or file, as the cluster's nodes will see it")
    # Defaults live on SubmitRequest (imports no torch); the help shows them.
    from .stages.submit import Stage, SubmitRequest

    req = {name: _default(SubmitRequest, name) for name in ("stage", "nodes", "gpus_per_node", "cpu_tasks_per_node",
                                                            "cluster")}
    j.add_argument("--stage", choices=get_args(Stage), default=req["stage"])
    j.add_argument("--nodes", type=int, default=req["nodes"],
                   help=f"nodes (default: {req['nodes']}); sets the recipe's trainer.num_nodes")
    j.add_argument("--gpus-per-node", type=int, default=req["gpus_per_node"],
                   help=f"one process per GPU; 0: CPU processes (default: {req['gpus_per_node']}); sets "
                        "trainer.devices and accelerator")
    j.add_argument("--cpu-tasks-per-node", type=int, default=req["cpu_tasks_per_node"],
                   help=f"processes per node when --gpus-per-node 0 (default: {req['cpu_tasks_per_node']})")
    j.add_argument("--cluster", default=req["cluster"],
                   help="cluster profile: jobs/clusters/<name>.yaml or a file (default: %(default)s)")
    j.add_argument("--job-name", help="default: <recipe>-<stage>")
    j.add_argument("--after", action="append", default=[], help="Slurm job id this job waits for (afterok)")
    j.add_argument("--chain", action="store_true", help="Slurm: submit the stage, then register, then evaluate")
    j.add_argument("--dry-run", action="store_true", help="print the job instead of submitting it")
    return p


def _stacks_on_sigusr2() -> None:
    """A rank that hangs (a collective some rank never joined, a stuck read) shows where: SIGUSR2 prints every
    thread's Python stack to the process's stderr and the run goes on (`scancel --signal=USR2 JOB`, `kill -USR2
    PID`). Loader workers forked from the trainer inherit the handler and print theirs too."""
    with contextlib.suppress(AttributeError, OSError, ValueError):  # a stderr with no file behind it: no dumps
        faulthandler.register(signal.SIGUSR2, file=sys.__stderr__, all_threads=True)


def main(argv: list[str] | None = None) -> int:
    logger = logging.getLogger("pipeline")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    quiet_third_party()
    _stacks_on_sigusr2()
    args, rest = _parser().parse_known_args(argv)
    run, takes_overrides = VERBS[args.command]
    try:
        if rest and not takes_overrides:
            raise ConfigError(f"unexpected arguments: {' '.join(rest)}")
        return run(args, rest) or 0
    except (ConfigError, FileNotFoundError, ValueError) as err:  # ModelError, ManifestError are ValueErrors
        print(f"vitpipe {args.command}: error: {err}", file=sys.stderr)
        return 2
    except RunStopped as err:  # the guard's last word, a checkpoint that could not be written
        print(f"vitpipe {args.command}: stopped: {err}", file=sys.stderr)
        return 1


# Each verb: parse what is left of the arguments, call one stage function. Heavy modules are imported only
# once the arguments are checked, so a mistake is reported at once.


def _shard(args: argparse.Namespace, rest: list[str]) -> None:
    from .stages.shard import shard

    shard(args.out, args.images, args.fashion_mnist, args.index, args.shard_size, args.workers, args.holdout,
          args.split, args.strict)


def _pretrain(args: argparse.Namespace, rest: list[str]) -> int:
    from .recipe import load_recipe, parse_overrides

    return _train(load_recipe(args.config, parse_overrides(rest)), "pretrain", args.config, args.resume)


def _finetune(args: argparse.Namespace, rest: list[str]) -> int:
    from .recipe import load_recipe, parse_overrides

    overrides = {**parse_overrides(rest), **({"model.init": args.model} if args.model else {})}
    return _train(load_recipe(args.config, overrides), "finetune", args.config, args.resume)


def _train(recipe, verb: str, config: str, resume: str) -> int:
    """Train with the recipe's objective, if ``verb`` is the one that trains it."""
    from .objectives.registry import objective_of

    objective = objective_of(recipe)
    if objective.verb != verb:
        raise ConfigError(f"{config}: task {recipe.task!r} ({objective.summary}) is trained with "
                          f"`vitpipe {objective.verb}`")
    from .stages.train import train  # the training stack, once the recipe is checked

    if (result := train(recipe, resume=resume)).preempted:
        return 128 + result.preempted  # as a shell reports death by that signal: a retryable failure
    return 0


def _register(args: argparse.Namespace, rest: list[str]) -> None:
    from .stages.register import register_checkpoint

    register_checkpoint(args.checkpoint, args.name, args.alias, args.tracking_uri)


def _evaluate(args: argparse.Namespace, rest: list[str]) -> None:
    from .tracking import TrackingConfig

    protocols = ["knn", "linear"] if args.protocol == "all" else [args.protocol]
    knn = KNNConfig(**_given(k=args.k, temperature=args.temperature))
    cfg = EvalConfig(train=args.train, val=args.val, protocols=protocols, max_train=args.max_train,
                     max_val=args.max_val, image_size=_size(args.image_size), knn=knn,
                     **_given(pool=args.pool, crop_pct=args.crop_pct, num_workers=args.workers))
    from .stages.evaluate import evaluate_model  # the heavy part, once the arguments are checked

    evaluate_model(args.model, cfg, TrackingConfig(uri=args.tracking_uri), args.experiment)


def _inspect(args: argparse.Namespace, rest: list[str]) -> None:
    if args.n < 1:
        raise ConfigError(f"--n {args.n}: inspect needs at least one image")
    size = _size(args.image_size)
    from .stages.inspect import inspect_model
    from .tracking import TrackingConfig

    inspect_model(args.model, args.images, args.n, size, TrackingConfig(uri=args.tracking_uri), args.out,
                  args.experiment)


def _compare(args: argparse.Namespace, rest: list[str]) -> None:
    if args.fashion_mnist:
        if min(args.train_steps, args.mae_steps) < 1:
            raise ConfigError("compare --fashion-mnist needs --train-steps >= 1 and --mae-steps >= 1")
        from .stages.compare_accuracy import compare_accuracy

        compare_accuracy(args.out, args.train_steps, args.mae_steps, args.eval_limit, args.shards)
        return
    models = [m for m in args.models.split(",") if m]
    if not models or args.batch < 1 or args.steps < 1:
        raise ConfigError("compare needs at least one model, --batch >= 1 and --steps >= 1")
    from .stages.compare import compare_speed

    compare_speed(models, args.out, args.image_size, args.batch, args.steps)


def _demo(args: argparse.Namespace, rest: list[str]) -> None:
    from .recipe import parse_overrides
    from .stages.demo import demo

    demo(args.workdir, args.steps, parse_overrides(rest), resume=args.resume,
         **_given(eval_train=args.eval_train, eval_val=args.eval_val, finetune_steps=args.finetune_steps))


def _export(args: argparse.Namespace, rest: list[str]) -> None:
    from .checkpoint.store import committed_step
    from .stages.export import export_checkpoint, export_timm_names

    step = committed_step(args.checkpoint)
    print(f"exported {step} -> {export_checkpoint(step, args.out)}")
    if args.timm:
        print(f"timm state dict -> {export_timm_names(args.out)}")


def _import_weights(args: argparse.Namespace, rest: list[str]) -> None:
    from .stages.export import import_weights

    size = tuple(args.image_size) if args.image_size else None
    _, lines = import_weights(args.weights, args.out, args.mae, args.num_heads, size, args.mean, args.std)
    print("\n".join(lines))


def _submit(args: argparse.Namespace, rest: list[str]) -> None:
    from .recipe import parse_overrides
    from .stages.submit import SubmitRequest, submit

    req = SubmitRequest(args.target, args.config, args.stage, parse_overrides(rest), args.nodes, args.gpus_per_node,
                        args.cpu_tasks_per_node, args.cluster, args.job_name, args.after)
    submit(req, dry_run=args.dry_run, chain=args.chain)


def _ui(args: argparse.Namespace, rest: list[str]) -> int:
    from .stages.ui import serve_ui

    return serve_ui(args.workdir, args.tracking_uri, args.host, args.port)


def _default(cls: type, name: str):
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    return field.default


def _given(**values):
    """The options given on the command line (the rest keep their configs' defaults)."""
    return {k: v for k, v in values.items() if v is not None}


def _size(values: list[int] | None) -> tuple[int, int] | None:
    if values is None:
        return None
    if len(values) not in (1, 2) or min(values) < 1:
        raise ConfigError(f"--image-size takes one size or H W, got {' '.join(map(str, values))}")
    return (values[0], values[-1])


def _recipes(args: argparse.Namespace, rest: list[str]) -> None:
    from .resources import find_recipe, list_recipes

    action, name = args.action, args.name
    if action == "list":
        from .objectives.registry import names, objective

        print("\n".join(list_recipes()))  # stdout: the names alone, for scripts
        objectives = "\n".join(f"  {name:<10} {objective(name).summary}" for name in names())
        print(f"keys, types and defaults of one: vitpipe recipes show NAME\nobjectives (a recipe's task:):\n"
              f"{objectives}", file=sys.stderr)
        return
    if not name:
        raise ConfigError("recipes show needs a recipe name or file (vitpipe recipes lists them)")
    from .recipe import load_recipe, parse_overrides
    from .recipe_docs import describe

    recipe = load_recipe(name, parse_overrides(rest))
    print(f"recipe {name} ({find_recipe(name)}), task {recipe.task}: its sections and keys, each with type, "
          f"value and default.\nOverride any key with --section.key VALUE on the command line.\n")
    print("\n".join(describe(recipe)))


# verb -> (its function, whether it takes --section.key VALUE recipe overrides)
VERBS: dict[str, tuple[Callable[[argparse.Namespace, list[str]], int | None], bool]] = {
    "shard": (_shard, False), "pretrain": (_pretrain, True), "finetune": (_finetune, True),
    "register": (_register, False), "evaluate": (_evaluate, False), "inspect": (_inspect, False),
    "compare": (_compare, False),
    "demo": (_demo, True),
    "export": (_export, False), "import-weights": (_import_weights, False), "submit": (_submit, True),
    "recipes": (_recipes, True), "ui": (_ui, False),
}


def console() -> None:
    """The ``vitpipe`` command: ``main``, then the process ends."""
    from .shutdown import skip_final_collections

    code = main()
    skip_final_collections()
    sys.exit(code)


if __name__ == "__main__":
    console()
