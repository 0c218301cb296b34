"""The registry (kinds, registration, lookup errors) and the config (layers, --options typing,
validation, base: includes, interpolation, --print-config, the saved config.yaml)."""

from __future__ import annotations

import dataclasses
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, SFT_PROJECT, TINY_PRESET, sft_options

from lavis.common.config import ConfigError, RunConfig, load_config
from lavis.common.registry import KINDS, Registry, RegistryError, registry

# --------------------------------------------------------------------------- registry

KIND_LIST = (
    "model, vision_encoder, adapter, llm, builder, processor, task, eval_task, runner, strategy, lr_scheduler, freeze_policy, logger, "
    "synthetic_world"
)


def test_kinds_are_the_designed_ones():
    assert ", ".join(KINDS) == KIND_LIST


@pytest.mark.parametrize("kind", KINDS)
def test_register_get_list_per_kind(kind):
    reg = Registry()

    @reg.register(kind, "beta")
    class Beta:
        pass

    def alpha():
        return "alpha"

    assert reg.register(kind, "alpha")(alpha) is alpha  # the decorator returns the object itself
    assert reg.get(kind, "beta") is Beta and reg.get(kind, "alpha") is alpha
    assert Beta.registry_name == "beta" and alpha.registry_name == "alpha"
    assert reg.list(kind) == ["alpha", "beta"]  # sorted
    other = next(k for k in KINDS if k != kind)
    assert reg.list(other) == []  # kinds are separate namespaces
    with pytest.raises(RegistryError):
        reg.get(other, "beta")


def test_unknown_kind_lists_the_kinds_and_the_closest():
    reg = Registry()
    expected = f"unknown registry kind 'adaptr' (did you mean 'adapter'?); kinds: {KIND_LIST}"
    for call in (lambda: reg.get("adaptr", "x"), lambda: reg.list("adaptr"), lambda: reg.register("adaptr", "x")):
        with pytest.raises(RegistryError) as info:
            call()
        assert str(info.value) == expected
        assert isinstance(info.value, KeyError)  # callers may catch KeyError
    with pytest.raises(RegistryError) as info:
        reg.get("zzzz", "x")
    assert str(info.value) == f"unknown registry kind 'zzzz'; kinds: {KIND_LIST}"  # no close match, no guess


def test_unknown_name_lists_the_names_and_the_closest():
    reg = Registry()
    with pytest.raises(RegistryError) as info:
        reg.get("adapter", "mlp")
    assert str(info.value) == "unknown adapter 'mlp'; registered adapter names: (none)"
    for name in ("qwen_resampler", "mlp", "linear"):
        reg.register("adapter", name)(type(name, (), {}))
    with pytest.raises(RegistryError) as info:
        reg.get("adapter", "qwen_resamplr")
    assert str(info.value) == (
        "unknown adapter 'qwen_resamplr' (did you mean 'qwen_resampler'?); "
        "registered adapter names: linear, mlp, qwen_resampler"
    )
    with pytest.raises(RegistryError) as info:
        reg.get("adapter", "perceiver")
    assert str(info.value) == "unknown adapter 'perceiver'; registered adapter names: linear, mlp, qwen_resampler"


def test_double_registration_of_another_object_fails():
    reg = Registry()

    class First:
        pass

    class Second:
        pass

    reg.register("adapter", "x")(First)
    reg.register("adapter", "x")(First)  # the same object again (a re-import) is fine
    with pytest.raises(ValueError, match="adapter 'x' is already registered by"):
        reg.register("adapter", "x")(Second)
    assert reg.get("adapter", "x") is First
    reg.register("llm", "x")(Second)  # the same name under another kind is another entry
    assert reg.get("llm", "x") is Second


def test_builtin_components_are_registered():
    expected = {
        "model": {"qwen_vl"},
        "vision_encoder": {"timm_vit"},
        "adapter": {"qwen_resampler", "mlp", "linear"},
        "llm": {"hf_causal_lm"},
        "builder": {"qwen_vl_conversation", "llava_conversation"},
        "processor": {"hf_tokenizer", "qwen_tiktoken", "clip_image", "qwen2_vl_image"},
        "task": {"sft"},
        "runner": {"iter_runner"},
        "strategy": {"single", "ddp", "fsdp"},
        "lr_scheduler": {"linear_warmup_cosine", "constant"},
        "logger": {"wandb", "tensorboard"},
    }
    for kind, names in expected.items():
        assert names <= set(registry.list(kind)), kind
    with pytest.raises(RegistryError, match=r"did you mean 'qwen_resampler'\?\); registered adapter names: "):
        registry.get("adapter", "qwen_resamplr")


