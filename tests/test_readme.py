"""The README's commands run as written and print what the README says they print.

Every shell command in the README's ``bash`` blocks, and every ``python`` block, is listed below with
what it must print or write. They run, in README order, in a copy of the repository (the code, the
configs and projects, a ``.venv`` that points at this interpreter) over the embedded default world
(train split at full size, so that the pretraining project's ten shards exist; val and test small),
after ``make demo``, every training run cut to two steps. A command that cannot run on this machine
(eight GPUs, a cluster, the 7B weights) runs the nearest thing that can, and says why.

A README command missing from the table fails the test: a new command comes with its check.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO
from safetensors.torch import load_file

from lavis.common import checkpoint as ckpt

pytestmark = pytest.mark.integration

README = REPO / "README.md"
TINY = ("run.max_steps=2", "run.warmup_steps=0", "run.save_every=2", "run.log_every=1", "run.batch_size=2", "run.num_workers=0")
WORLD_SIZES = {"train": 2000, "val": 8, "test": 8}  # train: pretrain.yaml reads shards train-000000..000009
COPIED = ("train.py", "evaluate.py", "Makefile", "setup.py", "lavis", "configs", "projects", "scripts", "benchmarks", "tests")


def readme_blocks(language: str) -> list[str]:
    """The README's fenced blocks of ``language`` (indented ones too), dedented."""
    blocks = re.findall(rf"^( *)```{language}\n(.*?)^\1```", README.read_text(), flags=re.M | re.S)
    return ["\n".join(line[len(indent):] for line in body.splitlines()) for indent, body in blocks]


def readme_commands() -> dict[str, str]:
    """Shell commands of the README's ``bash`` blocks (continuation lines joined, comments dropped):
    ``{the words joined by spaces: how the table below names it: the command, quoted for bash}``."""
    commands = {}
    for block in readme_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands[" ".join(words)] = shlex.join(words)
    return commands


def tiny(command: str) -> str:
    """``command`` with two-step training: the options go after ``--options`` (added if absent)."""
    if "--options" in command:
        return command.replace("--options", "--options " + " ".join(TINY), 1)
    return f"{command} --options {' '.join(TINY)}"


@dataclass
class ReadmeCommand:
    """A README command and what it must do here."""

    command: str
    prints: tuple[str, ...] = ()  # regular expressions its output (stdout + stderr) must match
    writes: tuple[str, ...] = ()  # paths, relative to the repository, it must create
    here: str | None = None  # the command run instead, when the README's cannot run here
    why: str = ""  # why it is replaced
    stdin: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    release: bool = False  # runs on the stand-in Qwen-VL release (test_readme_release_commands...)

    def shell(self) -> str:
        if self.here is not None:
            return self.here
        command = readme_commands()[self.command]
        trains = "train.py" in command and "--print-config" not in command
        return tiny(command) if trains else command


FAKE_SLURM = {
    # sbatch runs the script at once, as one node of a job with 2 processes (CPUs: ddp/fsdp over gloo)
    "sbatch": 'export SLURM_JOB_ID=1 SLURM_JOB_NODELIST=localhost SLURM_NNODES=1 SLURM_GPUS_PER_NODE=2 '
              'SLURM_CPUS_PER_TASK=2\nexec bash "$@"',
    "scontrol": "echo localhost",
    "srun": 'while [ "${1#--}" != "$1" ]; do shift; done\nexec "$@"',  # drop srun's own options
}

SFT_RESOLVED = (r"\Amodel:$", r"^run:$", r"^  output_dir: outputs/sft$", r"^  max_steps: 600$", r"^datasets:$")
TABLE = r"^benchmark\s+split\s+metric\s+value\s+samples\s+skipped\n(-+\s+){5}-+$"  # evaluate.py's results table


def row(benchmark: str, metric: str, value: str = r"\d+\.\d{4}", skipped: str = r"\d+") -> str:
    """A line of the results table: benchmark (the evaluation's name in the demo's projects), split, metric,
    value, samples, skipped."""
    return rf"^{benchmark}\s+\S+\s+{metric}\s+{value}\s+\d+\s+{skipped}$"


def parameter_counts(vision: str, adapter: str, llm: str) -> str:
    return rf"vision\s+\w+\s+{vision}[\d,]*\s.*\n.*adapter\s+\w+\s+{adapter}[\d,]*\s.*\n.*llm\s+\w+\s+{llm}[\d,]*\s"


WAIT_FOR = """.venv/bin/python -c "
import sys, time, urllib.error, urllib.request
for _ in range(180):
    try:
        urllib.request.urlopen(sys.argv[1], timeout=5)
        break
    except urllib.error.HTTPError:  # answering (e.g. 401 without the key): up
        break
    except OSError:
        time.sleep(1)
" """


