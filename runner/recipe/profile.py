"""An accelerate launch profile (recipes/accelerate/*.yaml) beside a recipe: how many processes on how many
machines, how the model is spread over them, and what in the recipe does not fit that launch. `tunebook plan
--profile` checks it before any machine is started; the same rules refuse a launch that would fail later.

The profile is read by accelerate's own config loader (an unknown top-level key fails as it would at launch);
keys inside `fsdp_config` and `deepspeed_config` are checked against `accelerate launch`'s options, which
accelerate itself would ignore silently.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import Loc, Problem, RecipeError, TunebookError
from .schema import ModelConfig, Recipe
from .source import read_yaml

# A launch that splits the model's parameters across processes (not only gradients or optimizer state).
SHARDED = {"FSDP": "fsdp"}


@dataclass
class LaunchProfile:
    path: Path
    distributed_type: str            # NO | MULTI_GPU | MULTI_CPU | FSDP | DEEPSPEED
    num_machines: int
    num_processes: int               # over all machines
    mixed_precision: str
    fsdp: dict = field(default_factory=dict)
    deepspeed: dict = field(default_factory=dict)
    locs: dict = field(default_factory=dict)

    @property
    def sharding(self) -> str | None:
        """'fsdp' or 'zero3' when every process holds only a shard of the parameters."""
        if self.distributed_type == "DEEPSPEED" and int(self.deepspeed.get("zero_stage", 0)) == 3:
            return "zero3"
        return SHARDED.get(self.distributed_type)

    def describe(self) -> str:
        kind = {"NO": "one process", "MULTI_GPU": "data parallel (DDP)", "MULTI_CPU": "data parallel on CPUs",
                "FSDP": f"FSDP{self.fsdp.get('fsdp_version', 1)}, parameters sharded",
                "DEEPSPEED": f"DeepSpeed ZeRO-{self.deepspeed.get('zero_stage', '?')}"}.get(self.distributed_type,
                                                                                      self.distributed_type)
        ranks = f"{self.num_processes} rank{'s' if self.num_processes != 1 else ''}"
        if self.num_machines > 1:
            ranks = f"{self.num_machines} machines x {self.num_processes // self.num_machines} processes = {ranks}"
        return f"{self.path.name}: {kind}; {ranks}; mixed precision {self.mixed_precision}"

    def loc(self, *keys: str) -> Loc:
        return self.locs.get(tuple(keys)) or Loc(str(self.path))


class LaunchError(TunebookError):
    """A profile that cannot be read, or a recipe that does not fit it (every problem listed)."""

    def __init__(self, problems: list[Problem], head: str = "launch does not fit"):
        self.problems = problems
        super().__init__(f"{head}:\n" + "\n".join("  " + p.render().replace("\n", "\n  ") for p in problems))


def _launch_options() -> set[str]:
    from accelerate.commands.launch import launch_command_parser

    return {action.dest for action in launch_command_parser()._actions}


MIXED_PRECISION = ("no", "fp16", "bf16", "fp8")


def _bad_values(data: dict, locs: dict, path: Path) -> list[Problem]:
    """Values accelerate's loader takes as they are but a launch cannot use (or would describe falsely)."""
    problems = []

    def bad(keys: tuple, message: str, fix: str) -> None:
        problems.append(Problem(locs.get(keys, Loc(str(path))), ".".join(keys), message, fix))

    def whole(keys: tuple, value, low: int) -> int | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            bad(keys, f"expected a whole number of at least {low}, got {value!r}", f"e.g. {keys[-1]}: {max(low, 1)}")
            return None
        return value

    machines = whole(("num_machines",), data.get("num_machines"), 1)
    processes = whole(("num_processes",), data.get("num_processes"), 1)
    rank = whole(("machine_rank",), data.get("machine_rank"), 0)
    if machines and processes and processes % machines:
        bad(("num_processes",), f"{processes} processes do not divide evenly over {machines} machines",
            "num_processes counts every machine's processes together: a multiple of num_machines")
    if machines and rank is not None and rank >= machines:
        bad(("machine_rank",), f"machine rank {rank} on {machines} machine{'s' if machines != 1 else ''}",
            f"number the machines 0 to {machines - 1}")
    if "mixed_precision" in data and str(data["mixed_precision"]) not in MIXED_PRECISION:
        bad(("mixed_precision",), f"unknown mixed precision {data['mixed_precision']!r}",
            f"one of {', '.join(MIXED_PRECISION)}")
    for section in ("fsdp_config", "deepspeed_config"):
        if not isinstance(data.get(section) or {}, dict):
            bad((section,), f"expected a mapping of options, got {data[section]!r}",
                "compare with the profiles in recipes/accelerate/")
    fsdp = data.get("fsdp_config") if isinstance(data.get("fsdp_config"), dict) else {}
    if "fsdp_version" in fsdp and fsdp["fsdp_version"] not in (1, 2):
        bad(("fsdp_config", "fsdp_version"), f"FSDP version {fsdp['fsdp_version']!r}", "1 or 2")
    deepspeed = data.get("deepspeed_config") if isinstance(data.get("deepspeed_config"), dict) else {}
    if "zero_stage" in deepspeed and deepspeed["zero_stage"] not in (0, 1, 2, 3):
        bad(("deepspeed_config", "zero_stage"), f"ZeRO stage {deepspeed['zero_stage']!r}", "0, 1, 2 or 3")
    config_file = deepspeed.get("deepspeed_config_file")
    if isinstance(config_file, str) and config_file.lower() != "none" and not any(
            (where / config_file).expanduser().is_file() for where in (Path.cwd(), path.parent)):
        bad(("deepspeed_config", "deepspeed_config_file"), f"DeepSpeed config file not found: {config_file}",
            "check the path (a relative one is read from the folder you launch in)")
    return problems


