"""The fault table: each fault injected into a short real pretraining run (tiny MAE on Fashion-MNIST shards),
one row per fault: recovered, steps redone, samples skipped by design, samples lost, samples repeated.

Lost and repeated are counted against an unfaulted reference run's sample trace (``trainer.sample_trace``):
the run's final trajectory is, per rank and step, the last record in its trace; the samples it learnt from
are those of its steps that were not skipped; skipped by design are the samples of the steps the guard
skipped or rolled back. A sample of the reference's first P steps (P: the global batches the run consumed) is
lost when it is neither learnt from nor skipped by design; a sample learnt from twice is repeated.

    python benchmarks/faults.py                       # every row
    python benchmarks/faults.py --rows nan,damaged    # some rows

Rows: kill (one rank SIGKILLed under torchrun --max-restarts 1), damaged (the newest checkpoint truncated
after its commit), enospc (the disk full while a checkpoint is written: a small tmpfs where mounting is
allowed, else an injected ENOSPC), enospc-rank (ENOSPC on one rank alone, writing its shard of a 2-process
ZeRO-2 checkpoint), s3 (a proxy answering 503 SlowDown and resetting connections in front of
SeaweedFS), mlflow (the tracking server down when training ends), nan (a NaN batch on one rank), spike (a loss
spike). Each row's faulted run is a subprocess (tests/run_pretrain.py, which holds the test-only injectors).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
RUNNER = str(REPO / "tests" / "run_pretrain.py")
FMNIST = "/usr/share/datasets/fashion-mnist"
BATCH, EVERY = 16, 4
GUARD = {"trainer.guard.window": 4, "trainer.guard.warmup_steps": 4, "trainer.guard.patience": 2,
         "trainer.guard.max_skips": 2, "trainer.log_every_n_steps": 2}


@dataclass
class Row:
    fault: str
    recovered: bool
    redone: int = 0
    by_design: int = 0
    lost: int = 0
    repeated: int = 0
    how: str = ""


def overrides(shards: str, work: Path, **extra) -> dict[str, str]:
    from conftest import tiny_overrides

    return tiny_overrides(Path(shards), work, **{"checkpoint.every_n_steps": EVERY, "checkpoint.keep_last": 10,
                                                  "trainer.sample_trace": work / "trace.jsonl", **GUARD, **extra})


def run(o: dict, env: dict, *extra: str, nproc: int = 1, restarts: int = 0) -> subprocess.CompletedProcess:
    if nproc == 1:
        cmd = [sys.executable, RUNNER, json.dumps(o), *extra]
    else:
        from mlflow_server import free_port

        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--max-restarts",
               str(restarts), "--master-addr", "127.0.0.1", "--master-port", str(free_port()), RUNNER,
               json.dumps(o), *extra]
    from conftest import run_process_tree

    return run_process_tree(cmd, env, timeout=900)  # a hung rank is killed with the run


# -- accounting ---------------------------------------------------------------------------------------------
def trajectories(work: Path) -> tuple[dict[int, dict], list[dict]]:
    """(final trajectory: step -> {"keys"} over all ranks, superseded records) from the run's trace files."""
    final: dict[tuple[int, int], dict] = {}
    superseded: list[dict] = []
    for path in sorted(work.glob("trace*.jsonl")):
        for rec in map(json.loads, path.read_text().splitlines()):
            key = (rec["rank"], rec["step"])
            if key in final:
                superseded.append(final[key])
            final[key] = rec
    steps: dict[int, dict] = {}
    for (_, step), rec in sorted(final.items()):
        steps.setdefault(step, {"keys": []})["keys"] += rec["keys"]
    return steps, superseded


def account(row: Row, work: Path, reference: dict[int, list[str]]) -> Row:
    steps, superseded = trajectories(work)
    events = [json.loads(x) for x in (work / "ckpt" / "guard_events.jsonl").read_text().splitlines()] \
        if (work / "ckpt" / "guard_events.jsonl").is_file() else []
    skipped = {e["step"] for e in events if e["event"] == "skipped"}
    rolled = [e for e in events if e["event"] == "rollback"]
    learnt = [k for s, rec in steps.items() if s not in skipped for k in rec["keys"]]
    design = {k for s in skipped if s in steps for k in steps[s]["keys"]}
    # a rollback abandons the steps after its checkpoint: their batches are skipped by design, not replayed
    abandoned = {k for rec in superseded for k in rec["keys"]} if rolled else set()
    design |= abandoned - set(learnt)
    rolled_steps = len({rec["step"] for rec in superseded}) if rolled else 0
    consumed = len(steps) + rolled_steps
    want = {k for s in range(1, consumed + 1) for k in reference[s]}
    counts = Counter(learnt)
    row.redone = len({rec["step"] for rec in superseded})
    row.by_design = len(design)
    row.lost = len(want - set(learnt) - design)
    row.repeated = sum(c - 1 for c in counts.values()) + len(set(learnt) & design)
    return row


