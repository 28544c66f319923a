"""fastseg: fused-kernel semantic segmentation (GSS, ECENet, PADing, SemPLeS, S4MIM) with export and benchmarks."""

import re
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "fastseg" / "version.py").read_text()).group(1)

# `kernels/` is installed as `fastseg.kernels`: a top-level `kernels` would clash with an existing PyPI distribution.
SUBPACKAGES = [
    "layers",
    "models",
    "data",
    "data.datasets",
    "engine",
    "engine.recipes",
    "metrics",
    "export",
    "bench",
    "bench.cases",
    "experiments",
    "cli",
]

setup(
    name="fastseg",
    version=VERSION,
    description=__doc__,
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else __doc__,
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["fastseg", "fastseg.kernels"] + [f"fastseg.{name}" for name in SUBPACKAGES],
    package_dir={"fastseg": "fastseg", "fastseg.kernels": "kernels"},
    package_data={"fastseg.export": ["*.txt"]},
    install_requires=[
        "torch>=2.4",
        "torchvision",
        "timm>=1.0",
        "safetensors>=0.4",
        "numpy",
        "pillow",
        "tqdm",
        "scipy",  # Mask2Former's Hungarian matcher (linear_sum_assignment)
        # Triton runs the fused kernels on CUDA and, with TRITON_INTERPRET=1, on the CPU in tests.
        "triton>=3.0; platform_system == 'Linux'",
    ],
    extras_require={
        "export": ["onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.1"],
        "coco": ["pycocotools>=2.0"],  # mask AP and the COCO panoptic / instance writers
        # SemPLeS: CLIP architectures and the bundled BPE tokenizer (weights only from local files).
        "semples": ["open_clip_torch>=2.20"],
        # The optional dense CRF of the pseudo masks (imported as pydensecrf). It builds from source (Cython and a C++
        # compiler), so the test extra leaves it out.
        "crf": ["pydensecrf2>=1.1"],
        "bench": ["pytest>=8", "pytest-benchmark>=4", "matplotlib", "faiss-cpu"],
        # Real datasets on disk: SBD's .mat annotations (scipy) and COCO polygons / RLE (pycocotools).
        "data": ["scipy", "pycocotools"],
        "test": [
            "pytest>=8",
            "pytest-benchmark>=4",
            "torchmetrics>=1.0",
            "pycocotools>=2.0",
            "onnx>=1.16",
            "onnxruntime>=1.18",
            "onnxscript>=0.1",
            "matplotlib",
            "faiss-cpu",
            # GSS's DALL-E dVAE is checked against the official package (its metadata omits attrs).
            "dall-e",
            "attrs",
            # The dataset readers' fixtures: SBD .mat files and COCO RLE / polygons.
            "scipy",
            "pycocotools",
            # SemPLeS' frozen CLIP and PADing's clip:CHECKPOINT class embeddings (open_clip; offline tokenizer).
            "open_clip_torch>=2.20",
            # Lint / format (pyproject.toml) and the type check of fastseg/export/tensorrt.py. The TensorRT stubs
            # (tensorrt-stubs) are not listed: they require the tensorrt wheel itself, and in site-packages they make
            # `import tensorrt` succeed; scripts/typecheck_tensorrt.py installs them outside sys.path instead.
            "ruff>=0.6",
            "mypy>=1.10",
            "pre-commit",
        ],
    },
    entry_points={"console_scripts": ["fastseg = fastseg.cli:main"]},
)
