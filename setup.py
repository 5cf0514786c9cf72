from setuptools import find_packages, setup

setup(
    name="peft-dp-saliency",
    version="0.1.0",
    description=(
        "Differentially private saliency-aware LoRA fine-tuning (DP-SAPF) of text-to-image "
        "diffusion models, in the Hugging Face ecosystem."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    package_dir={"": "src"},
    packages=find_packages("src"),
    include_package_data=True,
    package_data={"peft_dp_saliency.public_model": ["weights/**/*", "*.json"]},
    python_requires=">=3.10",
    install_requires=[
        # GPU users install their CUDA build of torch first (README); 2.13.0 (CPU) satisfies this.
        "torch>=2.2,<3",
        "diffusers>=0.32",
        "transformers>=4.45",
        "peft>=0.14",
        "accelerate>=1.0",
        "datasets>=3.0",
        "opacus>=1.5",
        "safetensors>=0.4",
        "huggingface-hub>=0.26",
        "dp-accounting>=0.4.4",
        "torchmetrics>=1.4",
        "scipy>=1.10",
        "numpy>=1.24",
        "pillow>=10",
        "tqdm>=4.66",
    ],
    extras_require={"dev": ["pytest>=8", "pytest-timeout>=2"]},
)
