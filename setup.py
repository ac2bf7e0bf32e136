"""ldm_jax: Latent Diffusion Models in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="ldm_jax",
    version="0.1.0",
    description="Latent Diffusion Models (Rombach et al., CVPR 2022) in JAX/Flax",
    packages=find_packages(include=["ldm_jax", "ldm_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        # Upper bounds: the next minor series is untested (constraints.txt holds the exact tested versions).
        "jax>=0.7,<0.11",
        "flax>=0.11,<0.13",
        "optax<0.3",
        "orbax-checkpoint<0.13",
        "ml_collections",
        "clu",
        "einops",
        "numpy",
        "scipy",
        "transformers",
        "tokenizers",
        "absl-py",
        "pillow",
        "tqdm",
        "tensorboard",
        # clu's metric writers and tfds.load import TensorFlow; the CPU build is the usual companion of JAX.
        "tensorflow-cpu",
        "tensorflow-datasets",
        "grain>=0.2.12,<0.3",  # parallel input pipeline (data.num_workers)
        "array_record",  # packed shards (python -m ldm_jax.data.pack)
        "importlib_resources",
    ],
    extras_require={
        # Parity tests against the PyTorch reference implementations (torch 2.13.0 is a local CPU wheel here).
        "test": ["pytest", "ruff", "psutil", "scikit-image", "torch==2.13.0", "diffusers", "safetensors", "matplotlib",
                 "nbclient", "nbformat", "ipykernel"],
        "convert": ["torch", "safetensors"],
    },
)