def while_serving(server: str, url: str, then: str) -> str:
    """Bash: start ``server`` in the background, wait until ``url`` answers, run ``then``, stop the server
    and show its log; the exit status is ``then``'s."""
    return (f"{server} > server.log 2>&1 & server=$!\n{WAIT_FOR}{url}\n{then}\nstatus=$?\n"
            "kill $server; wait $server; cat server.log; exit $status")


README_COMMANDS = [
    ReadmeCommand(
        "make demo",
        here=f'make demo DEMO_OPTIONS="{" ".join(TINY)}"',
        why="two steps per stage instead of the projects' hundreds",
        prints=(r"model\.load_from outputs/pretrain/checkpoints/step_00000002/model\.safetensors: loaded",
                r"model\.load_from outputs/multitask/checkpoints/step_00000002/model\.safetensors: loaded",
                TABLE, row("caption", "CIDEr"), row("caption", "BLEU-4"), row("vqa", "accuracy", skipped="0"),
                row("grounding", "accuracy", skipped="0")),
        writes=tuple(f"outputs/{stage}/{name}" for stage in ("pretrain", "multitask", "sft")
                     for name in ("config.yaml", "metrics.jsonl", "checkpoints/step_00000002/meta.json"))
        + ("outputs/sft/eval/step_00000002/demo/vqa.json",),
    ),
    ReadmeCommand("make test", here="make -n test", why="it is the suite running this test: its recipe is checked",
                  prints=(r"-m pytest -q tests",)),
    ReadmeCommand(
        ".venv/bin/python train.py --cfg-path projects/sft.yaml --options run.output_dir=outputs/sft_scratch",
        prints=(r"saved checkpoint outputs/sft_scratch/checkpoints/step_00000002",
                r"trained to step 2 .*metrics in outputs/sft_scratch/metrics\.jsonl"),
        writes=("outputs/sft_scratch/config.yaml", "outputs/sft_scratch/checkpoints/step_00000002/model.safetensors"),
    ),
    ReadmeCommand(".venv/bin/python train.py --cfg-path projects/sft.yaml --print-config",
                  prints=(*SFT_RESOLVED, parameter_counts("429,696", "87,808", "1,124,480"))),
    ReadmeCommand(
        ".venv/bin/python train.py --cfg-path projects/sft.yaml --options model.adapter.num_queries=16 run.lr=2e-4 "
        "run.min_lr=2e-5 run.betas=[0.9,0.95] run.output_dir=outputs/sft_q16",
        prints=(r"adapter\s+trainable\s+[\d,]+", r"step 1/2 loss [\d.]+ lr 2\.00e-04"),
        writes=("outputs/sft_q16/checkpoints/step_00000002/model.safetensors",),
    ),
    ReadmeCommand(
        ".venv/bin/python train.py --cfg-path projects/multitask.yaml --options model.load_from=outputs/pretrain "
        "run.output_dir=outputs/multitask_b",
        prints=(r"model\.load_from outputs/pretrain/checkpoints/step_00000002/model\.safetensors: loaded "
                r"\{'adapter': \d+, 'llm': \d+, 'vision': \d+\}; not in the checkpoint \(kept as built\): none",),
        writes=("outputs/multitask_b/checkpoints/step_00000002/meta.json",),
    ),
    ReadmeCommand(".venv/bin/python train.py --cfg-path projects/qwen_vl/pretrain.yaml --print-config",
                  prints=(r"built on the meta device", parameter_counts("1,84", "9[01],", "7,72"))),
    ReadmeCommand(
        ".venv/bin/python evaluate.py --cfg-path projects/eval/vqa.yaml --options model.load_from=outputs/multitask "
        "evaluation.vqa.chat=false evaluation.vqa.prompt='{question} Answer:'",
        prints=(TABLE, row("vqa", "accuracy"), r"predictions and metrics: outputs/multitask/eval/step_00000002/vqa/"),
        writes=("outputs/multitask/eval/step_00000002/vqa/vqa.json",),
    ),
    ReadmeCommand(".venv/bin/python -m lavis.chat --ckpt outputs/sft",
                  stdin=":image data/synthetic/images/test/000003.png\nWhat colour is the shape?\n:draw chat_boxes.png\n:quit\n",
                  prints=(r"user> assistant> ", r"saved chat_boxes\.png")),
    ReadmeCommand(".venv/bin/python -m lavis.plot outputs/sft", writes=("outputs/sft/curves.png",)),
    ReadmeCommand(
        ".venv/bin/python -m lavis.web --ckpt outputs/sft --port 7860",
        here=while_serving(".venv/bin/python -m lavis.web --ckpt outputs/sft --port 7871", "http://127.0.0.1:7871",
                           ".venv/bin/python -c \"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:7871').read().decode())\""),
        why="a server: started in the background (on a port of its own), its page fetched, then stopped; "
            "tests/test_web.py drives the page in a browser",
        prints=(r"<gradio-app", r"Running on local URL: +http://127\.0\.0\.1:7871"),
    ),
    ReadmeCommand(
        ".venv/bin/python -m lavis.serve --ckpt outputs/sft --port 8000 --api-key secret",
        here=while_serving(".venv/bin/python -m lavis.serve --ckpt outputs/sft --port 8000 --api-key secret",
                           "http://127.0.0.1:8000/v1/models", f".venv/bin/python - <<'EOF'\n{readme_blocks('python')[1]}\nEOF"),
        why="a server: started in the background, the README's openai client example run against it, then stopped",
        prints=(r'(?s)"POST /v1/chat/completions HTTP/1\.1" 200.*"POST /v1/chat/completions HTTP/1\.1" 200',
                r'"GET /v1/models HTTP/1\.1" 401'),
    ),
    ReadmeCommand(
        ".venv/bin/torchrun --standalone --nproc_per_node 2 train.py --cfg-path projects/sft.yaml "
        "--options run.strategy=fsdp run.output_dir=outputs/sft_fsdp",
        prints=(r"global batch 4 = batch_size 2 x grad_accum 1 x 2 rank\(s\) \(run\.strategy=fsdp\)",),
        writes=(f"outputs/sft_fsdp/checkpoints/step_00000002/{ckpt.SHARDED_WEIGHTS_NAME}/.metadata",),
    ),
    ReadmeCommand(".venv/bin/python -m lavis.export outputs/sft exported/sft",
                  writes=("exported/sft/model.safetensors", "exported/sft/config.yaml", "exported/sft/meta.json")),
    ReadmeCommand(".venv/bin/python -m lavis.export outputs/sft_scratch exported/scratch",
                  writes=("exported/scratch/model.safetensors", "exported/scratch/config.yaml")),
    ReadmeCommand(".venv/bin/python -m lavis.export outputs/sft_q16 exported/q16 --weights full",
                  writes=("exported/q16/model.safetensors",)),
    ReadmeCommand(
        ".venv/bin/python -m lavis.export outputs/sft_fsdp/checkpoints/step_00000600 exported/fsdp --dtype bfloat16",
        here=".venv/bin/python -m lavis.export outputs/sft_fsdp/checkpoints/step_00000002 exported/fsdp --dtype bfloat16",
        why="the two-step run's checkpoint", writes=("exported/fsdp/model.safetensors",),
    ),
    ReadmeCommand(
        ".venv/bin/torchrun --standalone --nproc_per_node 8 train.py --cfg-path projects/qwen_vl/sft.yaml",
        here=".venv/bin/python train.py --cfg-path projects/qwen_vl/sft.yaml --print-config --options run.world_size_hint=8",
        why="8 GPUs and the 7B weights: its config and the per-rank memory the README states for 8 ranks",
        prints=(r"per-rank memory at 8 rank\(s\), run\.strategy=fsdp, run\.precision=bf16",
                r"total \(persistent\)\s+15\.4\d GiB", r"gathered units \(transient\)\s+3\.\d\d GiB"),
    ),
    ReadmeCommand(
        ".venv/bin/torchrun --nnodes 8 --nproc_per_node 8 --rdzv-id $JOB --rdzv-backend c10d --rdzv-endpoint node0:29500 "
        "train.py --cfg-path projects/qwen_vl/pretrain.yaml",
        here=".venv/bin/python train.py --cfg-path projects/qwen_vl/pretrain.yaml --print-config --options run.world_size_hint=64",
        why="8 nodes of 8 GPUs: its config at 64 ranks",
        prints=(r"per-rank memory at 64 rank\(s\), run\.strategy=fsdp, run\.precision=bf16",),
    ),
    ReadmeCommand(
        "sbatch scripts/slurm/train.sbatch",
        here="sbatch scripts/slurm/train.sbatch run.strategy=ddp run.output_dir=outputs/slurm " + " ".join(TINY),
        env={"CFG": "projects/sft.yaml"},
        why="no Slurm: a stand-in sbatch runs the script as one node of 2 CPU processes on the demo's SFT project",
        prints=(r"global batch 4 = batch_size 2 x grad_accum 1 x 2 rank\(s\) \(run\.strategy=ddp\)",),
        writes=("outputs/slurm/checkpoints/step_00000002/model.safetensors",),
    ),
    ReadmeCommand(".venv/bin/python train.py --cfg-path projects/qwen_vl/sft.yaml --print-config --options run.world_size_hint=64",
                  prints=(r"per-rank memory at 64 rank\(s\)", r"total \(persistent\)\s+1\.9\d GiB",
                          r"gathered units \(transient\)\s+3\.\d\d GiB")),
    ReadmeCommand(".venv/bin/python train.py --cfg-path projects/sft_lora.yaml",
                  prints=(r"^llm\s+lora r=16\s", r"model\.load_from outputs/sft/checkpoints/step_00000002/model\.safetensors: loaded"),
                  writes=("outputs/sft_lora/checkpoints/step_00000002/model.safetensors",)),
    ReadmeCommand(".venv/bin/python evaluate.py --cfg-path projects/eval/demo.yaml --options model.load_from=outputs/sft_lora",
                  prints=(r"loaded outputs/sft_lora/checkpoints/step_00000002/model\.safetensors <- outputs/sft/checkpoints/",
                          TABLE, row("vqa", "accuracy")),
                  writes=("outputs/sft_lora/eval/step_00000002/demo/vqa.json",)),
    ReadmeCommand(".venv/bin/python -m lavis.export outputs/sft_lora exported/sft_lora --format hf",
                  writes=("exported/sft_lora/model.safetensors", "exported/sft_lora/llm/config.json",
                          "exported/sft_lora/llm/model.safetensors")),
    ReadmeCommand(".venv/bin/python evaluate.py --cfg-path projects/eval/demo.yaml --options run.overwrite=true",
                  prints=(TABLE, row("caption", "CIDEr"), row("grounding", "accuracy"),
                          (r"run\.overwrite: the earlier evaluation in outputs/sft/eval/step_00000002/demo \(.*\) was moved to "
                           r"outputs/sft/eval/step_00000002/demo\.old-")),
                  writes=("outputs/sft/eval/step_00000002/demo/grounding.json",)),
    ReadmeCommand(
        ".venv/bin/python evaluate.py --cfg-path projects/eval/vqa.yaml --options model.load_from=outputs/sft_fsdp "
        "evaluation.vqa.max_samples=50",
        prints=(r"loaded outputs/sft_fsdp/checkpoints/step_00000002/model", TABLE, row("vqa", "accuracy")),
        writes=("outputs/sft_fsdp/eval/step_00000002/vqa/vqa.json",),
    ),
    ReadmeCommand(".venv/bin/torchrun --standalone --nproc_per_node 2 evaluate.py --cfg-path projects/eval/demo.yaml "
                  "--options run.output_dir=outputs/eval/demo_2proc",
                  writes=("outputs/eval/demo_2proc/eval/results.md",),
                  prints=(TABLE, row("vqa", "accuracy"),
                          r"(?s)\A(?!.*benchmark\s+split\s+metric.*benchmark\s+split\s+metric)")),  # one table
    ReadmeCommand(
        "make dpo-demo",
        here=f'make dpo-demo DPO_OPTIONS="{" ".join(TINY)}"',
        why="two training steps instead of the project's 250",
        prints=(r"^\| run \| VQA \| exists \| shape \| colour \| position \| count \| CHAIR_i \| CHAIR_s \| mentioned \| "
                r"CIDEr \| grounding \|$",
                r"^\| `outputs/sft/eval/step_00000002/demo` \| 0\.\d{3} \|",  # make demo's evaluation, not redone
                r"^\| `outputs/dpo/eval/step_00000002/demo` \| 0\.\d{3} \|", r"^training: \d+ s$"),
        writes=("outputs/dpo/checkpoints/step_00000002/model.safetensors", "outputs/dpo/reference_logps.json",
                "outputs/dpo/eval/step_00000002/demo/results.md"),
    ),
    ReadmeCommand(
        "make video-demo",
        here=f'make video-demo VIDEO_OPTIONS="{" ".join(TINY)}" VIDEO_EVAL_OPTIONS="evaluation.vqa.max_samples=40"',
        why="two training steps instead of the project's 600, 40 of the test questions",
        prints=(r"^\| \| all \| direction \(\d+\) \| colour \(\d+\) \| order \(\d+\) \| count \(\d+\) \|$",
                r"^\| blind prior \(.*\) \| 0\.\d{3} \|", r"^\| `outputs/video` \| 0\.\d{3} \|", r"^training: \d+ s$"),
        writes=("data/videos/WORLD.json", "outputs/video/checkpoints/step_00000002/model.safetensors",
                "outputs/video/eval/step_00000002/eval/vqa.json"),
    ),
    ReadmeCommand(
        ".venv/bin/python scripts/video_demo.py --skip-train",
        here=".venv/bin/python scripts/video_demo.py --skip-train --eval-options evaluation.vqa.max_samples=40",
        why="40 of the test questions",
        prints=(r"^\| `outputs/video` \| 0\.\d{3} \|", r"run\.overwrite: the earlier evaluation in outputs/video/eval/"),
    ),    ReadmeCommand(
        "make gpu-check",
        prints=(r"^gpu_tests\s+rc=0\s", r"^throughput\s+rc=[1-9]", r"^finetune_memory\s+rc=[1-9]", r"^--- summary \(logs in gpu_check/\)$"),
        writes=("gpu_check/summary.txt", "gpu_check/environment.txt", "gpu_check/gpu_tests.log"),
        env={"OUT": "", "GPU_PYTHON": ".venv/bin/python"},  # the script's own folder; the checkout's Python
    ),
    ReadmeCommand(
        "make gpu-wheels",
        here=".venv/bin/python -c 'import sys; sys.path.insert(0, \"scripts\"); import gpu_wheels; "
             "print(sorted(gpu_wheels.closure(gpu_wheels.ROOTS)))'",
        why="it downloads from PyPI and the tests run offline: the packages it would download",
        prints=(r"'transformers'", r"'peft'", r"'omegaconf'", r"(?s)\A(?!.*'torch')"),
    ),
]