def read_profile(path: Path) -> LaunchProfile:
    """The profile as accelerate reads it; a clear error naming the file, line and key otherwise."""
    path = Path(path)
    try:
        data, locs = read_yaml(path)
    except RecipeError as exc:
        raise LaunchError(exc.problems, head="invalid launch profile") from None
    from accelerate.commands.config.config_args import load_config_from_file

    try:
        load_config_from_file(str(path))
    except (ValueError, TypeError) as exc:
        raise LaunchError([Problem(Loc(str(path)), "", str(exc).split(", please try")[0],
                                   "compare with the profiles in recipes/accelerate/ (`accelerate launch --help` "
                                   "lists every option)")], head="invalid launch profile") from None
    options = _launch_options()
    problems = _bad_values(data, locs, path)
    for section, prefix in (("fsdp_config", "fsdp_"), ("deepspeed_config", "")):
        if not isinstance(data.get(section) or {}, dict):
            continue  # said by _bad_values
        for key in data.get(section) or {}:
            name = key if key.startswith(prefix) else prefix + key
            if name not in options:
                problems.append(Problem(locs.get((section, key), Loc(str(path))), f"{section}.{key}",
                                        "not an option of `accelerate launch` (accelerate would ignore it)",
                                        "remove it or fix its spelling (`accelerate launch --help`)"))
    if problems:
        raise LaunchError(problems, head="invalid launch profile")
    machines = int(data.get("num_machines") or 1)
    return LaunchProfile(path=path, distributed_type=str(data.get("distributed_type", "NO")), num_machines=machines,
                         num_processes=int(data.get("num_processes") or 1),
                         mixed_precision=str(data.get("mixed_precision", "no")),
                         fsdp=dict(data.get("fsdp_config") or {}), deepspeed=dict(data.get("deepspeed_config") or {}),
                         locs=locs)


def sharding_problem(model: ModelConfig, sharding: str | None) -> Problem | None:
    """8-bit bases cannot be sharded (bitsandbytes' int8 weights are not floating point); 4-bit ones can, stored
    in the compute dtype (runner/model/load.py sets bnb_4bit_quant_storage)."""
    if sharding and model.load_in_8bit:
        what = "FSDP" if sharding == "fsdp" else "DeepSpeed ZeRO-3"
        return Problem(None, "model.load_in_8bit", f"8-bit weights cannot be sharded by {what}",
                       "set model.load_in_4bit: true instead (QLoRA shards), or launch with a data-parallel profile "
                       "(recipes/accelerate/multi-gpu.yaml)")
    return None


def check_launch(recipe: Recipe, profile: LaunchProfile) -> tuple[list[Problem], list[str]]:
    """(problems that would make the launch fail, notes on what the launch does with this recipe)."""
    problems, notes = [], []
    ranks = profile.num_processes
    if profile.num_machines > 1 and ranks % profile.num_machines:
        problems.append(Problem(profile.loc("num_processes"), "num_processes",
                                f"{ranks} processes cannot be split evenly over {profile.num_machines} machines",
                                "num_processes counts every process on every machine: machines x GPUs per machine"))
    if ranks > 1 and recipe.backend != "hf":
        problems.append(Problem(None, "backend", f"backend {recipe.backend} runs its own training process and "
                                "cannot run under a launch of several processes",
                                "use backend: hf with this profile, or run `tunebook train` without accelerate launch"))
    problem = sharding_problem(recipe.model, profile.sharding)
    if problem:
        problems.append(problem)
    if profile.distributed_type == "FSDP" and profile.fsdp.get("fsdp_activation_checkpointing") and \
            any(s.train.gradient_checkpointing for s in recipe.stages):
        problems.append(Problem(profile.loc("fsdp_config", "fsdp_activation_checkpointing"),
                                "fsdp_config.fsdp_activation_checkpointing",
                                "the recipe's train.gradient_checkpointing and FSDP's activation checkpointing are both "
                                "on (the trainer refuses both)", "turn one of them off"))
    if profile.distributed_type == "DEEPSPEED" and profile.sharding == "zero3" and \
            not profile.deepspeed.get("zero3_save_16bit_model"):
        problems.append(Problem(profile.loc("deepspeed_config"), "deepspeed_config.zero3_save_16bit_model",
                                "ZeRO-3 without zero3_save_16bit_model cannot gather the adapter to save it",
                                "set zero3_save_16bit_model: true"))
    if recipe.model.load_in_4bit and profile.sharding:
        notes.append("4-bit base: its quantized weights are stored in the compute dtype (bnb_4bit_quant_storage) "
                     "so they shard like every other parameter")
    if profile.sharding:
        notes.append("adapters and the best adapter are gathered from every process and written by the main process; "
                     "checkpoints are written as the profile's fsdp_state_dict_type says and resume with it")
    if ranks > 1 and any(s.train.packing for s in recipe.stages):
        notes.append(f"packed stages: every process packs the same rows (same data, same seed) and trains its "
                     f"share; each optimizer step takes micro_batch_size x gradient_accumulation_steps x {ranks} rows")
    if profile.num_machines > 1:
        notes.append("several machines: give each its --machine_rank and the first machine's --main_process_ip "
                     "(README, Launching); output_dir must be one folder every machine sees, the cache need not be")
    if profile.distributed_type == "DEEPSPEED":
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            notes.append("deepspeed is not installed here: `pip install deepspeed` on the GPU machines")
    return problems, notes