def reference_trace(shards: str, root: Path, env: dict, steps: int) -> dict[int, list[str]]:
    work = root / "reference"
    out = run(overrides(shards, work, **{"trainer.max_steps": steps}), env)
    if out.returncode:
        raise SystemExit(f"the reference run failed:\n{out.stderr[-3000:]}")
    return {s: rec["keys"] for s, rec in trajectories(work)[0].items()}


# -- rows ---------------------------------------------------------------------------------------------------
def row_nan(shards, root, env, ref) -> Row:
    work = root / "nan"
    out = run(overrides(shards, work, **{"trainer.max_steps": 12}), env, "--poison-at", "5")
    return account(Row("NaN batch at step 5 (guard skips the step)", out.returncode == 0, how="skipped step 5"),
                   work, ref)


def row_spike(shards, root, env, ref) -> Row:
    work = root / "spike"
    out = run(overrides(shards, work, **{"trainer.max_steps": 12}), env, "--spike-at", "9", "--spike-count", "2")
    ok = out.returncode == 0 and "back to step-00000008" in out.stdout + out.stderr
    return account(Row("loss spike at steps 9-10 (guard rolls back)", ok, how="rollback to step 8 in-process"),
                   work, ref)


def row_kill(shards, root, env, ref) -> Row:
    work = root / "kill"
    o = overrides(shards, work, **{"trainer.max_steps": 12, "trainer.strategy": "ddp", "data.num_workers": 1})
    out = run(o, env, "--sigkill-at", "6", "--sigkill-rank", "1", nproc=2, restarts=1)
    ok = out.returncode == 0 and "resuming from" in out.stderr
    return account(Row("rank 1 SIGKILLed at step 6 (torchrun --max-restarts 1)", ok,
                       how="the restarted group resumed from step 4"), work, ref)


def row_damaged(shards, root, env, ref) -> Row:
    work = root / "damaged"
    o = overrides(shards, work, **{"trainer.max_steps": 16})
    first = run(o, env, "--kill-in-checkpoint-at", "12")
    state = work / "ckpt" / "step-00000008" / "state.ckpt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # damaged after its commit
    second = run(o, env)
    ok = first.returncode == -9 and second.returncode == 0 and "is damaged" in second.stderr
    return account(Row("newest checkpoint (step 8) truncated after its commit", ok,
                       how="named the file, resumed from step 4"), work, ref)


def row_enospc(shards, root, env, ref) -> Row:
    work = root / "enospc"
    disk = work / "ckpt"
    disk.mkdir(parents=True)
    size = sum(f.stat().st_size for f in (root / "reference" / "ckpt" / "step-00000004").rglob("*") if f.is_file())
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(size * 1.5) + 65536}", "tmpfs", str(disk)],
                             capture_output=True).returncode == 0
    o = overrides(shards, work, **{"trainer.max_steps": 12})
    try:
        first = run(o, env, *(() if mounted else ("--no-space-at", "8")))
        partial = any(disk.glob(".step-*.partial"))
        if mounted:  # space freed: the same folder, larger
            subprocess.run(["mount", "-o", f"remount,size={64 << 20}", str(disk)], check=True)
        second = run(o, env)
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], capture_output=True)
    ok = (first.returncode == 1 and "checkpoint of step 8: writing" in first.stderr and not partial
          and second.returncode == 0)
    how = "tmpfs full at step 8" if mounted else "injected ENOSPC at step 8 (no mount here)"
    return account(Row("no space left writing checkpoint 8: the run stops, no partial kept", ok,
                       how=f"{how}; rerun resumed from step 4"), work, ref)


def row_enospc_rank(shards, root, env, ref) -> Row:
    work = root / "enospc-rank"
    o = overrides(shards, work, **{"trainer.max_steps": 12, "trainer.strategy": "deepspeed", "zero.stage": 2,
                                   "data.num_workers": 1})
    first = run(o, env, "--no-space-at", "8", "--no-space-rank", "1", nproc=2)
    ckpt = work / "ckpt"
    kept = any(ckpt.glob(".step-*.partial")) or (ckpt / "step-00000008").exists()
    second = run(o, env, nproc=2)
    ok = (first.returncode != 0 and first.stderr.count("checkpoint of step 8: writing") == 2 and not kept
          and second.returncode == 0 and "resuming from" in second.stderr)
    return account(Row("no space on rank 1 alone for its ZeRO-2 shard of checkpoint 8", ok,
                       how="both ranks stopped at once, nothing committed; rerun resumed from step 4"), work, ref)


