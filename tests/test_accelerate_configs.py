"""configs/accelerate: every file is a config accelerate's own classes and launcher accept, with the settings
peft's QLoRA recipes document; cpu2.yaml starts two gloo ranks on CPU (docs/SCALING.md)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import ComputeEnvironment, DistributedType
from accelerate.utils.launch import (
    _filter_args,
    prepare_deepspeed_cmd_env,
    prepare_multi_gpu_env,
    prepare_simple_launcher_cmd_env,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "accelerate"

# distributed_type, num_processes (all machines), num_machines, mixed_precision, use_cpu
EXPECTED = {
    "ddp.yaml": (DistributedType.MULTI_GPU, 8, 1, "bf16", False),
    "fsdp_qlora.yaml": (DistributedType.FSDP, 8, 1, "no", False),
    "deepspeed_zero3_qlora.yaml": (DistributedType.DEEPSPEED, 8, 1, "bf16", False),
    "multinode.yaml": (DistributedType.MULTI_GPU, 16, 2, "bf16", False),
    "cpu2.yaml": (DistributedType.MULTI_GPU, 2, 1, "no", True),
}

# peft examples/sft/configs/fsdp_config_qlora.yaml (docs/source/accelerate/fsdp.md, "Use PEFT QLoRA and FSDP")
PEFT_FSDP_QLORA = {
    "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
    "fsdp_backward_prefetch": "BACKWARD_PRE",
    "fsdp_cpu_ram_efficient_loading": True,
    "fsdp_forward_prefetch": False,
    "fsdp_offload_params": True,
    "fsdp_sharding_strategy": "FULL_SHARD",
    "fsdp_state_dict_type": "SHARDED_STATE_DICT",
    "fsdp_sync_module_states": True,
    "fsdp_use_orig_params": False,
}

# peft examples/sft/configs/deepspeed_config_z3_qlora.yaml (docs/source/accelerate/deepspeed.md)
PEFT_DEEPSPEED_Z3_QLORA = {
    "deepspeed_multinode_launcher": "standard",
    "offload_optimizer_device": "none",
    "offload_param_device": "none",
    "zero3_init_flag": True,
    "zero3_save_16bit_model": True,
    "zero_stage": 3,
}


def launch_args(config: str, *flags: str):
    """What `accelerate launch --config_file configs/accelerate/<config> <flags> -m mainlib.run` hands its
    launcher, after accelerate merged the file into the command line."""
    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", str(CONFIGS / config), *flags, "-m", "mainlib.run", "recipe.yaml"])
    args, defaults, _ = _validate_launch_command(args)
    return args, defaults


def test_the_configs_are_the_documented_set() -> None:
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)
    for path in CONFIGS.glob("*.yaml"):
        assert "Source" in path.read_text().split("\ncompute_environment:")[0], f"{path.name}: cite its source"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_loads_through_accelerates_config_classes(name: str) -> None:
    config = load_config_from_file(str(CONFIGS / name))  # raises on a key accelerate does not know
    assert isinstance(config, ClusterConfig)
    assert config == ClusterConfig.from_yaml_file(str(CONFIGS / name))
    assert config.compute_environment == ComputeEnvironment.LOCAL_MACHINE
    distributed_type, num_processes, num_machines, mixed_precision, use_cpu = EXPECTED[name]
    assert config.distributed_type == distributed_type
    assert config.num_processes == num_processes
    assert config.num_machines == num_machines
    assert config.num_processes % config.num_machines == 0  # the same number of processes on every machine
    assert config.mixed_precision == mixed_precision
    assert config.use_cpu is use_cpu
    args, _ = launch_args(name)  # and accelerate launch accepts it
    assert args.num_processes == num_processes and args.module


def test_fsdp_qlora_is_pefts_recipe_and_reaches_the_ranks() -> None:
    config = load_config_from_file(str(CONFIGS / "fsdp_qlora.yaml"))
    assert config.fsdp_config == {**PEFT_FSDP_QLORA, "fsdp_version": 1}
    args, _ = launch_args("fsdp_qlora.yaml", "--main_process_port", "0")
    assert args.use_fsdp and not args.multi_gpu
    env = prepare_multi_gpu_env(args)  # the environment every rank's FullyShardedDataParallelPlugin reads
    assert {k: v for k, v in env.items() if k.startswith(("FSDP_", "ACCELERATE_USE_FSDP", "ACCELERATE_MIXED"))} == {
        "ACCELERATE_USE_FSDP": "true",
        "ACCELERATE_MIXED_PRECISION": "no",
        "FSDP_VERSION": "1",
        "FSDP_SHARDING_STRATEGY": "FULL_SHARD",
        "FSDP_RESHARD_AFTER_FORWARD": "true",  # accelerate's default; FSDP1 reads FSDP_SHARDING_STRATEGY
        "FSDP_OFFLOAD_PARAMS": "true",
        "FSDP_MIN_NUM_PARAMS": "100000000",  # accelerate's default, used by SIZE_BASED_WRAP only
        "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
        "FSDP_BACKWARD_PREFETCH": "BACKWARD_PRE",
        "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT",
        "FSDP_FORWARD_PREFETCH": "false",
        "FSDP_USE_ORIG_PARAMS": "false",
        "FSDP_CPU_RAM_EFFICIENT_LOADING": "true",
        "FSDP_SYNC_MODULE_STATES": "true",
        "FSDP_ACTIVATION_CHECKPOINTING": "false",
        "FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD": "false",
    }
    assert args.nproc_per_node == "8"


def test_deepspeed_zero3_qlora_is_pefts_recipe_and_reaches_the_ranks() -> None:
    config = load_config_from_file(str(CONFIGS / "deepspeed_zero3_qlora.yaml"))
    assert config.deepspeed_config == PEFT_DEEPSPEED_Z3_QLORA
    args, defaults = launch_args("deepspeed_zero3_qlora.yaml", "--main_process_port", "0")
    assert args.use_deepspeed
    args.deepspeed_fields_from_accelerate_config = ",".join([*defaults.deepspeed_config, "mixed_precision"])
    cmd, env = prepare_deepspeed_cmd_env(args)
    assert cmd is None  # one node: accelerate's torchrun launcher, not the deepspeed CLI
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
    assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "3"
    assert env["ACCELERATE_DEEPSPEED_ZERO3_INIT"] == "true"
    assert env["ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL"] == "true"
    assert env["ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE"] == "none"
    assert env["ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE"] == "none"
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert "ACCELERATE_GRADIENT_ACCUMULATION_STEPS" not in env  # the Trainer's (the recipe's grad_accum)


def test_multinode_takes_its_node_from_the_slurm_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed.run as torchrun

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # torchrun's config_from_args would set it in this process
    flags = ["--machine_rank", "1", "--main_process_ip", "10.0.0.1", "--main_process_port", "29500"]
    args, _ = launch_args("multinode.yaml", *flags, "--num_machines", "2", "--num_processes", "16")
    assert args.multi_gpu
    prepare_multi_gpu_env(args)
    # what accelerate's multi_gpu_launcher hands torchrun on the second node
    script = ["--training_script", args.training_script, "--training_script_args", args.training_script_args]
    run_args = _filter_args(args, torchrun.get_args_parser(), script)
    config, _, _ = torchrun.config_from_args(run_args)
    assert (config.min_nodes, config.max_nodes, config.nproc_per_node) == (2, 2, 8)
    assert (config.rdzv_backend, config.rdzv_endpoint, config.rdzv_configs["rank"]) == ("static", "10.0.0.1:29500", 1)


def test_slurm_script_launches_multinode_per_node() -> None:
    script = (CONFIGS / "slurm.sbatch").read_text()
    subprocess.run(["bash", "-n", str(CONFIGS / "slurm.sbatch")], check=True)
    for needed in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "srun",
        "--config_file configs/accelerate/multinode.yaml",
        '--machine_rank "$SLURM_PROCID"',
        "--main_process_ip",
        "--main_process_port",
        '--num_machines "$SLURM_NNODES"',
        "-m mainlib.run",
        "examples/slurm/submit_multinode.sh",  # the source it follows
    ):
        assert needed in script, needed


RANK_SCRIPT = """
import os
import sys
import torch.distributed as dist
from accelerate import PartialState