# The README's Qwen-VL release commands run on the tiny Qwen-VL of tests/fixtures/qwen_vl_tiny written as a
# release under models/ (the README's /models/), trained on the demo's conversations on one CPU process.
STANDIN = "models/"
TINY_QWEN = ("model.vision.image_size=128", "'model.vision.model_kwargs={patch_size: 4, embed_dim: 32, depth: 2, "
             "num_heads: 2, mlp_ratio: 4.0, pre_norm: true, final_norm: false}'", "model.vision.gradient_checkpointing=false",
             "model.llm.gradient_checkpointing=false", "model.llm.dtype=float32", "model.llm.config=null",
             "run.strategy=single", "run.precision=fp32", *TINY)
ON_DEMO_DATA = "datasets.conversations.ann_path=data/synthetic/sft_train.json datasets.conversations.image_root=data/synthetic"


def finetune(mode: str) -> str:
    return (f".venv/bin/python train.py --cfg-path projects/qwen_vl/finetune_{mode}.yaml --options "
            f"model.llm.pretrained=models/qwen_vl_chat_lavis {ON_DEMO_DATA} {' '.join(TINY_QWEN)}")


RELEASE_COMMANDS = [
    ReadmeCommand(
        ".venv/bin/python -m lavis.convert from-qwen-vl /models/Qwen-VL-Chat /models/qwen_vl_chat_lavis",
        here=".venv/bin/python -m lavis.convert from-qwen-vl models/Qwen-VL-Chat models/qwen_vl_chat_lavis",
        why="the tiny Qwen-VL fixture as the release", release=True,
        writes=tuple(f"models/qwen_vl_chat_lavis/{f}" for f in ("config.json", "vision.safetensors", "adapter.safetensors",
                                                                "qwen.tiktoken")),
    ),
    ReadmeCommand(
        ".venv/bin/torchrun --standalone --nproc_per_node 8 train.py --cfg-path projects/qwen_vl/finetune_lora.yaml "
        "--options model.llm.pretrained=/models/qwen_vl_chat_lavis datasets.conversations.ann_path=/data/my_conversations.json "
        "datasets.conversations.image_root=/data/my_images",
        here=finetune("lora"), why="8 GPUs: the tiny release on one CPU process, on the demo's conversations", release=True,
        prints=(r"^llm\s+lora r=64\s", r"^adapter\s+frozen\s"),
        writes=("outputs/qwen_vl/finetune_lora/checkpoints/step_00000002/meta.json",),
    ),
    ReadmeCommand(".venv/bin/python -m lavis.export outputs/qwen_vl/finetune_lora /models/my_lora --format qwen-vl",
                  here=".venv/bin/python -m lavis.export outputs/qwen_vl/finetune_lora models/my_lora --format qwen-vl",
                  why="models/ for /models/", release=True,
                  writes=("models/my_lora/model.safetensors", "models/my_lora/qwen_vl/config.json",
                          "models/my_lora/qwen_vl/qwen.tiktoken")),
    ReadmeCommand(
        ".venv/bin/torchrun --standalone --nproc_per_node 8 evaluate.py --cfg-path projects/eval/qwen_vl_suite.yaml "
        "--options model.llm.pretrained=/models/qwen_vl_chat_lavis",
        here=".venv/bin/python evaluate.py --cfg-path projects/eval/qwen_vl_suite.yaml --options "
             "model.llm.pretrained=models/qwen_vl_chat_lavis; test $? = 2",
        why="no benchmark files here: on the tiny release it stops at start (exit 2) naming every missing file and where "
            "it is published; tests/test_suite.py runs the whole suite on a tiny file of each released format",
        release=True,
        prints=(r"^  evaluation\.gqa\.ann_path: /data/gqa/testdev_balanced_questions\.json \(released at https://cs\.stanford",
                r"^  evaluation\.mmbench_dev\.ann_path: /data/mmbench/mmbench_dev_20230712\.tsv \(released at https://github",
                r"^  evaluation\.refcocog_test\.refs_path: /data/refcocog/refs\(umd\)\.p"),
    ),
    ReadmeCommand(
        ".venv/bin/python -m lavis.convert to-qwen-vl outputs/qwen_vl/finetune_full /models/my_full_qwen_vl "
        "--code-from /models/Qwen-VL-Chat",
        here=f"{finetune('full')} && .venv/bin/python -m lavis.convert to-qwen-vl outputs/qwen_vl/finetune_full "
             "models/my_full_qwen_vl --code-from models/Qwen-VL-Chat",
        why="after a two-step finetune_full run of the tiny release (models/ for /models/)", release=True,
        prints=(r"^vision\s+frozen\s",), writes=("models/my_full_qwen_vl/config.json", "models/my_full_qwen_vl/modeling_qwen.py"),
    ),
    ReadmeCommand("pip wheel --no-deps -w dist .",
                  here=".venv/bin/python -m pip wheel --no-deps --no-build-isolation --no-index -q -w dist .",
                  why="offline: no build isolation (it would fetch setuptools); tests/test_install.py installs the wheel",
                  writes=("dist/lavis_qwenvl-0.1.0-py3-none-any.whl",)),
    ReadmeCommand("pip install dist/lavis_qwenvl-0.1.0-py3-none-any.whl",
                  here="test -f dist/lavis_qwenvl-0.1.0-py3-none-any.whl",
                  why="it would replace this interpreter's editable install: tests/test_install.py installs the wheel "
                      "into a fresh venv and runs the commands below from a directory outside the checkout"),
    ReadmeCommand("lavis-train --list-projects", here=".venv/bin/python -m lavis.cli.train --list-projects",
                  why="the console script comes with the wheel (tests/test_install.py runs it): the same command by module",
                  prints=(r"^projects: \S+/projects$", r"^  projects/pretrain\.yaml$")),
    ReadmeCommand("lavis-train --cfg-path projects/pretrain.yaml",
                  here="mkdir -p elsewhere && cd elsewhere && "
                       + tiny("../.venv/bin/python -m lavis.cli.train --cfg-path projects/pretrain.yaml"),
                  why="as lavis-train (tests/test_install.py runs the installed one), from a directory with no projects/",
                  writes=("elsewhere/outputs/pretrain/checkpoints/step_00000002/model.safetensors",)),
]


