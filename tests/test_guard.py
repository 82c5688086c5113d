"""The training guard on the real training path: a non-finite step is skipped bitwise, a run of them or a loss
spike rolls the run back to the newest sound checkpoint with the data where it was, and the rolled-back run
equals a run resumed from that checkpoint with the stream told to skip the same batches."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides
from fault_injection import InfParameter, PoisonBatch, Snapshot, SpikeLoss
from mlflow.tracking import MlflowClient

from pipeline.guard import ContinueAt, GuardConfig, GuardError, GuardLedger, Rollback
from pipeline.guard.detector import Detector, Verdict
from pipeline.recipe import load_recipe
from pipeline.stages.train import fit, plan_run, train

GUARD = {"trainer.guard.window": 4, "trainer.guard.warmup_steps": 4, "trainer.guard.patience": 2,
         "trainer.guard.max_skips": 2, "trainer.log_every_n_steps": 2}


def _trace(path: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, path.read_text().splitlines())}


def _recipe(shards: Path, work: Path, **extra):
    return load_recipe("mae/tiny_fmnist", tiny_overrides(shards, work, **{
        "trainer.sample_trace": work / "trace.jsonl", **GUARD, **extra}))


# -- the detector, on its own -------------------------------------------------------------------------------
def test_detector_wants_patience_consecutive_spikes_after_warmup():
    d = Detector(GuardConfig(window=4, warmup_steps=4, patience=2, spike_factor=3.0))
    for step in range(1, 7):
        assert d.observe(step, 1.0, False) is None
    assert d.observe(7, 5.0, False) is None  # one spike is noise
    assert d.observe(8, 1.0, False) is None  # ...and the streak ends
    assert d.observe(9, 3.5, False) is None
    verdict = d.observe(10, 4.0, False)  # the second in a row: the verdict names the streak's steps
    assert verdict is not None and verdict.steps == (9, 10) and verdict.reason.startswith("loss spike")
    # early in the run (warm-up, or a history shorter than the window) nothing is a spike
    d3 = Detector(GuardConfig(window=4, warmup_steps=100, patience=1))
    assert all(d3.observe(s, 100.0 * s, False) is None for s in range(1, 50))


def test_detector_counts_skips_within_the_window_and_round_trips():
    d = Detector(GuardConfig(window=6, max_skips=2))
    assert d.observe(1, float("nan"), True) is None
    assert d.observe(2, float("nan"), True) is None
    for step in range(3, 7):
        assert d.observe(step, 1.0, False) is None
    assert d.observe(7, float("nan"), True) is None  # step 1 left the window: 2 skips in it (2, 7)
    again = Detector(GuardConfig(window=6, max_skips=2))
    again.load_state_dict(json.loads(json.dumps(d.state_dict())))  # what a checkpoint keeps
    assert again.observe(8, float("nan"), True) is None  # 7, 8 (step 2 left)
    verdict = again.observe(9, float("nan"), True)  # 7, 8, 9: three within the last 6 steps
    assert verdict is not None and verdict.steps == (7, 8, 9) and "non-finite" in verdict.reason


# -- skipping -----------------------------------------------------------------------------------------------
def test_a_non_finite_step_is_skipped_bitwise_and_the_run_goes_on(fmnist_shards, tmp_path):
    recipe = _recipe(fmnist_shards, tmp_path, **{"trainer.max_steps": 6})
    poison, snap = PoisonBatch(step=3), Snapshot(step=3)
    result = train(recipe, resume="none", extra_callbacks=[poison, snap])

    assert snap.before and snap.before.keys() == snap.after.keys()
    changed = [k for k in snap.before if not torch.equal(snap.before[k], snap.after[k])]
    assert changed == [], f"skipped step 3 changed {changed[:5]}"
    trace = _trace(tmp_path / "trace.jsonl")
    assert sorted(trace) == list(range(1, 7))  # the data position moved on: step 4 reads new samples
    assert trace[4]["keys"] != trace[3]["keys"]
    assert all(torch.isfinite(torch.tensor(trace[s]["loss"])) for s in (1, 2, 4, 5, 6))
    assert result.last_loss is not None and result.last_loss == result.last_loss
    assert result.global_step == 6  # max_steps counts the skipped step

    events = [json.loads(line) for line in (tmp_path / "ckpt" / "guard_events.jsonl").read_text().splitlines()]
    assert events == [{"event": "skipped", "step": 3, "keys": poison.keys}]
    assert "guard: 1 non-finite steps skipped (3)" in str(result.summary)
    run = MlflowClient(result.tracking_uri).get_run(result.run_id)
    assert run.data.metrics["guard/skipped_steps"] == 1.0 and run.data.metrics["guard/rollbacks"] == 0.0
    assert run.data.tags["vitpipe.guard"].startswith("guard: 1 non-finite steps skipped")


# -- rolling back ---------------------------------------------------------------------------------------------
def test_a_burst_of_non_finite_steps_rolls_back_and_equals_the_reference(fmnist_shards, tmp_path):
    """An inf weight at step 6 makes every step non-finite: after max_skips (2) of them, at step 8 (a logging
    step), the run goes back to step 3 (step 6's checkpoint holds the inf weight) with half the lr and reads
    on after step 8's batch."""
    steps = 12
    work = tmp_path / "faulted"
    recipe = _recipe(fmnist_shards, work, **{"trainer.max_steps": steps, "trainer.guard.lr_factor": 0.5,
                                             "checkpoint.every_n_steps": 3, "checkpoint.keep_last": 10})
    result = train(recipe, resume="none", extra_callbacks=[InfParameter(step=6)])
    assert result.global_step == steps and result.rollback is None
    lines = (work / "trace.jsonl").read_text().splitlines()
    first, redone = [json.loads(x) for x in lines[:8]], [json.loads(x) for x in lines[8:]]
    assert [r["step"] for r in first] == list(range(1, 9))
    assert [r["step"] for r in redone] == list(range(4, steps + 1))  # steps 4.. again, after the rollback
    assert "rollback: 3 non-finite steps within 4 at steps 6-8 -> back to step-00000003, lr x 0.5" in \
        str(result.summary)
    ckpt = work / "ckpt"
    assert (ckpt / "step-00000006.rolled-back").is_dir()  # the abandoned trajectory's checkpoint is set aside
    assert max(p.name for p in ckpt.glob("step-*") if p.name[-1].isdigit()) == f"step-{steps:08d}"

    # no sample read twice: the rolled-back steps read on after step 8's batch
    unfaulted = work.parent / "unfaulted"
    train(_recipe(fmnist_shards, unfaulted, **{"trainer.max_steps": 17}), resume="none")
    plain = _trace(unfaulted / "trace.jsonl")
    assert [r["keys"] for r in redone] == [plain[s]["keys"] for s in range(9, 18)]

    # the reference: resumed from a copy of step 3 with the stream at step 8's end, lr halved
    ref_work = tmp_path / "reference"
    shutil.copytree(ckpt / "step-00000003", ref_work / "ckpt" / "step-00000003")
    ref = _recipe(fmnist_shards, ref_work, **{"trainer.max_steps": steps})
    plan = plan_run(ref, str(ref_work / "ckpt" / "step-00000003"))
    position = torch.load(ckpt / "step-00000003" / "state.ckpt", weights_only=False)["ShardDataModule"]["stream"]
    position = {**position, "samples": 8 * 16, "batches": 8}
    rollback = Rollback(ckpt / "step-00000003", Verdict("test", (6,)), position, lr_factor=0.5, ledger=GuardLedger())
    from pipeline.objectives.registry import objective_of

    fit(ref, plan, objective_of(ref).build(ref, plan), [ContinueAt(rollback)])
    want = _trace(ref_work / "trace.jsonl")
    for got in redone:
        assert got["keys"] == want[got["step"]]["keys"]
        assert got["loss"] == pytest.approx(want[got["step"]]["loss"], rel=1e-6, abs=1e-7), got["step"]


def test_a_loss_spike_rolls_back_and_too_many_rollbacks_stop_the_run(fmnist_shards, tmp_path):
    # steps 9 and 10 spike (patience 2): judged at step 10, back to step 8 (the newest before step 9)
    recipe = _recipe(fmnist_shards, tmp_path / "a", **{"trainer.max_steps": 14})
    result = train(recipe, resume="none", extra_callbacks=[SpikeLoss(step=9, count=2)])
    assert "rollback: loss spike (above 3 x the median" in str(result.summary)
    assert "at steps 9-10 -> back to step-00000008" in str(result.summary)
    assert result.global_step == 14
    run = MlflowClient(result.tracking_uri).get_run(result.run_id)
    assert run.data.metrics["guard/rollbacks"] == 1.0

    # a spike that never ends: one rollback allowed, the second verdict stops the run naming what it saw
    recipe = _recipe(fmnist_shards, tmp_path / "b", **{"trainer.max_steps": 30, "trainer.guard.max_rollbacks": 1})
    with pytest.raises(GuardError, match=r"loss spike .* after 1 rollbacks \(max_rollbacks 1; loss spike") as err:
        train(recipe, resume="none", extra_callbacks=[SpikeLoss(step=9, count=1000)])
    trace = [json.loads(x) for x in (tmp_path / "b" / "trace.jsonl").read_text().splitlines()]
    last = {r["step"]: r["keys"] for r in trace}  # the second trajectory's records of steps 9 and 10
    assert "step-00000008" in str(err.value)
    assert f"the samples of steps [9, 10]: {', '.join((last[9] + last[10])[:16])}, ... (32 in all)" in str(err.value)


def test_a_rollback_across_an_epoch_boundary_reads_on_in_the_new_epoch(fmnist_shards, tmp_path):
    """2,000 images at 64 a step: epoch 1 starts at step 32. Steps 33-34 spike, and the run goes back to step 30,
    in epoch 0. It reads on after step 34's batch, in epoch 1, and through the next boundary (step 63): every
    redone step reads, in the same epoch, what an unfaulted run reads 4 steps later."""
    common = {"trainer.global_batch": 64, "checkpoint.every_n_steps": 10, "checkpoint.keep_last": 10}
    work = tmp_path / "faulted"
    result = train(_recipe(fmnist_shards, work, **{**common, "trainer.max_steps": 70}), resume="none",
                   extra_callbacks=[SpikeLoss(step=33, count=2)])
    assert "at steps 33-34 -> back to step-00000030" in str(result.summary) and result.global_step == 70
    records = [json.loads(x) for x in (work / "trace.jsonl").read_text().splitlines()]
    redone = records[34:]
    assert [r["step"] for r in redone] == list(range(31, 71))
    train(_recipe(fmnist_shards, tmp_path / "unfaulted", **{**common, "trainer.max_steps": 74}), resume="none")
    plain = _trace(tmp_path / "unfaulted" / "trace.jsonl")
    assert plain[31]["epoch"] == 0 and plain[32]["epoch"] == 1 and plain[63]["epoch"] == 2
    for r in redone:
        assert (r["epoch"], r["keys"]) == (plain[r["step"] + 4]["epoch"], plain[r["step"] + 4]["keys"]), r["step"]


# -- several processes ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ddp_zero2_and_zero3_agree_on_every_guard_event(fmnist_shards, tmp_path, child_env):
    """2 processes: rank 1's batch of step 3 is NaN (every rank skips step 3), steps 9-10 spike (every rank
    rolls back to step 8). DDP, ZeRO-2 and ZeRO-3 log the same events and train on the same samples; the
    pretraining monitors (every rank runs their forward passes, as ZeRO-3 needs) give the same curve."""
    from test_zero import strategy_overrides, torchrun, traces

    events, runs, monitors = {}, {}, {}
    for name, stage in (("ddp", None), ("zero2", 2), ("zero3", 3)):
        work = tmp_path / name
        overrides = strategy_overrides(fmnist_shards, work, stage, **GUARD, **{
            "trainer.max_steps": 12, "checkpoint.every_n_steps": 4, "monitor.every_n_steps": 6,
            "monitor.max_train": 100, "monitor.max_val": 50})
        proc = torchrun(overrides, child_env, "--poison-at", "3", "--poison-rank", "1", "--spike-at", "9",
                        "--spike-count", "2")
        assert proc.returncode == 0, proc.stderr[-4000:]
        events[name] = (work / "ckpt" / "guard_events.jsonl").read_text().splitlines()
        runs[name] = traces(work)
        client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
        run = client.search_runs([e.experiment_id for e in client.search_experiments()])[0]
        monitors[name] = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "monitor/rankme")]
    skipped, rollback = map(json.loads, events["ddp"])
    assert skipped["event"] == "skipped" and skipped["step"] == 3 and len(skipped["keys"]) == 8
    assert skipped["keys"] == runs["ddp"][1, 3]["keys"]  # the poisoned rank's samples, named
    assert rollback["event"] == "rollback" and rollback["steps"] == [9, 10] and len(rollback["keys"]) == 32
    assert rollback["checkpoint"].endswith("step-00000008")
    assert [step for step, _ in monitors["ddp"]] == [6, 12]
    for name in ("zero2", "zero3"):
        assert [s for s, _ in monitors[name]] == [6, 12]
        assert [v for _, v in monitors[name]] == pytest.approx([v for _, v in monitors["ddp"]], rel=1e-3), name
        assert [json.loads(e) | {"checkpoint": ""} for e in events[name]] == \
            [json.loads(e) | {"checkpoint": ""} for e in events["ddp"]], name
        for (rank, step), rec in runs["ddp"].items():  # the last record per (rank, step): the redone steps
            got = runs[name][rank, step]
            assert got["keys"] == rec["keys"], (name, rank, step)
            if step != 3:
                assert got["loss"] == pytest.approx(rec["loss"], rel=1e-4, abs=1e-6), (name, rank, step)


