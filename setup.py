from setuptools import find_packages, setup

setup(
    name="megarl",
    version="0.1.0",
    description=(
        "Megatron-core RL post-training backend with vocab-parallel entropy control "
        "(Clip-Cov, KL-Cov, SIREN, AER) and SGLang rollout"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megarl", "megarl.*"]),
    package_data={"megarl": ["eval/BENCHMARKS.md"]},
    install_requires=[
        # torch is not pinned: take the build that fits the machine (CPU or CUDA) before megarl.
        "torch>=2.6",
        # megarl's CPU mode (megarl/platform.py) is written for this minor version.
        "megatron-core>=0.16.1,<0.17",
        "omegaconf>=2.3",
        "transformers>=4.51",
        "safetensors>=0.4",
        "numpy",
        "psutil",          # megatron dist_checkpointing, memory reporting
        "tqdm",
        "aiohttp>=3.9",    # async rollout client, CPU dev server
        "math-verify>=0.7",
        "sglang-router>=0.3,<0.4",
        "pyarrow",         # parquet datasets
        "tensorboard",
        "matplotlib",
    ],
    extras_require={
        "gpu": [
            "transformer-engine[pytorch]>=2.9",
            "sglang==0.5.23",   # the HTTP protocol megarl speaks is recorded from this version
            "flash-attn",
        ],
        "wandb": ["wandb"],
        "test": ["pytest>=8", "pytest-timeout", "hypothesis>=6"],
    },
    entry_points={"console_scripts": ["megarl=megarl.cli:main"]},
)
