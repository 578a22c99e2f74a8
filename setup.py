from setuptools import find_packages, setup

# torch is a requirement, but install the CPU or CUDA wheel you want *first*
# (`make test` installs torch==2.13.0 when none is present): a bare `torch` pulls a CUDA build.
# megatron-core >= 0.17 requires Python >= 3.12: 0.16.1 below it, 0.17-0.19.x from it on
# (lss_plugin/megatron/compat.py says what each release needs; CI tests 0.16.1 and 0.19.2).
MEGATRON_CORE = [
    "megatron-core==0.16.1; python_version < '3.12'",
    "megatron-core>=0.17,<0.20; python_version >= '3.12'",
]
EXTRAS = {
    "megatron": MEGATRON_CORE,
    "deepspeed": ["deepspeed==0.19.8"],
    # Tested: transformers 5.24.0, accelerate 1.15.0 (LSSTrainer hooks Accelerator._prepare_deepspeed).
    "hf": ["transformers>=5,<6", "accelerate>=1.15,<2", "deepspeed==0.19.8"],
    "bench": ["matplotlib>=3.7", *MEGATRON_CORE, "deepspeed==0.19.8", "einops"],
    "demo": ["matplotlib>=3.7", "psutil", *MEGATRON_CORE],  # psutil: the demo's per-rank peak RSS
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