def test_zero_accumulating_micro_batches_judges_whole_steps(fmnist_shards, tmp_path, child_env):
    """ZeRO-2 in bf16 with 2 micro-batches per step on each of 2 processes: Lightning calls the guard's step
    hook for every micro-batch (DeepSpeed accumulates), and the guard judges the whole step at its last one. A
    NaN first micro-batch on rank 1 skips step 3 on both ranks, naming rank 1's samples of both micro-batches."""
    from test_zero import strategy_overrides, torchrun

    work = tmp_path / "accumulate"
    overrides = strategy_overrides(fmnist_shards, work, 2, **GUARD, **{
        "trainer.max_steps": 4, "trainer.micro_batch": 4, "trainer.precision": "bf16-mixed",
        "checkpoint.every_n_steps": 4})
    proc = torchrun(overrides, child_env, "--poison-at", "3", "--poison-rank", "1")
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in (work / "trace.rank1.jsonl").read_text().splitlines()]
    assert len(records) == 8 and all(len(r["keys"]) == 4 for r in records)  # 4 steps x 2 micro-batches of 4
    events = [json.loads(line) for line in (work / "ckpt" / "guard_events.jsonl").read_text().splitlines()]
    assert events == [{"event": "skipped", "step": 3, "keys": records[4]["keys"] + records[5]["keys"]}]
