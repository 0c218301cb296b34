"""Config: project YAML over component defaults, then ``--options``; validated into typed objects.

Layers, lowest first:
  1. ``configs/default.yaml``: run and model defaults, with each registered logger's block
     (``run.wandb``, ``run.tensorboard``) from ``configs/loggers/<name>.yaml``;
  2. each component's default YAML, chosen by its ``type`` (``configs/models/adapters/mlp.yaml``, ...);
  3. the project YAML, over the files its ``base:`` list names;
  4. ``--options key=value`` (dotted keys; values typed as YAML: ``16``, ``2e-5``, ``[0.9,0.98]``).

Component blocks (``model.vision``, ``model.adapter``, ``model.llm``, ``model.tokenizer``,
``model.image_processor``, ``run.strategy``, each dataset, each evaluation's task and builder) are
checked against the
registered class's constructor:
its argument names are the valid keys and its type hints the valid types. Fixed sections are
checked against the dataclasses below. Unknown keys fail with a "did you mean".

Modules: :mod:`~lavis.common.config.schema` (the typed sections, the framework's key names,
:class:`ConfigError`), :mod:`~lavis.common.config.checking` (values against types, blocks against
constructors), :mod:`~lavis.common.config.merging` (YAML files and the layers),
:mod:`~lavis.common.config.validation` (the typed :class:`Config` and the rules across keys) and
:mod:`~lavis.common.config.load` (:func:`load_config`).
"""

from lavis.common.config.checking import (
    check_keys,
    check_params,
    check_type,
    constructor_args,
    eval_task,
    to_dataclass,
    training_task,
)
from lavis.common.config.load import load_config
from lavis.common.config.merging import (
    component_defaults,
    load_project,
    load_yaml,
    merge_layers,
    parse_options,
)
from lavis.common.config.schema import (
    CONTEXT_ARGS,
    DATASET_KEYS,
    DEFAULTS_DIR,
    EVAL_KEYS,
    FREEZE_COMPONENTS,
    LABEL_POLICIES,
    MODEL_COMPONENTS,
    OPTIONAL_COMPONENTS,
    SECTIONS,
    SHORTHAND_BLOCKS,
    ComponentConfig,
    Config,
    ConfigError,
    DatasetConfig,
    DPOConfig,
    EvalConfig,
    FreezeConfig,
    LabelPolicy,
    LrScaleConfig,
    ModelConfig,
    RunConfig,
    TensorBoardConfig,
    WandbConfig,
)
from lavis.common.config.validation import build_config
from lavis.common.resources import CONFIG_ROOT

__all__ = [
    "CONFIG_ROOT",
    "CONTEXT_ARGS",
    "DATASET_KEYS",
    "DEFAULTS_DIR",
    "EVAL_KEYS",
    "FREEZE_COMPONENTS",
    "LABEL_POLICIES",
    "MODEL_COMPONENTS",
    "OPTIONAL_COMPONENTS",
    "SECTIONS",
    "SHORTHAND_BLOCKS",
    "ComponentConfig",
    "Config",
    "ConfigError",
    "DPOConfig",
    "DatasetConfig",
    "EvalConfig",
    "FreezeConfig",
    "LabelPolicy",
    "LrScaleConfig",
    "ModelConfig",
    "RunConfig",
    "TensorBoardConfig",
    "WandbConfig",
    "build_config",
    "check_keys",
    "check_params",
    "check_type",
    "component_defaults",
    "constructor_args",
    "eval_task",
    "load_config",
    "load_project",
    "load_yaml",
    "merge_layers",
    "parse_options",
    "to_dataclass",
    "training_task",
]
