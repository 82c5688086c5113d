"""`vitpipe compare`: ViTs and CNNs side by side on this machine, speed and memory (timm architectures, fresh
weights): a CSV in timm's benchmark columns and a plot of training throughput against compute per image."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

from ..console import report

DEFAULT_MODELS = ("vit_small_patch16_224", "vit_base_patch16_224", "resnet50", "convnext_tiny")


def compare_speed(models: list[str], out: str | Path, size: int = 224, batch: int = 8, steps: int = 3,
                  warmup: int = 1) -> list[dict]:
    """Measure each architecture in its own process; write ``compare.csv`` and ``compare.png`` under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for arch in models:
        cmd = [sys.executable, "-m", "pipeline.inspection.speed", arch, "--size", str(size), "--batch", str(batch),
               "--steps", str(steps), "--warmup", str(warmup)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise ValueError(f"compare: measuring {arch} failed: {done.stderr.strip().splitlines()[-1:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        report.info(f"compare: {arch}: {r['param_count']} M params, {r['infer_gmacs']} GMACs, train "
                    f"{r['train_samples_per_sec']} img/s, infer {r['infer_samples_per_sec']} img/s, peak "
                    f"{r['train_peak_mem_mb']:.0f} MB ({r['device']}, {r['precision']})")
    with (out / "compare.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, out / "compare.png")
    report.info(f"compare: {out / 'compare.csv'}, {out / 'compare.png'}")
    return rows


def plot(rows: list[dict], path: Path) -> Path:
    from ..inspection.plots import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), dpi=120)
    for r in rows:
        vit = r["model"].startswith(("vit", "deit"))
        for ax, key in zip(axes, ("train_samples_per_sec", "infer_samples_per_sec")):
            ax.scatter(r["infer_gmacs"], r[key], s=20 + r["param_count"], marker="o" if vit else "s",
                       color="tab:blue" if vit else "tab:orange")
            ax.annotate(r["model"], (r["infer_gmacs"], r[key]), fontsize=7, xytext=(4, 4),
                        textcoords="offset points")
    for ax, name in zip(axes, ("training", "inference")):
        ax.set_xlabel("GMACs per image")
        ax.set_ylabel(f"{name} images/s")
        ax.set_title(f"{name}, {rows[0]['device']} ({rows[0]['precision']}); size: parameters", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
