"""DeiT distillation on Fashion-MNIST, CPU: why does a tiny DeiT student not gain from a CNN teacher?

A resnet10t teacher is trained and registered by the pipeline (or an existing one is named with --teacher),
then the same tiny DeiT student is trained for the same steps without a teacher and with hard distillation
from it, under each named setting:

- ``plain``: the recipe as it is (mixup / cutmix on half the batches; the teacher sees the mixed images);
- ``no-mixup``: no mixup or cutmix, so the teacher's targets are those of clean images;
- ``alpha-0.9``: the distillation term weighted 0.9 instead of 0.5;
- ``soft``: soft distillation (tau 3) instead of hard.

Every stage is a ``vitpipe`` command (printed before it runs). The table gives each student's held-out top-1
on the 10,000 test images, the teacher's top-1 on those images as the student's pipeline hands them to it
(``val/teacher_top1``), how often the distillation head agrees with the teacher (held out and, averaged over
training, on the training images), and the wall time.

    python benchmarks/deit_fmnist.py --steps 600 --teacher-steps 600 --settings plain,no-mixup [--work DIR]
    python benchmarks/deit_fmnist.py --teacher models:/vitpipe-compare-cnn@teacher \\
        --tracking-uri sqlite:///vitpipe-compare/mlflow/mlflow.db   # the teacher `vitpipe compare` trained
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

from mlflow import MlflowClient

SETTINGS = {
    "plain": [],
    "no-mixup": ["--model.mixup.mixup_alpha=0", "--model.mixup.cutmix_alpha=0"],
    "alpha-0.9": ["--model.distill.alpha=0.9"],
    "soft": ["--model.distill.kind=soft", "--model.distill.tau=3.0"],
}
# Settings whose control (the student without a teacher) is another setting's: only the distillation changed
CONTROL = {"alpha-0.9": "plain", "soft": "plain"}
# The augmentation `vitpipe compare --fashion-mnist` gives every row (the teacher included)
MIXUP = ["--model.mixup.mixup_alpha=0.8", "--model.mixup.cutmix_alpha=1.0", "--model.mixup.prob=0.5",
         "--model.mixup.switch_prob=0.5"]


def vitpipe(args: list[str], cwd: Path) -> float:
    cmd = [sys.executable, "-m", "pipeline.cli", *args]
    print("$ vitpipe " + " ".join(shlex.quote(a) for a in args), flush=True)
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if out.returncode:
        sys.exit(f"failed:\n{out.stderr[-4000:]}")
    return time.perf_counter() - start


def student_row(client: MlflowClient, experiment: str, tag: str) -> dict[str, float | None]:
    """What the newest student run named ``deit <tag>`` measured."""
    exp = client.get_experiment_by_name(experiment)
    run = client.search_runs([exp.experiment_id], f"attributes.run_name = 'deit {tag}'",
                             order_by=["start_time DESC"])[0]
    m = run.data.metrics
    agreement = client.get_metric_history(run.info.run_id, "train/dist_teacher_agreement")
    return {"top1": m["val/top1"], "teacher_via_student": m.get("val/teacher_top1"),
            "agree_val": m.get("val/dist_head_teacher_agreement"),
            "agree_train": sum(a.value for a in agreement) / len(agreement) if agreement else None,
            "dist_head": m.get("val/top1_dist_head"), "cls_head": m.get("val/top1_cls_head")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=600, help="optimizer steps of each student")
    p.add_argument("--teacher-steps", type=int, default=600, help="optimizer steps of the CNN teacher")
    p.add_argument("--teacher", help="an existing teacher (models:/name@alias) instead of training one")
    p.add_argument("--tracking-uri", help="the store that holds --teacher (default: one in --work)")
    p.add_argument("--settings", default="plain,no-mixup", help=f"comma-separated, of {', '.join(SETTINGS)}")
    p.add_argument("--work", default="/tmp/deit-fmnist")
    args = p.parse_args()
    settings = [s for s in args.settings.split(",") if s]
    if unknown := set(settings) - set(SETTINGS):
        sys.exit(f"unknown settings {sorted(unknown)}; known: {', '.join(SETTINGS)}")
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    shards = work / "shards" / "fmnist"
    if not (shards / "val" / "manifest.json").exists():
        vitpipe(["shard", "--fashion-mnist", "--out", str(shards)], work)
    uri = args.tracking_uri or f"sqlite:///{work / 'mlflow.db'}"
    common = [f"--data.train={shards / 'train'}", f"--data.val={shards / 'val'}", f"--tracking.uri={uri}",
              "--tracking.experiment=vitpipe-deit-bench", "--resume=none", *MIXUP]
    teacher, teacher_wall = args.teacher, None
    if teacher is None:
        teacher = "models:/vitpipe-bench-cnn@teacher"
        teacher_wall = vitpipe(["pretrain", "--config", "classify/resnet_fmnist", *common,
                                f"--trainer.max_steps={args.teacher_steps}", "--register.name=vitpipe-bench-cnn",
                                f"--checkpoint.dir={work / 'teacher'}"], work)
    client = MlflowClient(uri)
    rows, walls = {}, {}
    for setting in settings:
        kinds = ["hard"] if setting in CONTROL else ["none", "hard"]
        for kind in kinds:
            tag = f"{setting}/{kind}"
            extra = [] if kind == "none" else [f"--model.teacher.model={teacher}", "--model.distill.kind=hard"]
            walls[tag] = vitpipe(["pretrain", "--config", "deit/tiny_fmnist", *common, *extra, *SETTINGS[setting],
                                  f"--trainer.max_steps={args.steps}", f"--checkpoint.dir={work / tag}",
                                  f"--tracking.run_name=deit {tag}"], work)
            rows[tag] = student_row(client, "vitpipe-deit-bench", tag)
    teacher_note = f"trained {args.teacher_steps} steps in {teacher_wall:.0f} s" if teacher_wall else teacher
    print(f"\nFashion-MNIST, tiny DeiT students {args.steps} steps of 128 images, teacher resnet10t ({teacher_note}); "
          "held-out top-1 on the 10,000 test images")
    cols = ("top1", "cls_head", "dist_head", "teacher_via_student", "agree_val", "agree_train")
    print(f"{'setting / distillation':24s} " + " ".join(f"{c:>19s}" for c in cols) + f" {'wall s':>7s}")
    for tag, row in rows.items():
        cells = ("-" if row[c] is None else f"{row[c]:.4f}" for c in cols)
        print(f"{tag:24s} " + " ".join(f"{c:>19s}" for c in cells) + f" {walls[tag]:7.0f}")


if __name__ == "__main__":
    main()