# --------------------------------------------------------------------------- layers


def sft(*options: str):
    return load_config(SFT_PROJECT, list(options))


def test_layering_default_component_project_options():
    cfg = sft()
    # configs/default.yaml (the project does not set these)
    assert cfg.run.seed == 42 and cfg.run.betas == [0.9, 0.98] and cfg.run.grad_accum == 1
    assert cfg.model.freeze.llm.type == "trainable" and cfg.model.system_message == "You are a helpful assistant."
    # the project over configs/default.yaml
    assert cfg.model.freeze.vision.type == "frozen" and cfg.run.save_weights == "full"
    assert (cfg.run.max_steps, cfg.run.batch_size, cfg.run.lr, cfg.run.output_dir) == (600, 16, 1e-3, "outputs/sft")
    # the component's default YAML (configs/models/...) fills what the project (tiny preset) leaves out
    assert cfg.model.llm.params["attn_implementation"] == "sdpa" and cfg.model.llm.params["trust_remote_code"] is False
    assert cfg.model.vision.params["pretrained"] is None and cfg.model.vision.params["gradient_checkpointing"] is False
    # the project (tiny preset) over the component's default YAML (vit_base_patch16_224, 224, 256 queries)
    assert cfg.model.vision.params["name"] == "vit_tiny_patch16_224" and cfg.model.vision.params["image_size"] == 64
    assert cfg.model.vision.params["pos_embed_init"] == "sincos"  # the tiny preset over the component default
    assert cfg.model.adapter.type == "qwen_resampler"
    assert cfg.model.adapter.params == {"num_queries": 36, "num_heads": None}
    # datasets: the builder's default YAML under the project's entry
    ds = cfg.datasets["synthetic_sft"]
    assert (ds.builder, ds.ratio, ds.synthetic_root) == ("qwen_vl_conversation", 1.0, "data/synthetic")
    assert ds.params == {"ann_path": "data/synthetic/sft_train.json", "image_root": "data/synthetic", "bad_boxes": "skip"}

    # --options over everything: over default.yaml, over the project, over a component default
    cfg = sft("run.seed=7", "run.max_steps=5", "run.warmup_steps=1", "model.llm.attn_implementation=eager",
              "model.adapter.num_queries=16")
    assert (cfg.run.seed, cfg.run.max_steps) == (7, 5)
    assert cfg.model.llm.params["attn_implementation"] == "eager"
    assert cfg.model.adapter.params == {"num_queries": 16, "num_heads": None}
    assert cfg.run.batch_size == 16  # untouched keys keep their layer's value


def test_project_over_component_default(tmp_path):
    project = tmp_path / "p.yaml"
    project.write_text(
        f"base: [{TINY_PRESET}]\nmodel:\n  llm: {{attn_implementation: eager}}\n  adapter: {{num_heads: 2}}\n"
        "run: {max_steps: 11, warmup_steps: 2}\n"
    )
    cfg = load_config(project)
    assert cfg.model.llm.params["attn_implementation"] == "eager"
    assert cfg.model.adapter.params == {"num_queries": 36, "num_heads": 2}
    assert cfg.run.max_steps == 11 and cfg.run.lr == 1e-4  # default.yaml's lr
    assert cfg.datasets == {}
    cfg = load_config(project, ["model.llm.attn_implementation=sdpa"])
    assert cfg.model.llm.params["attn_implementation"] == "sdpa"


def test_a_later_block_option_replaces_an_earlier_short_form():
    """``model.freeze.vision=trainable`` then ``model.freeze.vision={policy: lora, r: 4}``: the later option wins
    whole (a LoRA block), and keys set after a block still refine it."""
    cfg = sft("model.freeze.vision=trainable", "model.freeze.vision={policy: lora, r: 4}", "model.freeze.vision.alpha=8")
    assert (cfg.model.freeze.vision.type, cfg.model.freeze.vision.params["r"], cfg.model.freeze.vision.params["alpha"]) == ("lora", 4, 8)


