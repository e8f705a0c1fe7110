"""Prebuild the fused fake-quant extension on a CUDA machine: `pip install --no-build-isolation ./cuda_ext`.

Without a prebuilt module, omniq_lightning JIT-compiles the same sources on first CUDA use and caches
the build (torch.utils.cpp_extension, TORCH_EXTENSIONS_DIR).
"""

from pathlib import Path

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CUDAExtension

here = Path(__file__).resolve().parent

setup(
    name="omniq-lightning-cuda",
    version="0.1.0",
    ext_modules=[
        CUDAExtension(
            name="omniq_lightning_cuda",
            sources=[str(here / "fake_quant.cu")],
            include_dirs=[str(here)],
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-std=c++17"]},
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)
