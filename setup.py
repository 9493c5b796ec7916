import re

from setuptools import find_packages, setup


# The transformers releases the test suite passed on, kept beside the code that depends on their internals.
TESTED_TRANSFORMERS = re.search(
    r'^TESTED_TRANSFORMERS = "(.+)"$', open("ort_trainer/transformers_compat.py", encoding="utf-8").read(), re.M
).group(1)
ONNXSCRIPT = "onnxscript>=0.7"  # the dynamo ONNX exporter, used by the compile backend
EXAMPLES = [
    "datasets>=3",
    "evaluate>=0.4",
    "scikit-learn",
    "scipy",
    "seqeval",
    "sacrebleu>=2",
    "tokenizers",
    "sentencepiece",
]

setup(
    name="ort_trainer",
    version="0.1.0",
    description=(
        "Hugging Face fine-tuning with ONNX Runtime: ORTTrainer and Seq2SeqORTTrainer "
        "for today's torch and transformers"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["ort_trainer", "ort_trainer.*"]),
    python_requires=">=3.10,<3.13",
    install_requires=[
        "torch>=2.5",
        f"transformers{TESTED_TRANSFORMERS}",
        "accelerate>=1.0",
        "numpy",
        "packaging",
        "coloredlogs",
    ],
    extras_require={
        # Pick one ONNX Runtime build: they all install the `onnxruntime` module and conflict with each other.
        "training-cpu": ["onnxruntime-training-cpu==1.19.2", "ninja", ONNXSCRIPT],  # ninja builds ORT's C++ extension
        "training-gpu": ["onnxruntime-training==1.19.2", "ninja", ONNXSCRIPT],  # CUDA 11.8, Python <= 3.11
        # The compile backend: training in any current onnxruntime build (no onnxruntime-training).
        "compile": ["onnxruntime>=1.19", ONNXSCRIPT],
        "compile-gpu": ["onnxruntime-gpu>=1.19", ONNXSCRIPT],
        "inference": ["onnxruntime>=1.17"],
        "inference-gpu": ["onnxruntime-gpu>=1.17"],
        "examples": EXAMPLES,
        "benchmark": EXAMPLES + ["matplotlib"],
        "tests": EXAMPLES + ["matplotlib", "pytest", "ruff==0.17.6", ONNXSCRIPT],
    },
    # `torch.compile(model, backend="onnxruntime")` finds the compile backend without importing ort_trainer first.
    entry_points={"torch_dynamo_backends": ["onnxruntime = ort_trainer.compile_backend:onnxruntime_backend"]},
)