def test_the_video_processor_can_be_set_to_null_and_stays_so_in_the_run_config(tmp_path):
    """``model.video_processor: null`` (a model that takes no video) is kept, not filled with the default; the
    run's own config.yaml says so and loads back the same; a later layer may bring it back. Other components
    cannot be null."""
    from lavis.models import build_model

    assert sft().model.video_processor.type == "qwen2_vl_video"
    cfg = sft("model.video_processor=null")
    assert cfg.model.video_processor is None
    assert build_model(cfg.model)[1].video is None
    saved = tmp_path / "config.yaml"
    cfg.save(saved)
    assert yaml.safe_load(saved.read_text())["model"]["video_processor"] is None
    assert load_config(saved).model.video_processor is None
    assert load_config(saved, ["model.video_processor={type: qwen2_vl_video}"]).model.video_processor.type == "qwen2_vl_video"
    with pytest.raises(Exception, match="model.adapter"):
        sft("model.adapter=null")


def test_options_are_typed_as_yaml():
    cfg = sft(
        "run.lr=2e-5", "run.min_lr=1.0e-6", "run.max_steps=12", "run.warmup_steps=3", "run.betas=[0.9,0.95]", "run.clip_grad=null",
        "run.resume=auto", "model.vision.class_token=true", "run.weight_decay=0", "model.adapter.num_heads=4",
    )
    run = cfg.run
    assert run.lr == 2e-5 and type(run.lr) is float
    assert run.min_lr == 1e-6
    assert run.max_steps == 12 and type(run.max_steps) is int
    assert run.betas == [0.9, 0.95] and all(type(b) is float for b in run.betas)
    assert run.clip_grad is None
    assert run.resume == "auto"
    assert cfg.model.vision.params["class_token"] is True
    assert run.weight_decay == 0.0 and type(run.weight_decay) is float  # int widened to float
    assert cfg.model.adapter.params["num_heads"] == 4
    assert sft("model.vision.class_token=false").model.vision.params["class_token"] is False
    assert sft("run.resume=null").run.resume is None


@pytest.mark.parametrize(
    "option, message",
    [
        ("run.max_steps=abc", "run.max_steps: expected an integer, got 'abc'"),
        ("run.max_steps=1e3", "run.max_steps: expected an integer, got 1000.0"),
        ("run.warmup_steps=1.5", "run.warmup_steps: expected an integer, got 1.5"),
        ("run.lr=fast", "run.lr: expected a number, got 'fast'"),
        ("run.seed=true", "run.seed: expected an integer, got True"),
        ("run.betas=0.9", "run.betas: expected a list, got 0.9"),
        ("run.betas=[0.9,x]", "run.betas[1]: expected a number, got 'x'"),
        ("run.resume=5", "run.resume: 5 is not a str | None"),
        ("run.precision=bf61", "run.precision: 'bf61' is not one of 'fp32', 'bf16', 'fp16' (did you mean 'bf16'?)"),
        ("model.adapter.num_queries=many", "model.adapter.num_queries: expected an integer, got 'many'"),
        ("model.vision.class_token=maybe", "model.vision.class_token: 'maybe' is not a bool | None"),
        ("run.max_steps=0", "run.max_steps must be >= 1, got 0"),
        ("run.lr", "--options expects key=value, got 'run.lr'"),
        ("run.dist_timeout_s=0", "run.dist_timeout_s must be > 0, got 0.0"),
        ("run.tensorboard.log_dir=5", "run.tensorboard.log_dir: 5 is not a str | None"),
        ("run.tensorboard=tb", "run.tensorboard: expected a mapping, got 'tb'"),
    ],
)
def test_wrong_values_are_config_errors(option, message):
    with pytest.raises(ConfigError) as info:
        sft(option)
    assert str(info.value) == message


@pytest.mark.parametrize(
    "options, message",
    [
        # The README's ablation once lowered lr below the project's min_lr: the schedule climbed to 5x the peak.
        (["run.lr=2e-5"], "run.min_lr (0.0001) is above run.lr (2e-05): the schedule would climb to min_lr after the "
                          "warm-up; set run.min_lr to at most run.lr (e.g. run.min_lr=2e-06)"),
        (["run.max_steps=30"], "run.warmup_steps (30) is not below run.max_steps (30): the run would end before the "
                               "learning rate reaches run.lr; lower run.warmup_steps"),
        (["run.lr=0"], "run.lr must be > 0, got 0.0"),
    ],
)
def test_contradicting_settings_name_both_keys(options, message):
    with pytest.raises(ConfigError) as info:
        sft(*options)
    assert str(info.value) == message
    sft("run.lr=2e-5", "run.min_lr=2e-6")  # consistent: accepted
    sft("run.max_steps=31")


