"""DeiT distillation on Fashion-MNIST, CPU: a CNN teacher trained and registered by the pipeline, then the same
tiny DeiT student trained for the same steps without a teacher and with hard (and soft) distillation from it.

Every stage is a `vitpipe` command (printed before it runs) in one work folder with its own MLflow store;
the table gives each model's held-out top-1 on the 10,000 test images (logged as ``val/top1`` by the stage),
its wall time, and for the students the mean teacher forward time per step (``perf/teacher_s``).

    python benchmarks/deit_fmnist.py --steps 300 --teacher-steps 600 [--work /tmp/deit-fmnist] [--soft]
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

from mlflow import MlflowClient

TEACHER = "models:/vitpipe-demo-cnn@teacher"


def vitpipe(args: list[str], cwd: Path) -> float:
    cmd = [sys.executable, "-m", "pipeline.cli", *args]
    print("$ vitpipe " + " ".join(shlex.quote(a) for a in args), flush=True)
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"failed:\n{out.stderr[-4000:]}")
    print("  " + "\n  ".join(line for line in out.stdout.splitlines() if "top-1" in line or "registered" in line))
    return time.perf_counter() - start


def last_run(client: MlflowClient, tag: str, value: str) -> tuple[float, float | None]:
    """(val/top1, mean perf/teacher_s) of the newest run whose tag ``tag`` equals ``value``."""
    exp = client.get_experiment_by_name("vitpipe-demo")
    run = client.search_runs([exp.experiment_id], f"tags.`{tag}` = '{value}'", order_by=["start_time DESC"])[0]
    teacher = client.get_metric_history(run.info.run_id, "perf/teacher_s")
    return run.data.metrics["val/top1"], (sum(m.value for m in teacher) / len(teacher) if teacher else None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="optimizer steps of each student")
    p.add_argument("--teacher-steps", type=int, default=600, help="optimizer steps of the CNN teacher")
    p.add_argument("--work", default="/tmp/deit-fmnist")
    p.add_argument("--soft", action="store_true", help="also distil with soft targets (tau 3, alpha 0.5)")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    shards = work / "vitpipe-demo" / "shards" / "fmnist"
    if not (shards / "val" / "manifest.json").exists():
        vitpipe(["shard", "--fashion-mnist", "--out", str(shards)], work)
    steps = [f"--trainer.max_steps={args.steps}"]
    rows = []
    t = vitpipe(["pretrain", "--config", "classify/resnet_fmnist", f"--trainer.max_steps={args.teacher_steps}",
                 "--resume", "none"], work)
    client = MlflowClient(f"sqlite:///{work / 'mlflow' / 'mlflow.db'}")
    rows.append(("teacher: resnet10t (classify/resnet_fmnist)", *last_run(client, "vitpipe.arch", "resnet10t"), t))
    students = [("none", []), ("hard", ["--model.distill.kind=hard", f"--model.teacher.model={TEACHER}"])]
    if args.soft:
        students.append(("soft", ["--model.distill.kind=soft", "--model.distill.tau=3.0",
                                  f"--model.teacher.model={TEACHER}"]))
    for kind, extra in students:
        t = vitpipe(["pretrain", "--config", "deit/tiny_fmnist", *steps, *extra, "--resume", "none",
                     f"--checkpoint.dir=vitpipe-demo/deit-{kind}"], work)
        rows.append((f"student: tiny DeiT, distillation {kind}", *last_run(client, "vitpipe.distill", kind), t))
    print(f"\nFashion-MNIST, students {args.steps} steps and teacher {args.teacher_steps} steps of 128 images, "
          "held-out top-1 on the 10,000 test images")
    print(f"{'model':48s} {'top-1':>7s} {'teacher s/step':>15s} {'wall s':>8s}")
    for name, top1, teacher_s, wall in rows:
        ts = "-" if teacher_s is None else f"{teacher_s:.3f}"
        print(f"{name:48s} {top1:7.4f} {ts:>15s} {wall:8.0f}")


if __name__ == "__main__":
    main()
