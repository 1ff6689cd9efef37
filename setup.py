from setuptools import find_packages, setup

setup(
    name="epic-vlp",
    version="0.1.0",
    description="EPIC (per image-token consistency) vision-language pretraining at scale with DeepSpeed",
    python_requires=">=3.10",
    packages=find_packages(include=["epic", "epic.*"]),
    package_data={"epic": ["configs/*.yaml"]},
    install_requires=[
        "torch>=2.4",
        "torchvision",
        "deepspeed>=0.14",
        "transformers>=4.40",
        "timm>=1.0",
        "webdataset>=0.2.86",
        "pyyaml",
        "tensorboard",
        "tokenizers",
        "pillow",
        "safetensors",
        "tqdm",
        "numpy",
        "matplotlib",
    ],
    extras_require={"test": ["pytest", "pytest-timeout", "pytest-xdist", "scipy", "hypothesis", "import-linter"]},
)
