"""The launch profiles of recipes/accelerate/ as accelerate reads them, `tunebook plan --profile`, the loader's
settings under a sharded launch, FSDP checkpoints, and the SkyPilot task that starts a launch on each machine."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import RECIPES, ROOT
from runner.errors import TunebookError
from runner.recipe import load_recipe
from runner.recipe.plan import plan
from runner.recipe.profile import check_launch, read_profile
from runner.train.checkpoints import is_complete_checkpoint
from train_support import tiny_base

PROFILES = sorted((RECIPES / "accelerate").glob("*.yaml"))


def tunebook(*args):
    return subprocess.run([sys.executable, "-m", "runner.cli", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.stem)
def test_every_profile_is_read_by_accelerate_and_fits_the_shipped_recipes(path):
    profile = read_profile(path)
    assert profile.num_processes >= 1 and profile.num_processes % profile.num_machines == 0
    for recipe in ("quickstart.yaml", "vetai-llama-3.1-8b.yaml"):
        problems, _ = check_launch(load_recipe(RECIPES / recipe), profile)
        assert problems == [], [p.render() for p in problems]


def test_the_sharding_profiles_shard():
    assert {p.stem: read_profile(p).sharding for p in PROFILES} == {
        "cpu-2proc": None, "single-gpu": None, "multi-gpu": None, "deepspeed-zero2": None,
        "deepspeed-zero3": "zero3", "fsdp": "fsdp", "fsdp-multinode": "fsdp"}


def test_plan_with_the_multi_machine_profile_counts_every_process():
    res = tunebook("plan", RECIPES / "vetai-llama-3.1-8b.yaml", "--profile", RECIPES / "accelerate/fsdp-multinode.yaml")
    assert res.returncode == 0, res.stderr
    flat = " ".join(res.stdout.split())
    assert "2 machines x 8 processes = 16 ranks" in flat
    assert "│ effective batch │ 128 │ 128 │" in flat  # 1 x 8 x 16 ranks
    assert "4-bit base: its quantized weights are stored in the compute dtype" in flat
    assert plan(load_recipe(RECIPES / "vetai-llama-3.1-8b.yaml"), ranks=16)[0].effective_batch == 128


@pytest.mark.parametrize("profile, overrides, message", [
    ("fsdp.yaml", ["model.load_in_4bit=false", "model.load_in_8bit=true"], "8-bit weights cannot be sharded by FSDP"),
    ("deepspeed-zero3.yaml", ["model.load_in_4bit=false", "model.load_in_8bit=true"],
     "8-bit weights cannot be sharded by DeepSpeed ZeRO-3"),
    ("multi-gpu.yaml", ["backend=axolotl"], "backend axolotl runs its own training process"),
])
def test_plan_refuses_a_recipe_the_launch_cannot_run(profile, overrides, message):
    sets = [arg for o in overrides for arg in ("--set", o)]
    res = tunebook("plan", RECIPES / "vetai-llama-3.1-8b.yaml", "--profile", RECIPES / "accelerate" / profile, *sets)
    assert res.returncode == 2
    assert message in " ".join(res.stderr.split()) and "fix:" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("change, says", [
    (("num_processes: 2", "num_processes: -2"), "num_processes: expected a whole number of at least 1, got -2"),
    (("num_processes: 2", "num_processes: abc"), "num_processes: expected a whole number of at least 1, got 'abc'"),
    (("num_machines: 1", "num_machines: 4"), "2 processes do not divide evenly over 4 machines"),
    (("machine_rank: 0", "machine_rank: 7"), "machine_rank: machine rank 7 on 1 machine"),
    (("mixed_precision: bf16", "mixed_precision: bogus"), "unknown mixed precision 'bogus'"),
    (("fsdp_version: 2", "fsdp_version: 7"), "fsdp_config.fsdp_version: FSDP version 7"),
])
def test_a_profile_value_a_launch_cannot_use_is_named(tmp_path, change, says):
    text = (RECIPES / "accelerate/fsdp.yaml").read_text()
    assert change[0] in text
    bad = tmp_path / "mine.yaml"
    bad.write_text(text.replace(*change))
    with pytest.raises(TunebookError, match="invalid launch profile") as caught:
        read_profile(bad)
    assert says in str(caught.value) and "fix:" in str(caught.value)


def test_a_misspelled_profile_key_is_named_with_its_line(tmp_path):
    text = (RECIPES / "accelerate/fsdp.yaml").read_text().replace("fsdp_state_dict_type:", "fsdp_state_dict_typ:")
    bad = tmp_path / "mine.yaml"
    bad.write_text(text)
    line = next(i for i, row in enumerate(text.splitlines(), 1) if "fsdp_state_dict_typ:" in row)
    res = tunebook("plan", RECIPES / "quickstart.yaml", "--profile", bad)
    assert res.returncode == 2
    assert f"{bad}:{line}:3: fsdp_config.fsdp_state_dict_typ: not an option of `accelerate launch`" in res.stderr
    bad.write_text(text.replace("num_machines:", "num_machine:"))
    res = tunebook("plan", RECIPES / "quickstart.yaml", "--profile", bad)
    assert res.returncode == 2 and "unknown keys (['num_machine'])" in res.stderr


def test_the_loader_stores_4bit_weights_in_the_compute_dtype_when_the_launch_shards(tmp_path, monkeypatch):
    """FSDP shards floating-point parameters only: with uint8 storage accelerate leaves every 4-bit weight whole
    on every process (its fsdp2_prepare_model)."""
    from runner.model.load import check_quantization, load_base

    recipe = load_recipe(RECIPES / "quickstart.yaml", [f"model.base={tiny_base(tmp_path)}", "model.load_in_4bit=true",
                                                       "lora.trainable_tokens=[]", "model.chat_template=llama-3"])

    def storage_dtypes():
        model = load_base(recipe.model.base, recipe.model, torch.float32)
        return {p.dtype for p in model.parameters() if type(p).__name__ == "Params4bit"}

    assert storage_dtypes() == {torch.uint8}
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert storage_dtypes() == {torch.float32}
    eight = recipe.model.model_copy(update={"load_in_4bit": False, "load_in_8bit": True})
    with pytest.raises(TunebookError, match="8-bit weights cannot be sharded by FSDP"):
        check_quantization(eight)


def test_fsdp_checkpoints_count_as_complete(tmp_path):
    import torch
    from safetensors.torch import save_file

    layouts = {
        "plain": ["adapter_model.safetensors", "optimizer.pt", "scheduler.pt"],
        "fsdp-full": ["adapter_model.safetensors", "pytorch_model_fsdp.bin", "optimizer.bin", "scheduler.pt"],
        "fsdp-sharded": ["pytorch_model_fsdp_0/__0_0.distcp", "optimizer_0/__0_0.distcp", "scheduler.pt"],
        "no-optimizer": ["pytorch_model_fsdp_0/__0_0.distcp"],
    }
    for name, files in layouts.items():
        for f in files + ["trainer_state.json"]:
            path = tmp_path / name / f
            path.parent.mkdir(parents=True, exist_ok=True)
            if f.endswith(".safetensors"):
                save_file({"w": torch.zeros(2)}, path)
            elif f.endswith(".pt"):
                torch.save({}, path)
            else:
                path.write_text("{}")
    assert {n: is_complete_checkpoint(tmp_path / n) for n in layouts} == {
        "plain": True, "fsdp-full": True, "fsdp-sharded": True, "no-optimizer": False}
    (tmp_path / "fsdp-sharded/trainer_state.json").unlink()  # written last: without it, a save was cut short
    assert not is_complete_checkpoint(tmp_path / "fsdp-sharded")


def test_the_skypilot_task_launches_the_profile_on_every_machine(tmp_path):
    """The task's `run` script, executed as SkyPilot runs it on machine 1 of 2 (8 GPUs each), with a stand-in
    `accelerate` that records its arguments; accelerate's own parser then merges them with the profile."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    task = yaml.safe_load((RECIPES / "cluster/skypilot-fsdp.yaml").read_text())
    machines, gpus = task["num_nodes"], int(task["resources"]["accelerators"].split(":")[1])
    stub = tmp_path / ".venv/bin/accelerate"
    stub.parent.mkdir(parents=True)
    stub.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    stub.chmod(0o755)
    env = {**os.environ, **{k: str(v) for k, v in task["envs"].items()}, "SKYPILOT_NUM_NODES": str(machines),
           "SKYPILOT_NUM_GPUS_PER_NODE": str(gpus), "SKYPILOT_NODE_RANK": "1",
           "SKYPILOT_NODE_IPS": "10.1.2.3\n10.1.2.4\n"}
    ran = subprocess.run(["bash", "-c", task["run"]], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=60)
    assert ran.returncode == 0, ran.stderr
    argv = json.loads(ran.stdout)
    assert argv[0] == "launch"

    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(argv[1:]))
    profile = read_profile(ROOT / task["envs"]["PROFILE"])
    assert profile.distributed_type == "FSDP" and args.use_fsdp and str(args.fsdp_version) == "2"
    assert (args.num_machines, args.num_processes) == (profile.num_machines, profile.num_processes) == (
        machines, machines * gpus)
    assert (args.machine_rank, args.main_process_ip, args.main_process_port) == (1, "10.1.2.3", 29500)
    assert args.fsdp_state_dict_type == profile.fsdp["fsdp_state_dict_type"]
    assert args.module and args.training_script == "runner.cli"
    assert args.training_script_args == ["train", task["envs"]["RECIPE"], "--set", "output_dir=/runs"]
    problems, _ = check_launch(load_recipe(ROOT / task["envs"]["RECIPE"]), profile)
    assert problems == []
    assert shlex.split(task["setup"])[-2:] == ["make", "setup"]
