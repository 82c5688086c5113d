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

    d = sub.add_parser("demo", help="shard Fashion-MNIST and pretrain a tiny MAE on CPU")
    d.add_argument("--workdir", default="vitpipe-demo")
    d.add_argument("--steps", type=int, default=None)
    d.add_argument("--resume", default="auto")

    e = sub.add_parser("export", help="checkpoint -> encoder/MAE safetensors + metadata.json")
    e.add_argument("--checkpoint", required=True, help="a step-N folder, or a checkpoint dir (newest complete)")
    e.add_argument("--out", required=True)

    sub.add_parser("recipes", help="list the built-in recipes")
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
        if args.command == "shard":
            from .stages.shard import index_shards, shard_fashion_mnist, shard_image_folder

            if rest:
                raise ConfigError(f"unexpected arguments: {' '.join(rest)}")
            if args.index:
                index_shards(args.index, args.out, args.split)
            elif args.images:
                shard_image_folder(args.images, args.out, args.shard_size or 1000, args.workers, args.holdout)
            else:
                shard_fashion_mnist(args.out, args.fashion_mnist, args.shard_size or 10000, args.workers)
        elif args.command == "pretrain":
            from .recipe import load_recipe, parse_overrides
            from .stages.pretrain import pretrain

            pretrain(load_recipe(args.config, parse_overrides(rest)), resume=args.resume)
        elif args.command == "demo":
            from .recipe import parse_overrides
            from .stages.demo import demo

            demo(args.workdir, args.steps, parse_overrides(rest), resume=args.resume)
        elif args.command == "export":
            from .checkpoint import export_checkpoint, latest_complete

            ckpt = latest_complete(args.checkpoint) or args.checkpoint
            print(f"exported {ckpt} -> {export_checkpoint(ckpt, args.out)}")
        elif args.command == "recipes":
            from .resources import list_recipes

            print("\n".join(list_recipes()))
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"vitpipe {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
