"""Build a Composer Trainer from a validated recipe and its run plan."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
from composer import Trainer
from composer.algorithms import EMA, GradientClipping, LowPrecisionLayerNorm
from composer.callbacks import LRMonitor, SpeedMonitor
from composer.core import Algorithm, Callback
from composer.loggers import LoggerDestination
from composer.optim import ConstantScheduler, ConstantWithWarmupScheduler, CosineAnnealingWithWarmupScheduler
from composer.utils import dist, reproducibility

from micro_diffusion.cost.callback import CostCallback
from micro_diffusion.cost.estimate import flops_per_sample
from micro_diffusion.data.loader import build_dataloader
from micro_diffusion.data.schema import ENCODERS_FILE
from micro_diffusion.diffusion.edm import sigma_grid
from micro_diffusion.diffusion.sampling import SamplingSettings
from micro_diffusion.encoders import load_text_encoder, load_vae
from micro_diffusion.exported import is_export, load_weights
from micro_diffusion.families import family_of
from micro_diffusion.models.ffn import ExpertChoiceMoE
from micro_diffusion.recipe import RecipeError, build_network, latent_size, resolve_streams
from micro_diffusion.recipe_checks import parse_time
from micro_diffusion.training.callbacks import BadSamples, JSONLLogger, NaNGuard, Preemption, StepSeed
from micro_diffusion.training.checkpointing import checkpoint_blocks
from micro_diffusion.training.distill import DistillModel, TangentWarmup, teacher_state
from micro_diffusion.training.model import DiffusionModel
from micro_diffusion.training.monitor import SampleGrid, ValidationLoss
from micro_diffusion.training.run import RunPlan, null_caption
from micro_diffusion.training.trackers import build_trackers, flatten
from micro_diffusion.utils.devices import torch_device
from micro_diffusion.utils.run_folder import metrics_file, samples_dir
from micro_diffusion.utils.sizes import as_hw


def build_model(cfg: dict, plan: RunPlan) -> DiffusionModel:
    """The ComposerModel: network plus the stage's masking and EDM noise settings, or the distillation of a teacher."""
    d = cfg["diffusion"]
    from_export = plan.init_checkpoint is not None and is_export(plan.init_checkpoint)
    if from_export:
        check_export_fits(cfg, plan.init_checkpoint)
    if cfg["distill"] is None:
        net = build_network(cfg)
        if from_export:
            net.load_state_dict(load_weights(plan.init_checkpoint)[0])  # EMA weights when the export has them
        return DiffusionModel(net, mask_ratio=d["mask_ratio"], p_mean=d["p_mean"], p_std=d["p_std"],
                              sigma_data=d["sigma_data"], family=cfg["model"]["family"])
    dis, state = cfg["distill"], teacher_state(plan.init_checkpoint, cfg["distill"]["teacher_weights"])
    student, teacher = build_network(cfg), build_network(cfg)
    for net in (student, teacher):
        net.load_state_dict(state)  # strict: a teacher of another shape is an error naming the tensors
    null = null_caption(cfg, _shard_dir(cfg))
    return DistillModel(student, teacher, null, d["sigma_data"], d["p_mean"], d["p_std"], dis["guidance"],
                        dis["sigma_max"], dis["tangent_warmup"])


def check_export_fits(cfg: dict, model_dir: str) -> None:
    """An export a stage starts from has the recipe's network (any latent size) and null-caption convention."""
    _, config = load_weights(model_dir, use_ema=False)  # reads and checks the network format
    with torch.device("meta"):
        want = json.loads(json.dumps(build_network(cfg).cfg.to_dict()))  # as config.json holds it: tuples as lists
    theirs, ours = family_of(config).name, cfg["model"]["family"]
    if theirs != ours:
        raise RecipeError(f"init_checkpoint {model_dir} holds a {theirs} model, the recipe's model.family is {ours}")
    diff = {k: (v, want[k]) for k, v in config["network"].items() if k != "latent_size" and want.get(k) != v}
    if diff:
        raise RecipeError(f"init_checkpoint {model_dir}: its network differs from the recipe's "
                          f"(export, recipe): {diff}")
    theirs, ours = config.get("null_caption", "shards"), cfg["data"]["null_caption"]
    if theirs != ours:
        raise RecipeError(f"init_checkpoint {model_dir} was trained with null captions {theirs!r}, the recipe's "
                          f"data.null_caption is {ours!r}: set data.null_caption={theirs}")


