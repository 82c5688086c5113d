"""Recipes: every built-in one parses and builds (shrunk), the big ones keep the paper's settings, config
errors name the key, overrides parse, batch arithmetic and world size, and the CLI's exit code on a typo."""
from __future__ import annotations

import os

import pytest
import torch

from pipeline.cli import main
from pipeline.config import ConfigError
from pipeline.distributed import derive_batch, launcher_layout, world_size
from pipeline.recipe import load_recipe, parse_overrides
from pipeline.resources import list_recipes
from pipeline.tasks import MAEPretrainTask, Schedule

RECIPES = list_recipes()
MAE_RECIPES = [r for r in RECIPES if r.startswith("mae/")]
FINETUNE_RECIPES = [r for r in RECIPES if r.startswith("finetune/")]
DEIT_RECIPES = [r for r in RECIPES if r.startswith("deit/")]
CLASSIFY_RECIPES = [r for r in RECIPES if r.startswith("classify/")]
BIG = {"mae/vit_base16": ("base", 16), "mae/vit_large16": ("large", 16), "mae/vit_huge14": ("huge", 14)}
# The MAE repository's fine-tuning commands: (base lr, layer decay, drop path, epochs).
BIG_FINETUNE = {"finetune/vit_base16": (5e-4, 0.65, 0.1, 100), "finetune/vit_large16": (1e-3, 0.75, 0.2, 50),
                "finetune/vit_huge14": (1e-3, 0.75, 0.3, 50)}

MINI_RECIPE = """\
model:
  encoder: {size: tiny, depth: 1, embed_dim: 32, num_heads: 4, image_size: [16, 16], patch_size: 8}
  decoder: {depth: 1, dim: 16, num_heads: 2}
trainer: {global_batch: 8, max_steps: 3}
"""


def shrink(patch_size: int) -> dict[str, str]:
    """Overrides that make any recipe's model tiny; the image side is a multiple of the recipe's patch."""
    side = 32 if 32 % patch_size == 0 else 2 * patch_size
    return {
        "model.encoder.size": "tiny", "model.encoder.depth": "2", "model.encoder.embed_dim": "64",
        "model.encoder.num_heads": "4", "model.encoder.image_size": f"[{side}, {side}]",
        "model.encoder.patch_size": str(patch_size),
        "model.decoder.depth": "1", "model.decoder.dim": "32", "model.decoder.num_heads": "4",
    }


def test_builtin_recipes_are_listed():
    assert {"mae/tiny_fmnist", *BIG} <= set(RECIPES)


def test_recipe_families_are_all_covered():
    assert set(RECIPES) == set(MAE_RECIPES) | set(FINETUNE_RECIPES) | set(DEIT_RECIPES) | set(CLASSIFY_RECIPES)
    assert set(BIG_FINETUNE) <= set(FINETUNE_RECIPES) and "finetune/tiny_fmnist" in FINETUNE_RECIPES


# size, patch, drop path, layer scale (DeiT-S/B as in DeiT; L/H with DeiT III's layer scale and drop path)
DEIT_BIG = {"deit/deit_small16": ("small", 16, 0.1, None), "deit/deit_base16": ("base", 16, 0.1, None),
            "deit/vit_large16": ("large", 16, 0.4, 1e-4), "deit/vit_huge14": ("huge", 14, 0.5, 1e-4)}


@pytest.mark.parametrize("name", DEIT_RECIPES)
def test_deit_recipes_parse_and_their_students_build_tiny(name):
    from pipeline.tasks.deit import DeiTTask

    r = load_recipe(name)
    assert r.task == "deit" and r.model.encoder.distill_token and r.model.num_classes > 1
    assert tuple(r.data.transform.image_size) == tuple(r.model.encoder.image_size)
    assert r.model.label_smoothing == 0.1 and r.optim.weight_decay == 0.05
    patch = r.model.encoder.patch_size
    tiny = load_recipe(name, {k: v for k, v in shrink(patch).items() if not k.startswith("model.decoder")})
    task = DeiTTask(tiny.model, tiny.optim, Schedule(10, 2, tiny.trainer.global_batch))
    cls, dist = task.model.both_logits(torch.randn(2, 3, *tiny.model.encoder.image_size))
    assert cls.shape == dist.shape == (2, r.model.num_classes)


