"""`megarl train --config FILE [section.key=value ...]`, run on every rank under torchrun/srun.

Everything that can be checked without GPUs is checked before any process group exists: the
configuration, the model's Hugging Face config, the parallel layout against the world size,
and the data files.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from megarl.config import ConfigError, MegarlConfig, load_config, to_yaml


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None, help="YAML configuration file")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="overrides applied after the file")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the configuration, model and layout, print the plan, exit "
                             "(1 when the plan does not fit in GPU memory)")
    parser.add_argument("--model-shape", metavar="NAME", default=None,
                        help="with --dry-run: plan with this built-in shape (megarl plan "
                             "--list-models) instead of reading model.hf_dir")


def preflight(cfg: MegarlConfig, world_size: int) -> None:
    """Checks that need no process group; raise ConfigError naming the problem."""
    from megarl.models.hf import shape_from_hf_dir
    from megarl.parallel import check_topology

    shape, _ = shape_from_hf_dir(cfg.model.hf_dir)
    check_topology(cfg.parallel, world_size, shape, cfg.model.make_vocab_size_divisible_by)
    if cfg.trainer.replay_dir is None:
        if not cfg.data.train_files:
            raise ConfigError("data.train_files", "is empty: training needs a prompt dataset "
                              "(or trainer.replay_dir to replay recorded rollouts)")
        for i, path in enumerate(cfg.data.train_files):
            if not Path(path).is_file():
                raise ConfigError(f"data.train_files[{i}]", f"{path} does not exist")
    elif not Path(cfg.trainer.replay_dir).is_dir():
        raise ConfigError("trainer.replay_dir", f"{cfg.trainer.replay_dir} is not a directory")
    if cfg.rollout.mode == "colocated":
        _check_colocated(cfg, world_size)
    if cfg.model.megatron_dir is not None and not Path(cfg.model.megatron_dir).is_dir():
        raise ConfigError("model.megatron_dir", f"{cfg.model.megatron_dir} does not exist")


def _check_colocated(cfg: MegarlConfig, world_size: int) -> None:
    """Colocated servers are started by rank 0 on its own node, one GPU per trainer rank."""
    import os

    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if local != world_size:
        raise ConfigError("rollout.mode", f"colocated runs on one node, but the job has "
                          f"{world_size} ranks and {local} on this node; use disaggregated "
                          "across nodes")
    gpus = cfg.rollout.num_servers * cfg.rollout.server_tp
    if cfg.rollout.base_gpu_id != 0 or gpus > world_size:
        raise ConfigError("rollout.num_servers", f"colocated servers must sit on the trainer's "
                          f"GPUs 0..{world_size - 1}: {cfg.rollout.num_servers} servers x TP "
                          f"{cfg.rollout.server_tp} from GPU {cfg.rollout.base_gpu_id} do not")


def run(args: argparse.Namespace) -> int:
    from megarl.parallel import launch_env

    env = launch_env()
    logging.basicConfig(level=logging.INFO if env.rank == 0 else logging.WARNING,
                        format=f"[rank{env.rank}] %(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.model_shape and not args.dry_run:
        print("megarl train: --model-shape only goes with --dry-run", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, args.overrides)
        shape = None
        if args.model_shape:
            from megarl.parallel import check_topology
            from megarl.parallel.memory import builtin_shape

            shape = builtin_shape(args.model_shape)
            check_topology(cfg.parallel, env.world_size, shape,
                           cfg.model.make_vocab_size_divisible_by)
        else:
            preflight(cfg, env.world_size)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"megarl train: {exc}", file=sys.stderr)
        return 2
    if env.rank == 0:
        print(to_yaml(cfg), flush=True)
    if args.dry_run:
        from megarl.parallel.planner import print_plan

        options = {"shape": shape, "model": args.model_shape} if shape is not None else {}
        plan = print_plan(cfg, world_size=env.world_size, **options)
        return 0 if plan.fits else 1
    from megarl.trainer.checkpoint import CheckpointError
    from megarl.trainer.loop import train

    try:
        train(cfg)
    except CheckpointError as exc:
        print(f"megarl train: {exc}", file=sys.stderr)
        return 2
    return 0
