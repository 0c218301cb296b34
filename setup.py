from setuptools import find_packages, setup

SHIPPED = {"lavis.shipped.configs": "configs", "lavis.shipped.projects": "projects"}
# Console scripts beside `python train.py`, `python evaluate.py` and `python -m lavis.<name>`.
COMMANDS = {
    "train": "lavis.cli.train",
    "evaluate": "lavis.cli.evaluate",
    **{name: f"lavis.{name}" for name in ("serve", "web", "chat", "convert", "export", "plot")},
}

setup(
    name="lavis-qwenvl",
    version="0.1.0",
    description="A LAVIS-style framework for training Qwen-VL-style vision-language models",
    # The top-level configs/ and projects/ (one copy, in git, where users look for them) ship inside the
    # package as lavis/shipped/{configs,projects}, side by side as in the checkout so that a project's
    # `base: [../configs/...]` resolves in both; lavis/common/resources.py finds whichever is there.
    packages=find_packages(include=["lavis", "lavis.*"]) + list(SHIPPED),
    package_dir=SHIPPED,
    package_data={
        "lavis": ["assets/*", "assets/**/*"],  # the embedded tokenizer
        **{package: ["*", "**/*"] for package in SHIPPED},
    },
    entry_points={"console_scripts": [f"lavis-{name}={module}:main" for name, module in COMMANDS.items()]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "torchvision",
        "timm>=1.0",
        "transformers>=4.45",
        "tokenizers",
        "tiktoken",
        "omegaconf>=2.3",
        "webdataset",
        "pillow",
        "safetensors",
        "tqdm",
        "numpy",
        "pycocoevalcap",
        "matplotlib",
        "peft",
        "wandb",  # experiment tracking (run.wandb), TensorBoard as the second logger
        "tensorboard",
        "gradio",  # python -m lavis.web
        "fastapi",  # python -m lavis.serve (OpenAI-compatible API)
        "uvicorn",
        "av",  # PyAV: video decoding in the data workers (qwen2_vl_video)
    ],
    extras_require={"dev": ["pytest", "ruff", "hypothesis", "openai", "selenium", "import-linter>=2.0"]},
)
