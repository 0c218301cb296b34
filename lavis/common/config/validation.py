"""Validation: a merged, resolved dict into a typed :class:`~lavis.common.config.schema.Config`, with the
rules that span keys (schedules, evaluations, freeze policies and strategies)."""

from __future__ import annotations

from typing import Any

from lavis.common.config.checking import (
    check_keys,
    check_params,
    constructor_args,
    eval_task,
    to_dataclass,
    training_task,
)
from lavis.common.config.schema import (
    DATASET_KEYS,
    EVAL_KEYS,
    FREEZE_COMPONENTS,
    MODEL_COMPONENTS,
    OPTIONAL_COMPONENTS,
    ComponentConfig,
    Config,
    ConfigError,
    DatasetConfig,
    EvalConfig,
    FreezeConfig,
    ModelConfig,
    RunConfig,
)
from lavis.common.registry import did_you_mean, registry


def _component(kind: str, block: dict[str, Any], where: str) -> ComponentConfig:
    block = dict(block)
    type_name = block.pop("type")
    cls = registry.get(kind, type_name)
    return ComponentConfig(type=type_name, params=check_params(cls, kind, block, where))


def build_config(resolved: dict[str, Any]) -> Config:
    """Validate a merged, interpolation-resolved dict into a typed :class:`Config`."""
    model = dict(resolved["model"])
    blocks = {key: model.pop(key) for key in MODEL_COMPONENTS}
    components = {key: _component(kind, blocks[key], f"model.{key}") for key, kind in MODEL_COMPONENTS.items()
                  if blocks[key] is not None or key not in OPTIONAL_COMPONENTS}
    freeze = dict(model.pop("freeze"))
    check_keys(freeze, FREEZE_COMPONENTS, "model.freeze")
    policies = {key: vars(_component("freeze_policy", freeze[key], f"model.freeze.{key}")) for key in FREEZE_COMPONENTS}
    model_cfg = to_dataclass(ModelConfig, {**model, **{k: None for k in OPTIONAL_COMPONENTS}, **{k: vars(c) for k, c in components.items()},
                                         "freeze": policies}, "model")
    datasets = {}
    for name, entry in (resolved.get("datasets") or {}).items():
        entry = dict(entry)
        where = f"datasets.{name}"
        builder = registry.get("builder", entry.get("builder"))
        check_keys(entry, [*constructor_args(builder, "builder"), *DATASET_KEYS], where)
        common = to_dataclass(DatasetConfig, {k: entry.pop(k) for k in DATASET_KEYS if k in entry}, where)
        common.params = check_params(registry.get("builder", common.builder), "builder", entry, where)
        registry.get("synthetic_world", common.synthetic_world)  # an unknown generator fails now, with the valid names
        if common.ratio <= 0:
            raise ConfigError(f"{where}.ratio must be positive, got {common.ratio}")
        datasets[name] = common
    evaluation = {name: _evaluation(name, entry) for name, entry in (resolved.get("evaluation") or {}).items()}
    run_block = dict(resolved["run"])
    strategy = _component("strategy", run_block.pop("strategy"), "run.strategy")
    run = to_dataclass(RunConfig, {**run_block, "strategy": vars(strategy)}, "run")
    training_task(run.task, "run.task")
    registry.get("runner", run.runner)
    registry.get("lr_scheduler", run.lr_scheduler)
    registry.get("model", model_cfg.arch)
    for key in ("max_steps", "batch_size", "grad_accum", "max_len", "log_every", "save_every", "keep_last", "eval_batch_size"):
        if getattr(run, key) < 1:
            raise ConfigError(f"run.{key} must be >= 1, got {getattr(run, key)}")
    _check_budgets(run)
    if run.dist_timeout_s <= 0:
        raise ConfigError(f"run.dist_timeout_s must be > 0, got {run.dist_timeout_s}")
    if run.world_size_hint is not None and run.world_size_hint < 1:
        raise ConfigError(f"run.world_size_hint must be >= 1 or null, got {run.world_size_hint}")
    _check_schedule(run)
    _check_eval_schedule(run, evaluation)
    _check_freeze_strategy(model_cfg.freeze, run.strategy)
    _check_dpo(run, model_cfg.freeze)
    return Config(model=model_cfg, datasets=datasets, evaluation=evaluation, run=run, raw=resolved)


def _evaluation(name: str, entry: dict[str, Any]) -> EvalConfig:
    """Split an evaluation entry into its task's and its builder's arguments, checking both."""
    where = f"evaluation.{name}"
    entry = dict(entry)
    task_cls, builder_cls = eval_task(entry.get("task"), f"{where}.task"), registry.get("builder", entry.get("builder"))
    task_args, builder_args = constructor_args(task_cls, "task"), constructor_args(builder_cls, "builder")
    clash = sorted(set(task_args) & set(builder_args))
    if clash:  # a registration problem, not a user's: the flat entry would be ambiguous
        raise ConfigError(f"{where}: task '{entry['task']}' and builder '{entry['builder']}' both take {clash}")
    check_keys(entry, [*task_args, *builder_args, *EVAL_KEYS], where)
    common = to_dataclass(EvalConfig, {k: entry.pop(k) for k in EVAL_KEYS if k in entry}, where)
    registry.get("synthetic_world", common.synthetic_world)
    common.task_params = check_params(task_cls, "task", {k: v for k, v in entry.items() if k in task_args}, where)
    common.builder_params = check_params(builder_cls, "builder", {k: v for k, v in entry.items() if k in builder_args}, where)
    return common


