"""``vitpipe``: subcommands mapped to stage functions, nothing more."""
from __future__ import annotations

import argparse
import logging
import sys

from .config import ConfigError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vitpipe", description="Self-supervised ViT pretraining pipeline")
    sub = p.add_subparsers(dest="command", required=True)

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

    t = sub.add_parser("pretrain", help="pretrain with a recipe; --section.key VALUE overrides")
    t.add_argument("--config", required=True, help="recipe file or built-in name (e.g. mae/vit_large16)")
    t.add_argument("--resume", default="auto", help="auto (newest complete checkpoint), none, or a path")

    f = sub.add_parser("finetune", help="fine-tune a registered encoder with a recipe; --section.key overrides")
    f.add_argument("--model", help="models:/<name>@<alias>, models:/<name>/<version> or an export folder "
                                   "(default: the recipe's model.init)")
    f.add_argument("--config", required=True, help="recipe file or built-in name (e.g. finetune/vit_base16)")
    f.add_argument("--resume", default="auto")

    r = sub.add_parser("register", help="export a checkpoint and register it in the MLflow model registry")
    r.add_argument("--checkpoint", required=True, help="a step-N folder or a checkpoint dir (newest complete)")
    r.add_argument("--name", required=True, help="registered model name")
    r.add_argument("--alias", default="candidate", help="alias for the new version ('latest' is reserved)")
    r.add_argument("--tracking-uri", help="default: the tracking URI of the recipe that trained it")

    v = sub.add_parser("evaluate", help="kNN / linear-probe accuracy of a registered encoder")
    v.add_argument("--model", required=True, help="models:/<name>@<alias>, models:/<name>/<version> or a folder")
    v.add_argument("--protocol", choices=["knn", "linear", "all"], default="all")
    v.add_argument("--train", required=True, help="labelled split (manifest or its folder) to fit on")
    v.add_argument("--val", required=True, help="held-out labelled split to measure on")
    v.add_argument("--max-train", type=int, default=None)
    v.add_argument("--max-val", type=int, default=None)
    v.add_argument("--k", type=int, default=20)
    v.add_argument("--temperature", type=float, default=0.07)
    v.add_argument("--pool", choices=["cls", "mean"], default="cls")
    v.add_argument("--crop-pct", type=float, default=0.875)
    v.add_argument("--workers", type=int, default=1)
    v.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else ./mlflow/mlflow.db")
    v.add_argument("--experiment", help="default: the experiment of the run that trained the model")

    d = sub.add_parser("demo", help="Fashion-MNIST on CPU: shard, pretrain, register, evaluate, compare")
    d.add_argument("--workdir", default="vitpipe-demo")
    d.add_argument("--steps", type=int, default=None)
    d.add_argument("--resume", default="auto")
    d.add_argument("--eval-train", type=int, default=10_000, help="train images for kNN / linear probe")
    d.add_argument("--eval-val", type=int, default=2_000, help="held-out images they are measured on")

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

    sub.add_parser("recipes", help="list the built-in recipes")

    j = sub.add_parser("submit", help="render a stage's Slurm or Kubernetes job from jobs/ and submit (or print) it")
    j.add_argument("--target", choices=["slurm", "k8s"], required=True)
    j.add_argument("--config", required=True, help="recipe name or file, as the cluster's nodes will see it")
    j.add_argument("--stage", choices=["pretrain", "finetune", "register", "evaluate"], default="pretrain")
    j.add_argument("--nodes", type=int, default=1)
    j.add_argument("--gpus-per-node", type=int, default=8, help="one process per GPU; 0: CPU processes")
    j.add_argument("--cpu-tasks-per-node", type=int, default=1, help="processes per node when --gpus-per-node 0")
    j.add_argument("--cluster", default="example", help="cluster profile: jobs/clusters/<name>.yaml or a file")
    j.add_argument("--job-name", help="default: <recipe>-<stage>")
    j.add_argument("--after", action="append", default=[], help="Slurm job id this job waits for (afterok)")
    j.add_argument("--chain", action="store_true", help="Slurm: submit the stage, then register, then evaluate")
    j.add_argument("--dry-run", action="store_true", help="print the job instead of submitting it")
    return p