RUN_KEYS = ", ".join(sorted(f.name for f in dataclasses.fields(RunConfig)))


@pytest.mark.parametrize(
    "option, message",
    [
        ("modle.arch=x", "unknown top-level key 'modle' in options (did you mean 'model'?); valid keys: model, datasets, evaluation, run"),
        ("run.max_step=5", f"unknown key 'run.max_step' (did you mean 'max_steps'?); valid keys: {RUN_KEYS}"),
        ("run.warmup=5", f"unknown key 'run.warmup' (did you mean 'warmup_steps'?); valid keys: {RUN_KEYS}"),
        ("model.archh=x", ("unknown key 'model.archh' (did you mean 'arch'?); valid keys: "
         "adapter, arch, freeze, image_processor, llm, load_from, override, system_message, tokenizer, video_processor, vision")),
        ("model.freeze.vison=frozen", "unknown key 'model.freeze.vison' (did you mean 'vision'?); valid keys: adapter, llm, vision"),
        ("model.adapter.num_querys=16", ("unknown key 'model.adapter.num_querys' (did you mean 'num_queries'?); "
         "valid keys: num_heads, num_queries")),
        ("model.vision.nam=x", ("unknown key 'model.vision.nam' (did you mean 'name'?); valid keys: "
         "class_token, gradient_checkpointing, image_size, model_kwargs, name, pos_embed_grid, pos_embed_init, pretrained")),
        ("model.llm.attn_implementaton=eager", ("unknown key 'model.llm.attn_implementaton' (did you mean "
         "'attn_implementation'?); valid keys: attn_implementation, config, dtype, gradient_checkpointing, "
         "pretrained, trust_remote_code")),
        ("datasets.synthetic_sft.ann_pth=x", "unknown key 'datasets.synthetic_sft.ann_pth' (did you mean 'ann_path'?); "),
        ("run.strategy.reshard=false", "unknown key 'run.strategy.reshard'; valid keys: none"),  # single takes none
        # the experiment loggers' blocks (configs/loggers/<name>.yaml)
        ("run.tensorboard.logdir=tb", "unknown key 'run.tensorboard.logdir' (did you mean 'log_dir'?); valid keys: log_dir"),
        ("run.wandb.projct=x", "unknown key 'run.wandb.projct' (did you mean 'project'?); valid keys: entity, name, project, tags"),
        ("run.tensorbord.log_dir=tb", "unknown key 'run.tensorbord' (did you mean 'tensorboard'?); valid keys: "),
    ],
)
def test_unknown_keys_fail_with_did_you_mean(option, message):
    with pytest.raises(ConfigError) as info:
        sft(option)
    assert str(info.value).startswith(message), str(info.value)


def test_strategy_block_short_form_and_keys_in_any_order():
    """``run.strategy: fsdp`` is short for ``{type: fsdp}``; its keys may follow it or precede it."""
    for options in (["run.strategy=fsdp", "run.strategy.reshard_after_forward=false"],
                    ["run.strategy.reshard_after_forward=false", "run.strategy=fsdp"],
                    ["run.strategy.type=fsdp", "run.strategy.reshard_after_forward=false"]):
        cfg = sft(*options)
        assert cfg.run.strategy.type == "fsdp"
        assert cfg.run.strategy.params == {
            "reshard_after_forward": False, "reduce_dtype": "float32", "encode_images_every_step": True,
            "broadcast_from_rank0": True,
        }
        assert cfg.raw["run"]["strategy"]["type"] == "fsdp"
    assert sft().run.strategy.type == "single" and sft().run.strategy.params == {}
    with pytest.raises(ConfigError, match=r"unknown key 'run.strategy.bucket_cap_mb'.*valid keys: broadcast_from_rank0"):
        sft("run.strategy=fsdp", "run.strategy.bucket_cap_mb=50")  # a DDP key
    assert sft("run.strategy=ddp", "run.strategy.bucket_cap_mb=50").run.strategy.params["bucket_cap_mb"] == 50
    expected = r"unknown strategy 'fdsp' \(did you mean 'fsdp'\?\); registered strategy names: ddp, fsdp, single"
    with pytest.raises(RegistryError, match=expected):
        sft("run.strategy=fdsp")


def test_single_strategy_refuses_a_multi_process_launch_and_fsdp_refuses_fp16(monkeypatch):
    from lavis.runners.strategies import FSDPStrategy, SingleProcess

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="launcher started 2 processes: use run.strategy=ddp or run.strategy=fsdp"):
        SingleProcess().setup("cpu")
    with pytest.raises(ValueError, match="fp32 or bf16"):
        FSDPStrategy().prepare(None, "fp16")


