"""Compile the real torch bindings (``cuda_ext/fake_quant.cu``) the way torch's cpp_extension would: compile only.

    python cuda_ext/check_bindings.py            # CI runs this; exits non-zero if the bindings do not compile
    python cuda_ext/check_bindings.py --arch 80 90

The CPU wheel of torch ships the CUDA headers except one file generated at build time
(``c10/cuda/impl/cuda_cmake_macros.h``), so the include tree of the CUDA wheel of the *installed* torch
version is fetched once from PyPI (about 500 MB downloaded, 62 MB kept) and cached in
``$OMNIQ_CACHE_DIR`` (default ``~/.cache/omniq-lightning``). The flags are torch's own nvcc flags, the
project's (``omniq_lightning.quant.cuda.NVCC_FLAGS``, shared with the JIT and prebuilt builds) and
torch's default C++ standard unless the project's flags set one. Using a C++20 feature of torch's headers
under an older standard (nvcc diagnostic 3306) is an error here, so a forced ``-std=c++17`` fails CI.
A compile that passed is remembered by a stamp of (sources, flags, torch, nvcc), so unchanged sources
are not compiled again.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

import torch
from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from omniq_lightning.quant.cuda import EXT_NAME, NVCC_FLAGS  # noqa: E402

TORCH_DEFAULT_STD = "-std=c++20"  # what torch >= 2.13's cpp_extension adds when the caller sets no -std=
CXX_STANDARD_DIAGNOSTIC = "3306"  # "a default bit-field initializer is a C++20 feature"
SOURCES = ("fake_quant.cu", "fake_quant.cuh", "vq.cuh")


def cache_root() -> Path:
    return Path(os.environ.get("OMNIQ_CACHE_DIR", Path.home() / ".cache" / "omniq-lightning"))


def torch_release() -> str:
    return torch.__version__.split("+")[0]


def cuda_include_tree(version: str) -> Path:
    """``torch/include`` of the CUDA wheel of torch ``version`` (downloaded and cached on first use)."""
    dest = cache_root() / f"torch-{version}-cuda-include"
    if (dest / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}  # local find-links hold the CPU build
        cmd = [sys.executable, "-m", "pip", "download", "--isolated", "--no-deps", "--only-binary=:all:",
               "--python-version", f"{sys.version_info.major}.{sys.version_info.minor}",
               "--platform", "manylinux_2_28_x86_64", f"torch=={version}", "-d", tmp]
        cert = "/etc/ssl/certs/ca-certificates.crt"
        if os.path.isfile(cert):
            cmd[4:4] = ["--cert", cert]
        print(f"fetching the include tree of the CUDA build of torch {version} (once) ...", flush=True)
        subprocess.run(cmd, check=True, env=env)
        wheels = list(Path(tmp).glob("torch-*.whl"))
        if not wheels or "+cpu" in wheels[0].name:
            raise SystemExit(f"no CUDA wheel of torch {version} was downloaded (got {[w.name for w in wheels]})")
        staged = Path(tmp) / "include"
        with zipfile.ZipFile(wheels[0]) as z:
            for name in z.namelist():
                if name.startswith("torch/include/"):
                    z.extract(name, Path(tmp) / "unzipped")
        shutil.move(str(Path(tmp) / "unzipped" / "torch" / "include"), staged)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(staged, dest)  # the cache entry exists only once complete
    return dest


def nvcc_command(include: Path, arch: str, out: Path) -> list[str]:
    flags = [*COMMON_NVCC_FLAGS, *NVCC_FLAGS]
    if not any(f.startswith("-std=") for f in flags):
        flags.append(TORCH_DEFAULT_STD)
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [
        "nvcc", "-c", str(HERE / "fake_quant.cu"), "-o", str(out), f"-arch=sm_{arch}", *flags,
        f"--diag-error={CXX_STANDARD_DIAGNOSTIC}", "-Xcompiler", "-fPIC",
        f"-I{HERE}", f"-I{include}", f"-I{include / 'torch' / 'csrc' / 'api' / 'include'}",
        f"-I{sysconfig.get_paths()['include']}",
        "-DTORCH_API_INCLUDE_EXTENSION_H", f"-DTORCH_EXTENSION_NAME={EXT_NAME}", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
    ]


def stamp(cmd: list[str]) -> str:
    nvcc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True, check=True).stdout
    h = hashlib.sha256()
    for name in SOURCES:
        h.update((HERE / name).read_bytes())
    h.update(" ".join(cmd).encode())
    h.update(nvcc.encode())
    h.update(torch.__version__.encode())
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", nargs="+", default=["90"], help="SM architectures (90: H100/H200)")
    args = ap.parse_args()
    if shutil.which("nvcc") is None:
        print("nvcc not found: skipping the bindings compile check")
        return
    include = cuda_include_tree(torch_release())
    for arch in args.arch:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = nvcc_command(include, arch, Path(tmp) / "fake_quant.o")
            key = stamp(nvcc_command(include, arch, Path("fake_quant.o")))  # not the temporary output path
            marker = cache_root() / "bindings-stamps" / f"sm{arch}-{key}"
            if marker.is_file():
                print(f"bindings compile for sm_{arch} (cached: sources and flags unchanged)")
                continue
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stdout[-5000:], done.stderr[-10000:], sep="\n")
                raise SystemExit(f"the torch bindings do not compile for sm_{arch}: {' '.join(cmd)}")
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(" ".join(cmd) + "\n")
            print(f"bindings compile for sm_{arch} against the CUDA headers of torch {torch.__version__}")


if __name__ == "__main__":
    main()
