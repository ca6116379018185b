"""fsam_kernels: SAM and Functional-SAM optimizers on fused multi-tensor kernels.

Building needs no torch: the native libraries (csrc/) are plain C++ / CUDA C++
behind a C API, loaded with ctypes at run time.
"""
from setuptools import find_packages, setup

setup(
    name="fsam_kernels",
    version="0.1.0",
    description="SAM, Functional-SAM and preconditioned variants on fused multi-tensor kernels",
    packages=find_packages(include=["fsam_kernels", "fsam_kernels.*"]),
    python_requires=">=3.9",
    install_requires=["numpy", "tqdm", "tokenizers", "matplotlib"],
    entry_points={
        "console_scripts": [
            "fsam-train=fsam_kernels.lm.train:main",
        ]
    },
)