# The README's Qwen2-VL commands run on a tiny random Qwen2.5-VL (tests/hf_qwen2_vl.py) written as a release under
# models/, fine-tuned on the demo's LLaVA-format conversations on one CPU process.
TINY_QWEN2_5_VL = ("model.llm.config=null", "model.vision.config=null", "model.vision.dtype=float32", "model.llm.dtype=float32",
                   "datasets.conversations.ann_path=data/synthetic/llava_train.json", "datasets.conversations.image_root=data/synthetic",
                   "run.strategy=single", "run.precision=fp32", "run.grad_accum=1", "run.max_len=1024", *TINY)
HF_COMMANDS = [
    ReadmeCommand(
        ".venv/bin/python -m lavis.convert from-hf /models/Qwen2.5-VL-7B-Instruct /models/qwen2_5_vl_7b_lavis",
        here=".venv/bin/python -m lavis.convert from-hf models/Qwen2.5-VL-7B-Instruct models/qwen2_5_vl_7b_lavis",
        why="a tiny random Qwen2.5-VL as the release (models/ for /models/)",
        writes=tuple(f"models/qwen2_5_vl_7b_lavis/{f}" for f in ("config.yaml", "meta.json", "model.safetensors", "tokenizer.json")),
    ),
    ReadmeCommand(
        ".venv/bin/python -m lavis.chat --ckpt /models/qwen2_5_vl_7b_lavis --image photo.jpg --query What is in the picture?",
        here='.venv/bin/python -m lavis.chat --ckpt models/qwen2_5_vl_7b_lavis --image data/synthetic/images/test/000000.png '
             '--query "What is in the picture?" --max-new-tokens 4',
        why="the tiny model's answer is noise: it runs, on a picture of the demo's world",
        prints=(r"loaded \S*models/qwen2_5_vl_7b_lavis/model\.safetensors",),
    ),
    ReadmeCommand(
        ".venv/bin/torchrun --standalone --nproc_per_node 8 train.py --cfg-path projects/qwen2_5_vl/finetune_lora.yaml "
        "--options model.llm.pretrained=/models/Qwen2.5-VL-7B-Instruct datasets.conversations.ann_path=/data/llava_style.json "
        "datasets.conversations.image_root=/data/images",
        here=".venv/bin/python train.py --cfg-path projects/qwen2_5_vl/finetune_lora.yaml --options "
             f"model.llm.pretrained=models/Qwen2.5-VL-7B-Instruct {' '.join(TINY_QWEN2_5_VL)}",
        why="8 GPUs: the tiny release at its own sizes on one CPU process, on the demo's LLaVA-format conversations",
        prints=(r"^llm\s+lora r=64\s", r"^vision\s+frozen\s"),
        writes=("outputs/qwen2_5_vl/finetune_lora/checkpoints/step_00000002/meta.json",),
    ),
    ReadmeCommand(".venv/bin/python -m lavis.convert to-hf outputs/qwen2_5_vl/finetune_lora /models/my_qwen2_5_vl",
                  here=".venv/bin/python -m lavis.convert to-hf outputs/qwen2_5_vl/finetune_lora models/my_qwen2_5_vl",
                  why="models/ for /models/",
                  writes=("models/my_qwen2_5_vl/config.json", "models/my_qwen2_5_vl/tokenizer.json",
                          "models/my_qwen2_5_vl/preprocessor_config.json")),
]