def test_unknown_top_level_key_in_project(tmp_path):
    project = tmp_path / "p.yaml"
    project.write_text(f"base: [{TINY_PRESET}]\ndatset: {{}}\n")
    with pytest.raises(ConfigError) as info:
        load_config(project)
    assert str(info.value) == (
        "unknown top-level key 'datset' in project (did you mean 'datasets'?); valid keys: model, datasets, evaluation, run"
    )


def test_typo_of_a_framework_key_in_a_dataset_entry_is_suggested():
    with pytest.raises(ConfigError) as info:
        sft("datasets.synthetic_sft.ratoi=0.5")
    assert "(did you mean 'ratio'?)" in str(info.value)
    assert "ratio" in str(info.value).split("valid keys: ")[1].split(", ")


def test_changing_a_type_by_options_drops_the_project_keys_it_does_not_accept(caplog):
    with caplog.at_level(logging.WARNING, logger="lavis.common.config"):
        cfg = sft("model.adapter.type=mlp")
    assert cfg.model.adapter.type == "mlp" and cfg.model.adapter.params == {"num_layers": 2}  # mlp.yaml's default
    assert cfg.raw["model"]["adapter"] == {"type": "mlp", "num_layers": 2}
    assert (
        "model.adapter: type changed from 'qwen_resampler' to 'mlp' by --options; "
        "dropped keys that 'mlp' does not accept: num_queries"
    ) in caplog.text
    assert sft("model.adapter.type=mlp", "model.adapter.num_layers=3").model.adapter.params == {"num_layers": 3}
    assert sft("model.adapter.type=linear").model.adapter.params == {}
    # keys given with --options are the user's: never dropped, an error when the new type lacks them
    with pytest.raises(ConfigError, match=r"^unknown key 'model.adapter.num_queries'"):
        sft("model.adapter.type=mlp", "model.adapter.num_queries=16")


# --------------------------------------------------------------------------- base: includes


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_base_includes_merge_in_order(tmp_path):
    write(tmp_path / "common" / "c.yaml", f"base: {TINY_PRESET}\nrun: {{max_steps: 5, lr: 0.1, seed: 1, warmup_steps: 1}}\n")
    write(tmp_path / "common" / "b.yaml", "base: c.yaml\nrun: {max_steps: 6, warmup_steps: 3}\n")  # relative to b
    write(tmp_path / "d.yaml", "run: {warmup_steps: 4, log_every: 9}\n")
    top = write(tmp_path / "a.yaml", "base: [common/b.yaml, d.yaml]\nrun: {seed: 9}\n")
    cfg = load_config(top)
    assert cfg.run.lr == 0.1  # from c
    assert cfg.run.max_steps == 6  # b over its base c
    assert cfg.run.warmup_steps == 4  # d (later in the list) over b
    assert cfg.run.log_every == 9  # d
    assert cfg.run.seed == 9  # the file itself over its bases
    assert cfg.run.batch_size == 8  # default.yaml
    assert cfg.model.adapter.params["num_queries"] == 36  # the tiny preset, two levels down
    assert "base" not in cfg.raw
    assert load_config(top, ["run.max_steps=5"]).run.max_steps == 5  # options over all of them


def test_base_include_cycles_fail(tmp_path):
    write(tmp_path / "x.yaml", "base: [y.yaml]\n")
    write(tmp_path / "y.yaml", "base: [z.yaml]\n")
    write(tmp_path / "z.yaml", "base: [x.yaml]\n")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "x.yaml")
    x, y, z = (str((tmp_path / n).resolve()) for n in ("x.yaml", "y.yaml", "z.yaml"))
    assert str(info.value) == f"{x}: 'base' includes itself: {x} -> {y} -> {z} -> {x}"

    write(tmp_path / "self.yaml", "base: self.yaml\n")
    with pytest.raises(ConfigError, match="'base' includes itself"):
        load_config(tmp_path / "self.yaml")

    # the same file twice on different branches (a diamond) is not a cycle
    write(tmp_path / "leaf.yaml", f"base: {TINY_PRESET}\nrun: {{seed: 3}}\n")
    write(tmp_path / "l.yaml", "base: leaf.yaml\n")
    write(tmp_path / "r.yaml", "base: leaf.yaml\n")
    assert load_config(write(tmp_path / "top.yaml", "base: [l.yaml, r.yaml]\n")).run.seed == 3


