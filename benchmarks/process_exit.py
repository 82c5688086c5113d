"""How long a training process takes to end once its work is done: Python's own shutdown against
``pipeline.shutdown.skip_final_collections`` first (what ``vitpipe`` does), alternating, median of ``--rounds``.

Each child runs a tiny ``vitpipe pretrain`` (Fashion-MNIST shards, 16 px, ZeRO-2 on one process, a local
MLflow store), notes its CPU time and the clock, optionally calls ``skip_final_collections``, and ends. The
exit cost is the child's CPU time (from ``wait4``) and wall time from that note to its end, the freeze's own
collection included.

Usage: python benchmarks/process_exit.py [--rounds 5]   (Fashion-MNIST from the dataset-fashion-mnist package)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.stages.shard import shard_fashion_mnist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
CHILD = """
import gc, json, os, sys, time
from pipeline.cli import main
from pipeline.shutdown import skip_final_collections
code = main(["pretrain", "--config", "mae/tiny_fmnist", *sys.argv[2:]])
objects = len(gc.get_objects())
t = os.times()  # its own CPU and that of the processes it waited for, as wait4 will count them
print(json.dumps({"cpu": t.user + t.system + t.children_user + t.children_system, "wall": time.time(),
                  "objects": objects}), flush=True)
if sys.argv[1] == "freeze":
    skip_final_collections()
sys.exit(code)
"""


def flags(shards: Path, work: Path) -> list[str]:
    """The tests' tiny pretrain, 4 steps under ZeRO-2, writing into ``work``."""
    from conftest import tiny_overrides

    overrides = tiny_overrides(shards, work, **{"trainer.max_steps": 4, "optim.warmup_steps": 1,
                                                "data.num_workers": 1, "trainer.strategy": "deepspeed",
                                                "zero.stage": 2, "checkpoint.every_n_steps": 2})
    return [f"--{k}={v}" for k, v in overrides.items()]


def one(mode: str, shards: Path, work: Path) -> dict:
    """Exit cost of one child, in s: CPU and wall from its mark to its end."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    work.mkdir(parents=True)
    with open(work / "stderr.log", "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", CHILD, mode, *flags(shards, work)], env=env,
                                stdout=subprocess.PIPE, stderr=err, text=True)
    line = proc.stdout.readline()
    while line and not line.startswith("{"):  # DeepSpeed's import prints to stdout too
        line = proc.stdout.readline()
    _, status, usage = os.wait4(proc.pid, 0)
    ended = time.time()
    proc.returncode = os.waitstatus_to_exitcode(status)
    proc.stdout.close()
    if proc.returncode != 0 or not line:
        tail = (work / "stderr.log").read_text()[-3000:]
        sys.exit(f"process_exit: the {mode} run failed ({proc.returncode}):\n{tail}")
    mark = json.loads(line)
    return {"cpu": usage.ru_utime + usage.ru_stime - mark["cpu"], "wall": ended - mark["wall"],
            "objects": mark["objects"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    got: dict[str, list[dict]] = {"python": [], "freeze": []}
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shards"
        shard_fashion_mnist(str(shards), shard_size=300, limit=600, log=lambda _: None)
        for i in range(args.rounds):
            for mode in got:  # alternating, so the machine's load falls on both alike
                got[mode].append(one(mode, shards, Path(tmp) / f"{mode}{i}"))
    print(f"objects tracked at the end: {got['python'][0]['objects']:,}")
    print(f"{'shutdown':<32} {'CPU s':>7} {'wall s':>7}   (median of {args.rounds})")
    med = {m: {k: statistics.median(r[k] for r in rows) for k in ("cpu", "wall")} for m, rows in got.items()}
    names = {"python": "Python's own", "freeze": "skip_final_collections"}
    for mode, m in med.items():
        print(f"{names[mode]:<32} {m['cpu']:7.2f} {m['wall']:7.2f}")
    print(f"ratio (Python's own / skip_final_collections): CPU {med['python']['cpu'] / med['freeze']['cpu']:.1f}x,"
          f" wall {med['python']['wall'] / med['freeze']['wall']:.1f}x")


if __name__ == "__main__":
    main()