@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A copy of the repository with the world generated, a ``.venv`` of this interpreter and stand-ins
    for Slurm's commands; ``make demo`` has not run yet."""
    from lavis.datasets.synthetic.world import ensure_world

    root = tmp_path_factory.mktemp("readme")
    for name in COPIED:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, root / name)
    ensure_world(root / "data" / "synthetic", sizes=WORLD_SIZES)
    bins = {"python": f'exec {sys.executable} "$@"', "torchrun": f'exec {sys.executable} -m torch.distributed.run "$@"'}
    for folder, scripts in ((root / ".venv" / "bin", bins), (root / "fake_slurm", FAKE_SLURM)):
        folder.mkdir(parents=True)
        for name, body in scripts.items():
            (folder / name).write_text(f"#!/bin/sh\n{body}\n")
            (folder / name).chmod(0o755)
    (root / ".venv" / ".installed").touch()  # the Makefile's install step: this interpreter is installed
    return root


def run_in(checkout: Path, command: str, stdin: str | None = None, env: dict[str, str] | None = None) -> str:
    environment = {**os.environ, "PATH": f"{checkout / 'fake_slurm'}:{os.environ['PATH']}", **(env or {})}
    proc = subprocess.run(["bash", "-c", command], cwd=checkout, input=stdin, capture_output=True, text=True,
                          timeout=600, env=environment)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{command}\nexited with {proc.returncode}:\n{output[-4000:]}"
    return output


