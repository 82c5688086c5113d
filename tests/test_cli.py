"""The CLI a new user meets: help that leads to the valid keys, errors that say whether a bad value came from
the recipe file or the command line, `vitpipe recipes show`, and `vitpipe ui`."""
from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request

import pytest
from conftest import PYTHON, REPO
from mlflow_server import free_port

from pipeline.cli import main


def run_cli(*args: str, env=None, cwd=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "pipeline.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=timeout)


def test_pretrain_help_says_how_overrides_work_and_where_the_keys_are(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    out = capsys.readouterr().out
    assert "--section.key VALUE" in out and "vitpipe recipes show RECIPE" in out


def test_evaluate_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for flag in ("--max-train", "--max-val", "--k", "--temperature", "--pool", "--crop-pct", "--workers",
                 "--image-size", "--protocol"):
        assert f"{flag} " in out
    for default in ("(default: 20)", "(default: 0.07)", "(default: cls)", "(default: 0.875)", "(default: all)"):
        assert default in out


def test_recipes_show_lists_sections_keys_types_defaults_and_docs(capsys):
    assert main(["recipes", "show", "mae/tiny_fmnist", "--trainer.max_steps", "7"]) == 0
    out = capsys.readouterr().out
    assert "[trainer]  Batch, length, hardware and strategy of a run." in out
    # type, this recipe's value (override applied) and the code's default, then what the key means
    assert "  max_steps: int | null = 7  (default null)" in out
    assert "Stops after this many optimizer steps" in out
    assert "[model.encoder]" in out and "  pos_embed: 'learned' | 'sincos2d' | 'rope2d' = sincos2d" in out
    assert "--section.key VALUE" in out


def test_recipes_show_names_an_unknown_recipe(capsys):
    assert main(["recipes", "show", "mae/nope"]) == 2
    assert "recipe 'mae/nope' is neither a file nor a built-in recipe" in capsys.readouterr().err


def test_a_bad_value_is_blamed_on_where_it_came_from(tmp_path, capsys):
    assert main(["pretrain", "--config", "mae/tiny_fmnist", "--trainer.max_steps", "abc"]) == 2
    err = capsys.readouterr().err
    assert "override --trainer.max_steps abc: trainer.max_steps: expected an integer, got 'abc'" in err
    assert "tiny_fmnist.yaml" not in err

    assert main(["pretrain", "--config", "mae/tiny_fmnist", "--trainer.max_step", "5"]) == 2
    assert "override --trainer.max_step 5: unknown key trainer.max_step; valid keys here:" in capsys.readouterr().err

    recipe = tmp_path / "r.yaml"
    recipe.write_text((REPO / "recipes" / "mae" / "tiny_fmnist.yaml").read_text().replace("max_steps: 400",
                                                                                          "max_steps: lots"))
    assert main(["pretrain", "--config", str(recipe), "--trainer.global_batch", "64"]) == 2
    err = capsys.readouterr().err
    assert f"{recipe}: trainer.max_steps: expected an integer, got 'lots'" in err and "override" not in err

    # a check across a section's keys names the file and the overrides that took part
    assert main(["pretrain", "--config", "mae/tiny_fmnist", "--model.encoder.image_size", "30"]) == 2
    err = capsys.readouterr().err
    assert "tiny_fmnist.yaml with --model.encoder.image_size 30: model.encoder:" in err
    assert "not a multiple of patch size 4" in err


def test_recipe_errors_come_before_the_training_stack_is_imported(child_env):
    # The check that used to take seconds: a bad override must fail before torch, Lightning, timm or MLflow
    # are imported (they are what made every error take 7 s to appear).
    code = ("import sys; from pipeline.cli import main; rc = main(['pretrain', '--config', 'mae/tiny_fmnist', "
            "'--trainer.max_steps', 'abc']); heavy = [m for m in ('torch', 'lightning', 'timm', 'mlflow', "
            "'deepspeed') if m in sys.modules]; print('RC', rc, 'HEAVY', heavy)")
    out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, env=child_env, timeout=120)
    assert "RC 2 HEAVY []" in out.stdout, out.stdout + out.stderr[-2000:]


def test_ui_refuses_a_store_that_does_not_exist_and_names_the_ones_nearby(tmp_path, child_env):
    demo_store = tmp_path / "vitpipe-demo" / "mlflow" / "mlflow.db"
    demo_store.parent.mkdir(parents=True)
    demo_store.write_bytes(b"")
    env = {k: v for k, v in child_env.items() if k != "MLFLOW_TRACKING_URI"}
    out = run_cli("ui", env=env, cwd=tmp_path)
    assert out.returncode == 2
    assert f"no MLflow store at {tmp_path / 'mlflow' / 'mlflow.db'}" in out.stderr
    assert f"--tracking-uri sqlite:///{demo_store}" in out.stderr
    assert not (tmp_path / "mlflow").exists()  # nothing created on the way


def test_ui_serves_a_workdir_store_on_loopback(tmp_path, child_env):
    from mlflow import MlflowClient

    work = tmp_path / "w"
    (work / "mlflow").mkdir(parents=True)
    MlflowClient(f"sqlite:///{work / 'mlflow' / 'mlflow.db'}").create_experiment("seen-in-ui")
    port = free_port()
    proc = subprocess.Popen([PYTHON, "-m", "pipeline.cli", "ui", "--workdir", str(work), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env,
                            cwd=tmp_path, start_new_session=True)
    try:
        deadline, body = time.monotonic() + 120, ""
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search",
                                             data=b'{"max_results": 10}', headers={"Content-Type": "application/json"})
                with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=2) as r:
                    body = r.read().decode()
                break
            except OSError:
                time.sleep(0.5)
        assert "seen-in-ui" in body, proc.stdout.read() if proc.poll() is not None else "no answer"
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        out = proc.communicate(timeout=60)[0]
    assert f"open http://127.0.0.1:{port} in a browser" in out