@pytest.mark.parametrize("name", sorted(DEIT_BIG))
def test_big_deit_recipes_keep_the_papers_settings(name):
    r = load_recipe(name)
    e, t = r.model.encoder, r.data.transform
    assert (e.size, e.patch_size, e.drop_path, e.layer_scale) == DEIT_BIG[name]
    assert (e.image_size, e.pos_embed, r.model.distill.kind, r.model.distill.alpha) == ((224, 224), "learned",
                                                                                        "hard", 0.5)
    # lr 5e-4 x batch / 512, AdamW (0.9, 0.999), 5 warm-up epochs; DeiT's 300 epochs = 100 x 3 repeats
    assert (r.optim.base_lr, r.optim.betas, r.optim.warmup_epochs, r.trainer.global_batch) == (
        2.5e-4, (0.9, 0.999), 5.0, 1024)
    assert (r.data.repeats, r.trainer.max_epochs, t.crop_scale, t.rand_augment, t.random_erase) == (
        3, 100, (0.08, 1.0), "rand-m9-mstd0.5-inc1", 0.25)
    assert (r.model.mixup.mixup_alpha, r.model.mixup.cutmix_alpha) == (0.8, 1.0)
    assert r.model.teacher.model.startswith("models:/")


@pytest.mark.parametrize("name", CLASSIFY_RECIPES)
def test_classify_recipes_build_a_timm_model_offline(name):
    from pipeline.exports.timm_classifier import build_timm

    r = load_recipe(name)
    assert r.task == "classify" and r.register.name
    model = build_timm(r.model.arch, r.model.num_classes, r.model.in_chans).eval()
    assert model(torch.zeros(1, r.model.in_chans, *r.model.image_size)).shape == (1, r.model.num_classes)


@pytest.mark.parametrize("name", FINETUNE_RECIPES)
def test_finetune_recipes_parse_and_keep_the_papers_settings(name):
    r = load_recipe(name)
    assert r.task == "finetune" and r.model.init.startswith("models:/")
    assert tuple(r.data.transform.image_size) == r.model.image_size
    assert r.register.name and r.model.pool == "avg" and r.model.label_smoothing == 0.1
    if name in BIG_FINETUNE:
        assert (r.optim.base_lr, r.optim.layer_decay, r.model.drop_path, r.trainer.max_epochs) == BIG_FINETUNE[name]
        assert (r.data.transform.rand_augment, r.data.transform.random_erase) == ("rand-m9-mstd0.5-inc1", 0.25)
        assert r.trainer.global_batch == 1024 and r.optim.betas == (0.9, 0.999) and r.optim.weight_decay == 0.05
        assert (r.model.mixup.mixup_alpha, r.model.mixup.cutmix_alpha) == (0.8, 1.0)


@pytest.mark.parametrize("name", MAE_RECIPES)
def test_every_recipe_parses_and_builds_tiny(name):
    full = load_recipe(name)
    assert full.name == name.split("/")[-1]
    patch = full.model.encoder.patch_size
    recipe = load_recipe(name, shrink(patch))
    enc = recipe.model.encoder
    assert (enc.embed_dim, enc.depth, enc.num_heads, enc.patch_size) == (64, 2, 4, patch)
    assert tuple(recipe.data.transform.image_size) == enc.image_size  # the transform follows the model
    # Everything but the model is the recipe's own.
    assert recipe.optim == full.optim and recipe.trainer == full.trainer
    assert recipe.data.train == full.data.train

    torch.manual_seed(0)
    task = MAEPretrainTask(recipe.model, recipe.optim, Schedule(10, 2, recipe.trainer.global_batch))
    imgs = torch.randn(2, enc.in_chans, *enc.image_size)
    loss, pred, mask = task.model(imgs)
    L = enc.grid[0] * enc.grid[1]
    assert torch.isfinite(loss)
    assert pred.shape == (2, L, patch * patch * enc.in_chans) and mask.shape == (2, L)
    assert mask.sum(1).tolist() == [L - round((1 - recipe.model.mask_ratio) * L)] * 2