def test_every_readme_command_has_a_check():
    listed = [c.command for c in README_COMMANDS + RELEASE_COMMANDS + HF_COMMANDS]
    assert len(set(listed)) == len(listed)
    assert set(readme_commands()) == set(listed), "README commands without a check (or checks of commands gone)"
    for c in README_COMMANDS + RELEASE_COMMANDS + HF_COMMANDS:
        assert (c.here is None) == (not c.why), c.command


def test_readme_commands_run_and_print_what_the_readme_says(checkout):
    """The commands in README order (the order a reader follows), then the README's Python examples."""
    run_in_readme_order(checkout, README_COMMANDS)
    check_outputs(checkout)
    check_python_examples(checkout)


def run_in_readme_order(checkout: Path, commands: list[ReadmeCommand]) -> None:
    order = {command: i for i, command in enumerate(readme_commands())}
    for c in sorted(commands, key=lambda c: order[c.command]):
        output = run_in(checkout, c.shell(), c.stdin, c.env)
        for pattern in c.prints:
            assert re.search(pattern, output, flags=re.M), f"{c.shell()}\ndoes not print /{pattern}/:\n{output[-4000:]}"
        for path in c.writes:
            assert (checkout / path).exists(), f"{c.shell()}\ndid not write {path}:\n{output[-4000:]}"


