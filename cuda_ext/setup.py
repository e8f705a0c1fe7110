"""Prebuild the fused fake-quant extension on a CUDA machine: `pip install --no-build-isolation ./cuda_ext`.

Without a prebuilt module, omniq_lightning JIT-compiles the same sources on first CUDA use and caches
the build (torch.utils.cpp_extension, TORCH_EXTENSIONS_DIR). Both builds take their flags from
omniq_lightning.quant.cuda, so they cannot drift apart (omniq-lightning must be installed first).
"""

from pathlib import Path

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CUDAExtension

from omniq_lightning.quant.cuda import CXX_FLAGS, EXT_NAME, NVCC_FLAGS

here = Path(__file__).resolve().parent

setup(
    name="omniq-lightning-cuda",
    version="0.1.0",
    ext_modules=[
        CUDAExtension(
            name=EXT_NAME,
            sources=[str(here / "fake_quant.cu")],
            include_dirs=[str(here)],
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)