def test_missing_base_file(tmp_path):
    top = write(tmp_path / "a.yaml", "base: [nope.yaml]\n")
    with pytest.raises(ConfigError) as info:
        load_config(top)
    assert str(info.value) == f"config file not found: {(tmp_path / 'nope.yaml').resolve()}"


# --------------------------------------------------------------------------- interpolation


def test_image_size_interpolation_reaches_the_image_processor():
    assert sft().model.image_processor.params["image_size"] == 64
    cfg = sft("model.vision.image_size=96")
    assert cfg.model.vision.params["image_size"] == 96
    assert cfg.model.image_processor.params["image_size"] == 96
    assert cfg.raw["model"]["image_processor"]["image_size"] == 96  # saved resolved, not as ${...}
    assert "${" not in cfg.to_yaml()


def test_image_processor_size_mismatch_is_refused_at_build():
    from lavis.models import build_model

    cfg = sft("model.image_processor.image_size=80")
    assert cfg.model.image_processor.params["image_size"] == 80  # an explicit value beats the interpolation
    with pytest.raises(ValueError) as info:
        build_model(cfg.model)
    assert str(info.value) == "model.image_processor.image_size (80) != model.vision.image_size (64)"


# --------------------------------------------------------------------------- train.py and config.yaml


def test_print_config_prints_yaml_and_exits_0(tmp_path):
    out = tmp_path / "never"
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--cfg-path", str(SFT_PROJECT), "--print-config", "--options",
         "run.max_steps=50", "model.vision.image_size=96", f"run.output_dir={out}"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    assert printed == load_config(SFT_PROJECT, ["run.max_steps=50", "model.vision.image_size=96",
                                                f"run.output_dir={out}"]).raw
    assert set(printed) == {"model", "datasets", "evaluation", "run"}
    assert printed["run"]["max_steps"] == 50 and printed["run"]["lr"] == 1e-3
    assert printed["model"]["image_processor"]["image_size"] == 96
    assert printed["model"]["adapter"] == {"type": "qwen_resampler", "num_queries": 36, "num_heads": None}
    assert "Traceback" not in proc.stderr
    assert not out.exists()  # printing trains nothing and writes nothing


def test_a_run_writes_the_resolved_config_to_output_dir(small_world, tmp_path):
    from lavis.runners import build_runner

    out = tmp_path / "out"
    options = sft_options(small_world, out, "run.max_steps=1", "run.save_every=1000", "model.adapter.num_queries=16")
    cfg = load_config(SFT_PROJECT, options)
    build_runner(cfg).train()
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved == cfg.raw
    assert saved["run"]["max_steps"] == 1 and saved["run"]["output_dir"] == str(out)
    assert saved["model"]["adapter"]["num_queries"] == 16
    assert saved["model"]["image_processor"]["image_size"] == 64
    assert saved["datasets"]["synthetic_sft"]["ann_path"] == str(small_world / "sft_train.json")
    # the saved file is a complete project on its own: loading it gives the same config
    again = load_config(out / "config.yaml")
    assert again.raw == cfg.raw and again.run == cfg.run and again.model == cfg.model and again.datasets == cfg.datasets


def test_freeze_policies_are_registered_blocks_written_short_or_whole():
    """``model.freeze.<component>`` is a freeze_policy block: a name, or a block whose type is given as
    ``policy`` or ``type``, with the policy's keys checked like any component's."""
    assert sft("model.freeze.llm=lora", "model.freeze.llm.r=8").model.freeze.llm.params["r"] == 8
    block = sft("model.freeze.llm={policy: lora, r: 4, alpha: 8}").model.freeze.llm
    assert (block.type, block.params["r"], block.params["alpha"], block.params["dropout"]) == ("lora", 4, 8, 0.05)
    with pytest.raises(RegistryError, match=re.escape("unknown freeze_policy 'frozn' (did you mean 'frozen'?)")):
        sft("model.freeze.llm=frozn")
    expected = "unknown key 'model.freeze.llm.rank'; valid keys: alpha, dropout, r, targets, trainable"
    with pytest.raises(ConfigError, match=re.escape(expected)):
        sft("model.freeze.llm=lora", "model.freeze.llm.rank=8")
    with pytest.raises(ConfigError, match="model.freeze.llm.r: expected an integer"):
        sft("model.freeze.llm=lora", "model.freeze.llm.r=big")