def test_readme_release_commands_run_on_the_tiny_qwen_vl(checkout):
    """Convert a Qwen-VL release, fine-tune it with LoRA and fully (finetune.py's modes), and write both
    back in Qwen-VL's layout, as the README's commands do, on the tiny Qwen-VL of the parity fixture."""
    from helpers import FIXTURE, regenerate, tokenizer_file, write_release

    from lavis.interop.convert.release import CODE_FILES

    config = json.loads((FIXTURE / "config.json").read_text())
    state = regenerate()["random_original_state"](config, json.loads((FIXTURE / "fixture.json").read_text())["seed"])
    release = write_release(checkout / "models" / "Qwen-VL-Chat", config, state, tokenizer_file())
    for name in CODE_FILES:  # stand-ins for Qwen-VL's Python files, which --code-from copies
        (release / name).write_text(f"# {name} of the release\n")
    run_in_readme_order(checkout, RELEASE_COMMANDS)
    written = json.loads((checkout / "models" / "my_lora" / "qwen_vl" / "config.json").read_text())
    assert {k: written[k] for k in ("hidden_size", "num_hidden_layers")} == {k: config[k] for k in ("hidden_size", "num_hidden_layers")}


def test_readme_qwen2_vl_commands_run_on_a_tiny_qwen2_5_vl(checkout):
    """Convert a Qwen2.5-VL release, chat with it, fine-tune it with projects/qwen2_5_vl/finetune_lora.yaml and
    write the run back in transformers' layout, as the README's commands do, on a tiny random Qwen2.5-VL."""
    from hf_qwen2_vl import tiny_checkpoint
    from transformers import Qwen2_5_VLForConditionalGeneration

    tiny_checkpoint(checkout / "models" / "Qwen2.5-VL-7B-Instruct", "qwen2_5_vl", "released")
    run_in_readme_order(checkout, HF_COMMANDS)
    back = Qwen2_5_VLForConditionalGeneration.from_pretrained(checkout / "models" / "my_qwen2_5_vl")
    assert back.config.text_config.hidden_size == 64

