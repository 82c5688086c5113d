"""The demo: shard Fashion-MNIST, then pretrain a tiny MAE on CPU with a local MLflow store."""
from __future__ import annotations

from pathlib import Path

from ..data.manifest import MANIFEST_NAME
from ..recipe import load_recipe
from .pretrain import PretrainResult, pretrain
from .shard import shard_fashion_mnist

DEMO_RECIPE = "mae/tiny_fmnist"


def demo(workdir: str = "vitpipe-demo", steps: int | None = None, overrides: dict[str, str] | None = None,
         resume: str | None = "auto") -> PretrainResult:
    work = Path(workdir).resolve()
    shards = work / "shards" / "fmnist"
    if not (shards / "train" / MANIFEST_NAME).exists() or not (shards / "val" / MANIFEST_NAME).exists():
        print(f"demo: sharding Fashion-MNIST into {shards}")
        shard_fashion_mnist(str(shards))
    settings = {
        "data.train": str(shards / "train"),
        "data.val": str(shards / "val"),
        "checkpoint.dir": str(work / "checkpoints"),
        "tracking.uri": f"sqlite:///{work / 'mlflow' / 'mlflow.db'}",
    }
    if steps is not None:
        settings["trainer.max_steps"] = str(steps)
    settings.update(overrides or {})
    (work / "mlflow").mkdir(parents=True, exist_ok=True)
    recipe = load_recipe(DEMO_RECIPE, settings)
    print(f"demo: pretraining recipe {DEMO_RECIPE} for {recipe.trainer.max_steps} steps on CPU")
    return pretrain(recipe, resume=resume)