def _check_schedule(run: RunConfig) -> None:
    """Settings that contradict each other are errors naming both keys (an ablation that changes one
    of them would otherwise train on a schedule nobody asked for)."""
    if run.lr <= 0:
        raise ConfigError(f"run.lr must be > 0, got {run.lr}")
    if run.min_lr > run.lr:
        raise ConfigError(
            f"run.min_lr ({run.min_lr:g}) is above run.lr ({run.lr:g}): the schedule would climb to min_lr "
            f"after the warm-up; set run.min_lr to at most run.lr (e.g. run.min_lr={run.lr / 10:g})"
        )
    if run.warmup_steps >= run.max_steps:
        raise ConfigError(
            f"run.warmup_steps ({run.warmup_steps}) is not below run.max_steps ({run.max_steps}): the run would end "
            "before the learning rate reaches run.lr; lower run.warmup_steps"
        )


def _check_budgets(run: RunConfig) -> None:
    """``run.batch_tokens`` must hold one sample of ``run.max_len`` tokens (one packed row); ``run.batch_patches``
    must be positive. Null is always valid (no budget)."""
    if run.batch_tokens is not None and run.batch_tokens < run.max_len:
        raise ConfigError(
            f"run.batch_tokens ({run.batch_tokens}) is below run.max_len ({run.max_len}): a micro-batch must hold a "
            f"sample of max_len tokens (packed: one row); set run.batch_tokens to at least {run.max_len}, or null"
        )
    if run.batch_patches is not None and run.batch_patches < 1:
        raise ConfigError(f"run.batch_patches must be >= 1 or null (no vision budget), got {run.batch_patches}")


def _check_freeze_strategy(freeze: FreezeConfig, strategy: ComponentConfig) -> None:
    quantized = [name for name, block in vars(freeze).items() if block.type == "qlora"]
    if quantized and strategy.type == "fsdp":
        raise ConfigError(
            f"model.freeze.{quantized[0]}: qlora's 4-bit weights are not sharded by run.strategy=fsdp here; "
            "use run.strategy=ddp (each GPU holds the 4-bit model) or policy lora"
        )


def _check_dpo(run: RunConfig, freeze: FreezeConfig) -> None:
    """``run.dpo``'s values, and the freeze policies ``reference: adapters_off`` needs (only under ``run.task: dpo``)."""
    dpo = run.dpo
    if dpo.beta <= 0:
        raise ConfigError(f"run.dpo.beta must be > 0, got {dpo.beta:g} (DPO's usual range: 0.1 to 0.5)")
    if not 0 <= dpo.label_smoothing < 0.5:
        raise ConfigError(f"run.dpo.label_smoothing must be in [0, 0.5), got {dpo.label_smoothing:g} (0: plain DPO)")
    if dpo.sft_weight < 0:
        raise ConfigError(f"run.dpo.sft_weight must be >= 0, got {dpo.sft_weight:g} (0: no SFT term)")
    if dpo.reference == "precomputed" and dpo.precompute_ref:
        raise ConfigError("run.dpo.reference=precomputed reads the records' ref_chosen_logp / ref_rejected_logp, and "
                          "run.dpo.precompute_ref=true computes them: set one of the two (precompute_ref with "
                          "reference frozen_copy or adapters_off says which model computes them)")
    if dpo.reference_file is not None and not dpo.precompute_ref:
        raise ConfigError("run.dpo.reference_file is where run.dpo.precompute_ref=true keeps the reference "
                          "log-probabilities: set precompute_ref=true, or reference_file=null")
    if run.task != "dpo" or dpo.reference != "adapters_off":
        return
    policies = {name: block.type for name, block in vars(freeze).items()}
    if not any(p in ("lora", "qlora") for p in policies.values()):
        raise ConfigError("run.dpo.reference=adapters_off needs a LoRA policy (e.g. model.freeze.llm=lora): without "
                          "adapters the policy itself would be its reference; use run.dpo.reference=frozen_copy")
    trained = [name for name, p in policies.items() if p not in ("lora", "qlora", "frozen")]
    if trained:
        raise ConfigError(f"run.dpo.reference=adapters_off: model.freeze.{trained[0]} is {policies[trained[0]]}, so "
                          "switching the adapters off would not give the starting model; freeze it "
                          f"(model.freeze.{trained[0]}=frozen), give it LoRA, or use run.dpo.reference=frozen_copy")


def _check_eval_schedule(run: RunConfig, evaluation: dict[str, EvalConfig]) -> None:
    if run.eval_every is not None and run.eval_every < 1:
        raise ConfigError(f"run.eval_every must be >= 1 or null, got {run.eval_every}")
    if run.eval_every and not evaluation:
        raise ConfigError("run.eval_every is set but no evaluation is configured: add entries under 'evaluation:'")
    if run.best_metric is None:
        return
    name, _, metric = run.best_metric.partition("/")
    if name not in evaluation:
        raise ConfigError(
            f"run.best_metric '{run.best_metric}': no evaluation named '{name}'{did_you_mean(name, evaluation)}; "
            f"write it as <evaluation name>/<metric>, evaluations: {', '.join(evaluation) or 'none'}"
        )
    metrics = registry.get("eval_task", evaluation[name].task).metric_names
    if metric not in metrics:
        raise ConfigError(
            f"run.best_metric '{run.best_metric}': task '{evaluation[name].task}' reports no metric '{metric}'"
            f"{did_you_mean(metric, metrics)}; its metrics: {', '.join(metrics)}"
        )
    if not run.eval_every:
        raise ConfigError("run.best_metric needs run.eval_every: the best checkpoint is chosen at evaluations during training")