def moe_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters of every ExpertChoiceMoE (experts and router), selected by module type."""
    return [p for m in module.modules() if isinstance(m, ExpertChoiceMoE) for p in m.parameters()]


def build_optimizer(model: torch.nn.Module, opt: dict, device: str = "cpu") -> torch.optim.AdamW:
    """AdamW with two groups: dense parameters at lr, MoE parameters at lr x moe_lr_scale.

    The update is the same everywhere; on GPUs the fused kernel does it for all parameters at once, elsewhere the
    multi-tensor (foreach) path replaces a Python loop over parameters.
    """
    moe = moe_parameters(model)
    moe_ids = {id(p) for p in moe}
    dense = [p for p in model.parameters() if id(p) not in moe_ids]
    groups = [{"params": dense, "lr": opt["lr"], "name": "dense"}]
    if moe:
        groups.append({"params": moe, "lr": opt["lr"] * opt["moe_lr_scale"], "name": "moe"})
    fast = {"fused": True} if device == "gpu" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=opt["lr"], betas=tuple(opt["betas"]), eps=opt["eps"],
                             weight_decay=opt["weight_decay"], **fast)


# One builder per name of the recipe registries (recipe.SCHEDULERS, recipe.ALGORITHMS); validate() has already
# rejected any other name with an error naming it.
SCHEDULER_BUILDERS: dict[str, Callable[[dict], Any]] = {
    "cosine_warmup": lambda s: CosineAnnealingWithWarmupScheduler(t_warmup=s["warmup"], alpha_f=s["alpha_f"]),
    "constant_warmup": lambda s: ConstantWithWarmupScheduler(t_warmup=s["warmup"]),
    "constant": lambda s: ConstantScheduler(),
}
ALGORITHM_BUILDERS: dict[str, Callable[[dict], Algorithm]] = {
    "gradient_clipping": lambda o: GradientClipping(clipping_type=o["type"], clipping_threshold=o["threshold"]),
    "ema": lambda o: EMA(half_life=None, smoothing=o["smoothing"], ema_start=str(o["start"]), update_interval="1ba"),
    "low_precision_layernorm": lambda o: LowPrecisionLayerNorm(),
}


def build_scheduler(sched: dict) -> Any:
    """Composer's scheduler for the recipe's `scheduler` section (a multiplier of each group's lr)."""
    return SCHEDULER_BUILDERS[sched["name"]](sched)


def build_algorithms(algos: dict, model: DiffusionModel) -> list[Algorithm]:
    """Composer algorithms the recipe asks for; EMA is attached to the model so sampling can use it."""
    out = [ALGORITHM_BUILDERS[name](opts) for name, opts in algos.items()]
    for algo in out:
        if isinstance(algo, EMA):
            model.attach_ema(algo)
    return out


def build_loader(cfg: dict, plan: RunPlan, key: str = "streams", batch_size: int | None = None) -> Any:
    """The streaming loader of the training (or, with key="val_streams", validation) shards for this rank."""
    d = cfg["data"]
    train = key == "streams"
    return build_dataloader(resolve_streams(cfg, key), batch_size=batch_size or plan.device_batch,
                            resolution=d["resolution"], caption_drop_prob=d["caption_drop_prob"] if train else 0.0,
                            null_caption=null_caption(cfg, None), shuffle=train, seed=d["seed"],
                            num_workers=d["num_workers"], verify=d["verify"], skip_bad_samples=d["skip_bad_samples"])


def parallelism_config(plan: RunPlan, activation_checkpointing: bool = False) -> dict | None:
    """FSDP with SHARD_GRAD_OP (gradients and optimizer state sharded, weights kept whole between steps); with
    activation_checkpointing, Composer's non-reentrant checkpoint wrapper around the blocks the network marks."""
    if plan.parallelism != "fsdp":
        return None  # Composer wraps the model in DDP by itself when the world size is above one
    fsdp = {"sharding_strategy": "SHARD_GRAD_OP", "mixed_precision": "DEFAULT", "state_dict_type": "full",
            "use_orig_params": True}
    if activation_checkpointing:
        fsdp |= {"activation_checkpointing": True, "activation_checkpointing_reentrant": False}
    return {"fsdp": fsdp}


def checkpoint_activations(model: DiffusionModel, plan: RunPlan) -> None:
    """Without FSDP (which wraps the blocks itself), recompute each of the family's blocks in the backward."""
    if plan.parallelism != "fsdp":
        checkpoint_blocks(model.net, model.family.block_types)


def _shard_dir(cfg: dict) -> Path:
    first = resolve_streams(cfg)[0]
    if first["local"] is None:
        raise RecipeError("data.streams[0] needs a local folder (its encoders.json and null_caption.npy are read)")
    return Path(first["local"])


def sample_grid(cfg: dict, plan: RunPlan, device: torch.device) -> SampleGrid:
    """Prompt embeddings (encoded once now) and the dataset's VAE, per encoders.json beside the first stream."""
    folder = _shard_dir(cfg)
    path = folder / ENCODERS_FILE
    if not path.is_file():
        raise RecipeError(f"samples.interval is set but {path} is missing (precompute writes it)")
    enc = json.loads(path.read_text())
    text = load_text_encoder(enc["text_encoder"], device=device, caption_len=enc["caption_len"])
    prompt_emb = text.encode(list(cfg["samples"]["prompts"])).cpu()  # (P, L, D)
    del text
    decode = load_vae(enc["vae"], device=device).decode if dist.get_global_rank() == 0 else None  # rank 0 writes
    s = cfg["samples"]
    settings = SamplingSettings(steps=s["steps"], guidance=s["guidance"], sampler=s["sampler"],
                                temperature=s["temperature"], head_steps=s["head_steps"])
    shape = (cfg["model"]["latent_channels"], *as_hw(latent_size(cfg)))
    return SampleGrid(prompt_emb, null_caption(cfg, folder), decode, samples_dir(plan.run_dir),
                      s["interval"], shape, settings, s["seed"])


def throughput_window(log_interval: str) -> int:
    """Batches Composer's SpeedMonitor averages throughput over: train.log_interval's when it counts batches, else
    Composer's default 100."""
    parsed = parse_time(log_interval)
    return int(parsed[0]) if parsed is not None and parsed[1] == "ba" else 100


def build_callbacks(cfg: dict, plan: RunPlan, model: DiffusionModel) -> list[Callback]:
    """Step seeds, NaN guard, preemption, learning rate and throughput, validation loss and sample grids as the
    recipe asks, and the cost ledger."""
    callbacks: list[Callback] = [StepSeed(cfg["train"]["seed"]), NaNGuard(plan.save_folder), Preemption(),
                                 LRMonitor(), SpeedMonitor(window_size=throughput_window(cfg["train"]["log_interval"]))]
    if cfg["data"]["skip_bad_samples"]:
        callbacks.append(BadSamples(plan.run_dir))
    if cfg["distill"]:
        callbacks.append(TangentWarmup())
    ev = cfg["eval"]
    if ev["interval"]:
        loader = build_loader(cfg, plan, "val_streams", batch_size=ev["batch_size"])
        d = cfg["diffusion"]
        grid = sigma_grid(ev["sigmas"], d["p_mean"], d["p_std"]) if ev["sigmas"] else None
        callbacks.append(ValidationLoss(loader, ev["interval"], ev["batches"], ev["seed"], grid))
    if cfg["samples"]["interval"]:
        callbacks.append(sample_grid(cfg, plan, torch_device(plan.device, dist.get_local_rank())))
    callbacks.append(cost_callback(cfg, plan, model))
    return callbacks


def cost_callback(cfg: dict, plan: RunPlan, model: DiffusionModel) -> CostCallback:
    """The cost ledger (cost.jsonl), chained to the previous stage's run folder when the stage has one."""
    c = cfg["cost"]
    flops = flops_per_sample(model.net, cfg)
    carry = None
    if cfg["init_from"] is not None and cfg["init_checkpoint"] is None:
        carry = str(Path(cfg["runs_root"]) / cfg["init_from"])  # its cost.jsonl; a missing one is an error there
    return CostCallback(plan.run_dir, flops, device_type=c["device_type"], usd_per_device_hour=c["usd_per_device_hour"],
                        max_usd=c["max_usd"], max_device_hours=c["max_device_hours"], stage=cfg["stage"],
                        carry_over=carry)


def build_trainer(cfg: dict, plan: RunPlan, callbacks: list[Callback] | None = None,
                  loggers: list[LoggerDestination] | None = None) -> Trainer:
    """A Composer Trainer for one stage.

    Args:
        cfg: a recipe from load_recipe (validated, defaults filled).
        plan: plan_run's resolution of folders, devices, precision, parallelism and batch split.
        callbacks: extra callbacks (tests add probes here), run after the recipe's own.
        loggers: extra logger destinations; the run folder's metrics.jsonl logger is always added, and the trackers
            of the recipe's `loggers:` block (each gets the resolved recipe as hyperparameters).
    """
    t, ck = cfg["train"], cfg["checkpoint"]
    reproducibility.seed_all(t["seed"])  # the same initial weights on every rank and in every rerun
    model = build_model(cfg, plan)
    if t["activation_checkpointing"]:
        checkpoint_activations(model, plan)
    optimizer = build_optimizer(model, cfg["optimizer"], plan.device)
    trackers = build_trackers(cfg["loggers"], plan.run_dir)
    trainer = Trainer(
        model=model,
        train_dataloader=build_loader(cfg, plan),
        max_duration=t["max_duration"],
        optimizers=optimizer,
        schedulers=build_scheduler(cfg["scheduler"]),
        step_schedulers_every_batch=True,
        algorithms=build_algorithms(cfg["algorithms"], model),
        callbacks=[*build_callbacks(cfg, plan, model), *(callbacks or [])],
        loggers=[JSONLLogger(metrics_file(plan.run_dir)), *trackers, *(loggers or [])],
        run_name=cfg["stage"],
        progress_bar=t["progress_bar"],
        log_to_console=not t["progress_bar"],
        console_log_interval=t["log_interval"],
        # a distillation loaded its teacher itself, and build_model the weights of an export folder
        load_path=None if cfg["distill"] or (plan.init_checkpoint and is_export(plan.init_checkpoint))
        else plan.init_checkpoint,
        load_weights_only=True,  # the previous stage's weights, never its optimizer or schedule
        load_strict_model_weights=True,
        save_folder=plan.save_folder,
        save_interval=ck["save_interval"],
        save_num_checkpoints_to_keep=ck["keep"],
        autoresume=True,
        device=plan.device,
        precision=plan.precision,
        parallelism_config=parallelism_config(plan, t["activation_checkpointing"]),
        device_train_microbatch_size=plan.device_microbatch,
        seed=t["seed"],
        compile_config={} if t["compile"] else None,
    )
    trainer.logger.log_hyperparameters(flatten(cfg))  # after Event.INIT: the trackers have opened their runs
    return trainer