def row_s3(shards, root, env, ref) -> Row:
    from s3_fault_proxy import FaultProxy
    from s3_server import SeaweedS3

    from pipeline.data.sharding import write_split
    from pipeline.data.sources import FashionMNISTSource

    store = SeaweedS3(root / "seaweedfs")
    (root / "seaweedfs").mkdir(parents=True)
    store.start()
    try:
        s3env = {**env, **store.env("admin")}
        os.environ.update(store.env("admin"))
        for split, n in (("train", 2000), ("val", 500)):
            source = FashionMNISTSource(FMNIST, split, limit=n)
            write_split(source, source.items(), f"s3://vitpipe-faults/fmnist/{split}", split, shard_size=300,
                        workers=2, log=lambda _: None)
        work = root / "s3"
        o = overrides(shards, work, **{"trainer.max_steps": 12, "data.num_workers": 2,
                                       "data.train": "s3://vitpipe-faults/fmnist/train",
                                       "data.val": "s3://vitpipe-faults/fmnist/val"})
        with FaultProxy(store.endpoint) as proxy:
            out = run(o, {**s3env, "AWS_ENDPOINT_URL": proxy.endpoint})
        how = f"{proxy.slowdowns} of {proxy.requests} requests 503 SlowDown, {proxy.resets} reset"
        if out.returncode:
            print(out.stderr[-3000:], file=sys.stderr)
        return account(Row("object store: 503 SlowDown and connection resets", out.returncode == 0 and
                           proxy.slowdowns > 0, how=how), work, ref)
    finally:
        store.stop()


def row_mlflow(shards, root, env, ref) -> Row:
    from mlflow import MlflowClient
    from mlflow_server import MlflowServer

    server = MlflowServer(root / "mlflow-server").start()
    try:
        work = root / "mlflow"
        o = overrides(shards, work, **{"trainer.max_steps": 8, "tracking.uri": server.uri,
                                       "tracking.failure_cooldown_s": 1.0})
        out = run(o, env, "--stop-server-at-end", f"{server._proc.pid}:{server.port}")
        server.stop()
        kept = work / "ckpt" / "mlflow_final_status.json"
        was_kept = kept.is_file() and "its final status FINISHED is kept in" in out.stdout + out.stderr
        run_id = json.loads(kept.read_text())["run_id"] if kept.is_file() else ""
        server.start()
        register = subprocess.run([sys.executable, "-m", "pipeline.cli", "register", "--checkpoint",
                                   str(work / "ckpt"), "--name", "faults-mlflow", "--tracking-uri", server.uri],
                                  env=env, capture_output=True, text=True, timeout=600)
        status = MlflowClient(server.uri).get_run(run_id).info.status if run_id else "?"
        ok = out.returncode == 0 and was_kept and register.returncode == 0 and status == "FINISHED"
        return account(Row("MLflow server down when training ends", ok,
                           how=f"status kept in the run folder; `vitpipe register` wrote it: {status}"), work, ref)
    finally:
        server.stop()


ROWS = {"kill": row_kill, "damaged": row_damaged, "enospc": row_enospc, "enospc-rank": row_enospc_rank, "s3": row_s3,
        "mlflow": row_mlflow, "nan": row_nan, "spike": row_spike}


def shards_in(root: Path) -> str:
    from pipeline.data.sharding import write_split
    from pipeline.data.sources import FashionMNISTSource

    out = root / "shards"
    for split, n in (("train", 2000), ("val", 500)):
        source = FashionMNISTSource(FMNIST, split, limit=n)
        write_split(source, source.items(), str(out / split), split, shard_size=300, workers=2, log=lambda _: None)
    return str(out)


def table(rows: list[Row]) -> str:
    lines = ["| fault | recovered | steps redone | samples skipped by design | samples lost | samples repeated | how |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.fault} | {'yes' if r.recovered else 'NO'} | {r.redone} | {r.by_design} | {r.lost} | "
                     f"{r.repeated} | {r.how} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    parser.add_argument("--work", help="folder for the runs (default: a temporary one, removed)")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    names = [n for n in args.rows.split(",") if n]
    unknown = sorted(set(names) - set(ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}; rows: {', '.join(ROWS)}")
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        root = Path(tmp)
        shards = shards_in(root)
        ref = reference_trace(shards, root, env, steps=16)  # the most global batches a row consumes
        rows = []
        for name in names:
            start = time.perf_counter()
            rows.append(ROWS[name](shards, root, env, ref))
            print(f"{name}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ for r in rows], indent=1))
    bad = [r.fault for r in rows if not r.recovered or r.lost or r.repeated]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
