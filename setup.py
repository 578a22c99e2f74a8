from setuptools import find_packages, setup

# torch is a requirement, but install the CPU or CUDA wheel you want *first*
# (`make test` installs torch==2.13.0 when none is present): a bare `torch` pulls a CUDA build.
EXTRAS = {
    "megatron": ["megatron-core==0.16.1"],
    "deepspeed": ["deepspeed==0.19.8"],
    # Tested: transformers 5.24.0, accelerate 1.15.0 (LSSTrainer hooks Accelerator._prepare_deepspeed).
    "hf": ["transformers>=5,<6", "accelerate>=1.15,<2", "deepspeed==0.19.8"],
    "bench": ["matplotlib>=3.7", "megatron-core==0.16.1", "deepspeed==0.19.8", "einops"],
    "demo": ["matplotlib>=3.7", "megatron-core==0.16.1"],
    "dev": ["pytest>=8", "pytest-timeout>=2.3", "hypothesis>=6.100"],
}
EXTRAS["all"] = sorted({req for reqs in EXTRAS.values() for req in reqs})

setup(
    name="lss_plugin",
    version="0.1.0",
    description="LSS (Long Short-Sequence) sequence parallelism for Megatron-core, DeepSpeed and transformers",
    packages=find_packages(include=["lss_plugin", "lss_plugin.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "tqdm"],
    extras_require=EXTRAS,
)