state = PartialState(cpu=True)  # what Trainer does with TrainingArguments(use_cpu=True)
fields = [dist.get_rank(), dist.get_world_size(), dist.get_backend(), state.distributed_type.value]
# one write: print(a, b, ...) writes each piece on its own, and two processes share the pipe
sys.stdout.write("RANK " + " ".join(map(str, [*fields, os.environ.get("LOCAL_RANK")])) + "\\n")
sys.stdout.flush()
dist.barrier()
"""


def _launch(flags: list[str], script: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", *flags, str(script)]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _lines(process: subprocess.Popen) -> list[str]:
    out, _ = process.communicate(timeout=240)
    assert process.returncode == 0, out
    # found anywhere in a line: the two processes' stderr (merged in) may end a line without a newline
    return sorted(re.findall(r"RANK \d+ \d+ \w+ \w+ \d+", out))


def test_cpu2_starts_two_gloo_ranks(tmp_path: Path) -> None:
    script = tmp_path / "ranks.py"
    script.write_text(textwrap.dedent(RANK_SCRIPT))
    cpu2 = _launch(["--config_file", str(CONFIGS / "cpu2.yaml")], script)
    assert _lines(cpu2) == ["RANK 0 2 gloo MULTI_CPU 0", "RANK 1 2 gloo MULTI_CPU 1"]


def test_why_cpu2_is_not_the_cpu_flag() -> None:
    """`accelerate launch --cpu --num_processes 2` starts ONE process in accelerate 1.x: --cpu selects the
    "simple" launcher, which runs the command once unless an MPI hostfile is given (then mpirun)."""
    args = launch_command_parser().parse_args(["--cpu", "--num_processes", "2", "-m", "mainlib.run", "recipe.yaml"])
    args, _, _ = _validate_launch_command(args)
    assert args.cpu and not (args.multi_gpu or args.use_fsdp or args.use_deepspeed)  # -> simple_launcher
    command, _ = prepare_simple_launcher_cmd_env(args)
    assert command == [sys.executable, "-m", "mainlib.run", "recipe.yaml"]  # one process, no mpirun
    # cpu2.yaml goes to the torchrun launcher instead, with 2 processes on this machine
    args, _ = launch_args("cpu2.yaml")
    assert args.multi_gpu and not args.cpu
    prepare_multi_gpu_env(args)
    assert (args.nproc_per_node, args.use_cpu) == ("2", True)