@pytest.mark.parametrize("name", sorted(BIG))
def test_big_recipes_keep_the_papers_settings(name):
    r = load_recipe(name)
    size, patch = BIG[name]
    assert (r.model.encoder.size, r.model.encoder.patch_size) == (size, patch)
    assert r.model.encoder.image_size == (224, 224)
    assert r.trainer.global_batch == 4096
    assert r.optim.base_lr == 1.5e-4
    assert r.optim.warmup_epochs == 40
    assert r.optim.warmup_steps is None  # epochs, not a fixed step count
    assert r.optim.weight_decay == 0.05 and r.optim.betas == (0.9, 0.95)
    assert r.model.mask_ratio == 0.75
    assert r.model.norm_pix_loss is True
    assert r.model.encoder_mask_tokens is False
    assert (r.model.decoder.depth, r.model.decoder.dim) == (8, 512)
    # The global batch splits exactly over the recipe's devices within its micro batch.
    t = r.trainer
    plan = derive_batch(t.global_batch, t.devices * t.num_nodes, t.micro_batch)
    assert plan.per_device * plan.world_size * plan.accumulate == 4096
    assert plan.per_device <= t.micro_batch


# -- errors that name the key -----------------------------------------------------------------------------

@pytest.mark.parametrize("key,value", [
    ("model.encoder.sise", "3"),
    ("trainer.globl_batch", "8"),
    ("optim.lr", "0.1"),
    ("model.decoder.width", "64"),
])
def test_unknown_override_key_names_it(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_recipe("mae/tiny_fmnist", {key: value})


def test_unknown_key_in_recipe_file_names_it(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text(MINI_RECIPE.replace("patch_size: 8", "patch_size: 8, sise: 3"))
    with pytest.raises(ConfigError, match=r"model\.encoder\.sise"):
        load_recipe(str(path))
    path.write_text(MINI_RECIPE + "tracker: {uri: x}\n")
    with pytest.raises(ConfigError, match="tracker"):
        load_recipe(str(path))


@pytest.mark.parametrize("key,value", [
    ("trainer.global_batch", "abc"),
    ("trainer.global_batch", "4096.0"),  # a float for an int
    ("trainer.global_batch", "true"),  # a bool is no int
    ("trainer.micro_batch", "1.5"),  # int | None
    ("optim.base_lr", "fast"),
    ("model.norm_pix_loss", "maybe"),
    ("model.encoder.image_size", "[32, 32, 32]"),
    ("model.encoder.image_size", "[32, x]"),
    ("optim.betas", "0.9"),
])
def test_wrong_type_names_the_key(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_recipe("mae/tiny_fmnist", {key: value})


@pytest.mark.parametrize("key,value", [
    ("model.encoder.pos_embed", "absolute"),
    ("trainer.precision", "fp64"),
    ("trainer.strategy", "fsdp"),
    ("task", "simclr"),
])
def test_invalid_literal_names_the_key(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        load_recipe("mae/tiny_fmnist", {key: value})
    assert value in str(err.value)


def test_validation_errors_name_the_section():
    with pytest.raises(ConfigError, match=r"model\.encoder"):
        load_recipe("mae/tiny_fmnist", {"model.encoder.patch_size": "5"})  # 32 is no multiple of 5
    with pytest.raises(ConfigError, match="model"):
        load_recipe("mae/tiny_fmnist", {"model.mask_ratio": "1.0"})


def test_int_value_is_accepted_where_a_float_is_expected():
    r = load_recipe("mae/tiny_fmnist", {"optim.base_lr": "1", "optim.warmup_epochs": "5"})
    assert r.optim.base_lr == 1.0 and isinstance(r.optim.base_lr, float)


def test_recipe_file_path_works_like_a_builtin_name(tmp_path):
    path = tmp_path / "mini.yaml"
    path.write_text(MINI_RECIPE)
    r = load_recipe(str(path), {"trainer.global_batch": "16"})
    assert r.name == "mini"
    assert r.trainer.global_batch == 16 and r.trainer.max_steps == 3
    assert r.model.encoder.image_size == (16, 16) and r.data.transform.image_size == (16, 16)
    # A copy of a built-in recipe loaded by path equals the built-in one loaded by name.
    from pipeline.resources import find_recipe
    copy = tmp_path / "tiny_fmnist.yaml"
    copy.write_text(find_recipe("mae/tiny_fmnist").read_text())
    assert load_recipe(str(copy)) == load_recipe("mae/tiny_fmnist")
    assert load_recipe("mae/tiny_fmnist.yaml") == load_recipe("mae/tiny_fmnist")


def test_missing_recipe_lists_the_builtin_ones():
    with pytest.raises(FileNotFoundError) as err:
        load_recipe("mae/vit_gigantic")
    msg = str(err.value)
    assert "mae/vit_gigantic" in msg
    for name in RECIPES:
        assert name in msg


# -- overrides ---------------------------------------------------------------------------------------------

def test_parse_overrides_forms():
    assert parse_overrides(["--a.b", "1"]) == {"a.b": "1"}
    assert parse_overrides(["--a.b=1"]) == {"a.b": "1"}
    assert parse_overrides(["--a.b=x=y", "--c.d", "[1, 2]", "--e", "-3"]) == {"a.b": "x=y", "c.d": "[1, 2]",
                                                                             "e": "-3"}
    assert parse_overrides([]) == {}
    with pytest.raises(ConfigError, match=r"a\.b"):
        parse_overrides(["--a.b"])
    with pytest.raises(ConfigError, match=r"c\.d"):
        parse_overrides(["--a.b", "1", "--c.d"])
    with pytest.raises(ConfigError):
        parse_overrides(["a.b", "1"])


def test_parsed_overrides_apply_as_yaml():
    args = ["--trainer.max_steps=12", "--model.encoder.image_size", "[16, 16]",
            "--trainer.micro_batch", "null"]
    r = load_recipe("mae/tiny_fmnist", parse_overrides(args))
    assert r.trainer.max_steps == 12 and r.model.encoder.image_size == (16, 16)
    assert r.trainer.micro_batch is None


# -- batch arithmetic and world size ------------------------------------------------------------------------

def test_derive_batch_examples():
    p = derive_batch(4096, 64, 32)
    assert (p.per_device, p.accumulate, p.world_size, p.global_batch) == (32, 2, 64, 4096)
    p = derive_batch(4096, 1, 128)
    assert (p.per_device, p.accumulate) == (128, 32)
    p = derive_batch(4096, 8)  # no cap: the whole share in one step
    assert (p.per_device, p.accumulate) == (512, 1)


@pytest.mark.parametrize("world", [1, 2, 4, 8, 16, 32, 64])
@pytest.mark.parametrize("micro", [None, 16, 32, 64, 128, 100])
def test_derive_batch_keeps_the_global_batch(world, micro):
    p = derive_batch(4096, world, micro)
    assert p.per_device * world * p.accumulate == 4096
    if micro:
        assert p.per_device <= micro


@pytest.mark.parametrize("global_batch,world", [(4096, 3), (100, 8), (10, 4)])
def test_derive_batch_rejects_non_divisible(global_batch, world):
    with pytest.raises(ValueError, match="divisible"):
        derive_batch(global_batch, world)


def test_world_size_from_env():
    # torchrun: WORLD_SIZE over LOCAL_WORLD_SIZE processes per node
    assert world_size(8, 4, env={"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}) == 16
    assert world_size(8, 4, env={"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8", "SLURM_NTASKS": "64",
                                 "SLURM_STEP_ID": "0"}) == 16
    assert world_size(8, 4, env={"SLURM_NTASKS": "64", "SLURM_NNODES": "8", "SLURM_STEP_ID": "0"}) == 64
    # SLURM_NTASKS alone is the allocation (sbatch), not a launched step: fall back to the recipe.
    assert world_size(8, 4, env={"SLURM_NTASKS": "64"}) == 32
    # Lightning's own launcher gives its children WORLD_SIZE alone: the recipe's layout stands.
    assert world_size(8, 4, env={"WORLD_SIZE": "32", "LOCAL_RANK": "3"}) == 32
    assert world_size(8, 4, env={}) == 32
    assert world_size(1, 1, env={}) == 1


@pytest.mark.parametrize("env, layout", [
    ({}, None),
    ({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}, (2, 2, "torchrun")),
    ({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1", "RANK": "1"}, (1, 2, "torchrun")),
    ({"SLURM_NTASKS": "8", "SLURM_NNODES": "2", "SLURM_STEP_ID": "0"}, (4, 2, "slurm")),
    ({"SLURM_NTASKS": "4", "SLURM_STEP_ID": "0"}, (4, 1, "slurm")),
    # Kubeflow PyTorchJob without torchrun: one process per pod
    ({"WORLD_SIZE": "3", "RANK": "0", "MASTER_ADDR": "job-master-0"}, (1, 3, "kubeflow")),
])
def test_launcher_layout(env, layout):
    found = launcher_layout(env)
    assert (found if found is None else (found.devices, found.num_nodes, found.launcher)) == layout


@pytest.mark.parametrize("env, problem", [
    ({"WORLD_SIZE": "3", "LOCAL_WORLD_SIZE": "2"}, "not a multiple"),
    ({"SLURM_NTASKS": "5", "SLURM_NNODES": "2", "SLURM_STEP_ID": "0"}, "--ntasks-per-node"),
    ({"WORLD_SIZE": "two", "LOCAL_WORLD_SIZE": "1"}, "WORLD_SIZE='two'"),
])
def test_launcher_layout_errors_name_the_variable(env, problem):
    with pytest.raises(ValueError, match=problem):
        launcher_layout(env)


def test_slurm_master_address_is_the_first_nodes_nodeaddr(tmp_path, monkeypatch):
    """Parsing only (a stand-in scontrol prints a real line); the Slurm cluster tests run the real one."""
    from pipeline.distributed.environment import SlurmNodeAddrEnvironment

    scontrol = tmp_path / "scontrol"
    scontrol.write_text("#!/bin/sh\necho 'NodeName=$4 Arch=x86_64 CoresPerSocket=1 NodeAddr=127.0.0.1 "
                        "NodeHostName=n1 Port=6818 State=IDLE'\n")
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    for key, value in {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "2",
                       "SLURM_NODELIST": "n[1-2]", "SLURM_JOB_NAME": "vitpipe",
                       "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert SlurmNodeAddrEnvironment(auto_requeue=False).main_address == "127.0.0.1"
    assert os.environ["MASTER_ADDR"] == "127.0.0.1"


def test_large_recipes_train_under_deepspeed():
    big = [f"{kind}/{size}" for kind in ("mae", "finetune") for size in ("vit_base16", "vit_large16", "vit_huge14")]
    for name in [*big, "deit/deit_base16", "deit/vit_large16", "deit/vit_huge14"]:
        recipe = load_recipe(name)
        assert recipe.trainer.strategy == "deepspeed" and recipe.zero.stage in (2, 3), name


def test_world_size_reads_os_environ_by_default(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "6")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    assert world_size(1, 1) == 6
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    assert world_size(2, 3) == 6


# -- CLI ---------------------------------------------------------------------------------------------------

def test_cli_pretrain_with_unknown_key_exits_2(capsys):
    code = main(["pretrain", "--config", "mae/tiny_fmnist", "--model.encoder.sise", "3"])
    assert code == 2
    err = capsys.readouterr().err
    assert "model.encoder.sise" in err and "error" in err


def test_cli_pretrain_with_missing_recipe_exits_2(capsys):
    assert main(["pretrain", "--config", "mae/nope"]) == 2
    err = capsys.readouterr().err
    assert "mae/nope" in err and "mae/tiny_fmnist" in err


def test_cli_lists_recipes(capsys):
    assert main(["recipes"]) == 0
    assert capsys.readouterr().out.split() == RECIPES


def test_square_image_size_may_be_one_number():
    recipe = load_recipe("mae/tiny_fmnist", {"model.encoder.image_size": "28", "model.encoder.patch_size": "7"})
    assert recipe.model.encoder.image_size == (28, 28)
    assert tuple(recipe.data.transform.image_size) == (28, 28)


def test_a_number_in_e_notation_without_a_dot_is_a_number():
    """YAML 1.1 reads 4e-3 as a string; a float field takes it as the number it is, and still refuses words."""
    assert load_recipe("mae/tiny_fmnist", {"optim.base_lr": "4e-3"}).optim.base_lr == 0.004
    assert load_recipe("mae/tiny_fmnist", {"optim.weight_decay": "5E-2"}).optim.weight_decay == 0.05
    with pytest.raises(ConfigError, match="expected a number"):
        load_recipe("mae/tiny_fmnist", {"optim.base_lr": "4e-3x"})