def main(argv: list[str] | None = None) -> int:
    logger = logging.getLogger("pipeline")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    args, rest = _parser().parse_known_args(argv)
    try:
        if rest and args.command not in ("pretrain", "finetune", "demo", "submit"):  # these take --section.key
            raise ConfigError(f"unexpected arguments: {' '.join(rest)}")
        if args.command == "shard":
            from .stages.shard import index_shards, shard_fashion_mnist, shard_image_folder

            if args.index:
                index_shards(args.index, args.out, args.split)
            elif args.images:
                shard_image_folder(args.images, args.out, args.shard_size or 1000, args.workers, args.holdout)
            else:
                shard_fashion_mnist(args.out, args.fashion_mnist, args.shard_size or 10000, args.workers)
        elif args.command == "pretrain":
            from .recipe import load_recipe, parse_overrides
            from .stages.pretrain import pretrain

            recipe = load_recipe(args.config, parse_overrides(rest))
            if recipe.task not in ("mae", "deit", "classify"):
                raise ConfigError(f"{args.config}: task is {recipe.task!r}; use `vitpipe {recipe.task}`")
            if (result := pretrain(recipe, resume=args.resume)).preempted:
                return 128 + result.preempted  # as a shell reports death by that signal: a retryable failure
        elif args.command == "finetune":
            from .recipe import load_recipe, parse_overrides
            from .stages.finetune import finetune

            overrides = parse_overrides(rest)
            if args.model:
                overrides["model.init"] = args.model
            recipe = load_recipe(args.config, overrides)
            if recipe.task != "finetune":
                raise ConfigError(f"{args.config}: task is {recipe.task!r}, not finetune")
            if (result := finetune(recipe, resume=args.resume)).preempted:
                return 128 + result.preempted
        elif args.command == "register":
            from .stages.register import register_checkpoint

            register_checkpoint(args.checkpoint, args.name, args.alias, args.tracking_uri)
        elif args.command == "evaluate":
            from .evaluation import KNNConfig
            from .stages.evaluate import EvalConfig, evaluate_model
            from .tracking import TrackingConfig

            protocols = ["knn", "linear"] if args.protocol == "all" else [args.protocol]
            cfg = EvalConfig(train=args.train, val=args.val, protocols=protocols, max_train=args.max_train,
                             max_val=args.max_val, pool=args.pool, crop_pct=args.crop_pct,
                             num_workers=args.workers, knn=KNNConfig(k=args.k, temperature=args.temperature))
            evaluate_model(args.model, cfg, TrackingConfig(uri=args.tracking_uri), args.experiment)
        elif args.command == "demo":
            from .recipe import parse_overrides
            from .stages.demo import demo

            demo(args.workdir, args.steps, parse_overrides(rest), resume=args.resume, eval_train=args.eval_train,
                 eval_val=args.eval_val)
        elif args.command == "export":
            from .checkpoint import export_checkpoint, latest_complete

            ckpt = latest_complete(args.checkpoint) or args.checkpoint
            print(f"exported {ckpt} -> {export_checkpoint(ckpt, args.out)}")
            if args.timm:
                from .checkpoint.export import load_encoder
                from .models.convert import write_timm

                print(f"timm state dict -> {write_timm(args.out, load_encoder(args.out))}")
        elif args.command == "import-weights":
            from .checkpoint.export import write_export
            from .models.convert import IMAGENET_NORMALISATION, import_encoder, import_mae

            size = tuple(args.image_size) if args.image_size else None
            encoder, report = import_encoder(args.weights, args.num_heads, size)
            mae = import_mae(args.weights, args.num_heads, image_size=size) if args.mae else None
            norm = {"mean": args.mean or IMAGENET_NORMALISATION["mean"],
                    "std": args.std or IMAGENET_NORMALISATION["std"]}
            out = write_export(args.out, mae.encoder if mae else encoder, mae, norm, {"source": report.meta()})
            print(f"imported {args.weights} ({report.format}) -> {out}")
            for note in report.notes:
                print(f"  note: {note}")
            if report.ignored:
                print(f"  ignored: {', '.join(report.ignored)}")
        elif args.command == "submit":
            from .recipe import parse_overrides
            from .stages.submit import SubmitRequest, submit

            req = SubmitRequest(args.target, args.config, args.stage, parse_overrides(rest), args.nodes,
                                args.gpus_per_node, args.cpu_tasks_per_node, args.cluster, args.job_name, args.after)
            submit(req, dry_run=args.dry_run, chain=args.chain)
        elif args.command == "recipes":
            from .resources import list_recipes

            print("\n".join(list_recipes()))
    except (ConfigError, FileNotFoundError, ValueError) as err:  # ModelError, ManifestError are ValueErrors
        print(f"vitpipe {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
