from setuptools import find_packages, setup

setup(
    name="lavis-qwenvl",
    version="0.1.0",
    description="A LAVIS-style framework for training Qwen-VL-style vision-language models",
    packages=find_packages(include=["lavis", "lavis.*"]),
    package_data={"lavis": ["assets/*", "assets/**/*"]},
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
    ],
    extras_require={"dev": ["pytest", "ruff", "hypothesis", "openai", "selenium"]},
)