@pytest.mark.slow
def test_training_on_a_terminal_shows_step_loss_and_images_per_s(fmnist_shards, tmp_path, child_env):
    """On a terminal: the bar with step, loss and images/s, no run-id tail (v_num), none of the start-up
    chatter of Lightning or MLflow. (Output to a log file: test_pretrain.)"""
    import pty

    from conftest import tiny_overrides

    overrides = tiny_overrides(fmnist_shards, tmp_path, **{"trainer.log_every_n_steps": 2})
    args = [PYTHON, "-m", "pipeline.cli", "pretrain", "--config", "mae/tiny_fmnist", "--resume", "none",
            *(f"--{k}={v}" for k, v in overrides.items())]
    pid, fd = pty.fork()  # a pseudo-terminal, as a user's shell gives
    if pid == 0:
        import fcntl
        import struct
        import termios

        fcntl.ioctl(1, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # a window's rows, columns
        os.chdir(tmp_path)
        os.execve(PYTHON, args, child_env)
    chunks = []
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    _, status = os.waitpid(pid, 0)
    tty = b"".join(chunks).decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, tty[-3000:]
    assert "Epoch 0" in tty and "step=8" in tty and "loss=" in tty and "img/s=" in tty
    assert "v_num" not in tty
    for noise in ("srun", "litlogger", "LeafSpec", "weights_only", "GPU available", "Creating initial MLflow"):
        assert noise not in tty, noise


HEAVY = ("torch", "lightning", "deepspeed", "timm")


@pytest.mark.parametrize("argv", [
    ["submit", "--target", "slurm", "--config", "mae/vit_large16", "--nodes", "2", "--gpus-per-node", "8",
     "--dry-run"],
    ["submit", "--target", "k8s", "--config", "deit/deit_base16", "--nodes", "2", "--dry-run"],
    ["recipes"],
    ["recipes", "show", "finetune/vit_base16"],
    ["--help"],
], ids=["submit-slurm", "submit-k8s", "recipes", "recipes-show", "help"])
def test_rendering_and_listing_import_no_training_stack(argv, child_env):
    """`submit --dry-run`, `recipes` and `--help` only read configs: the training stack stays out of the process
    (it took seconds to import before a job file could be rendered)."""
    code = (f"import sys\nfrom pipeline.cli import main\ntry:\n    rc = main({argv!r})\nexcept SystemExit as e:\n"
            f"    rc = e.code\nprint('RC', rc, 'HEAVY', [m for m in {HEAVY!r} if m in sys.modules])")
    out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, env=child_env, timeout=120)
    assert "RC 0 HEAVY []" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