def check_outputs(checkout: Path) -> None:
    """What the commands wrote holds what the README says."""
    ablation = yaml.safe_load((checkout / "outputs/sft_q16/config.yaml").read_text())
    assert ablation["model"]["adapter"]["num_queries"] == 16
    assert (ablation["run"]["lr"], ablation["run"]["min_lr"], ablation["run"]["betas"]) == (2e-4, 2e-5, [0.9, 0.95])
    raw = json.loads((checkout / "outputs/multitask/eval/step_00000002/vqa/vqa.json").read_text())
    assert raw["model"] == "outputs/multitask" and raw["metrics"]["count"] == len(raw["predictions"]) == 16
    first = raw["predictions"][0]  # the stage-2 model asked as it was trained: Qwen-VL's raw prompt, no chat turn
    assert first["prompt"] == f"<img>{first['image']}</img>{first['question']} Answer:"
    chat = json.loads((checkout / "outputs/sft/eval/step_00000002/demo/vqa.json").read_text())["predictions"][0]  # the demo's chat model
    assert chat["prompt"] == f"Picture 1: <img>{chat['image']}</img>\n{chat['question']}"
    exported = load_file(str(checkout / "exported/fsdp/model.safetensors"))
    assert len(exported) > 50 and {t.dtype for t in exported.values() if t.is_floating_point()} == {torch.bfloat16}


def check_python_examples(checkout: Path) -> None:
    """The inference example runs as written; the adapter of "Adding a component" is one file, one
    import and one YAML, and then trains through ``--options``."""
    inference, _, component = readme_blocks("python")  # the second, the API's client, runs with lavis.serve
    run_in(checkout, f"{sys.executable} -", stdin=inference + "\nprint('RESPONSE', repr(response))\n")
    assert (checkout / "boxes.png").exists()

    (component_yaml,) = [b for b in readme_blocks("yaml") if b.startswith("# configs/models/adapters/")]
    module = checkout / component.split()[1]
    module.write_text(component)
    with open(module.parent / "__init__.py", "a") as init:
        init.write(f"from . import {module.stem}  # noqa: F401\n")
    (checkout / component_yaml.split()[1]).write_text(component_yaml)
    options = re.search(r"Then `--options ([^`]*)`", README.read_text()).group(1)
    output = run_in(checkout, tiny(f".venv/bin/python train.py --cfg-path projects/sft.yaml --options {options} "
                                   "run.output_dir=outputs/avg_pool"))
    assert "trained to step 2" in output
    config = yaml.safe_load((checkout / "outputs/avg_pool/config.yaml").read_text())
    assert config["model"]["adapter"] == {"type": "avg_pool", "side": 6}
