"""How the CUDA extension is built (checked without a GPU; CI also compiles the bindings with nvcc)."""

from __future__ import annotations

from tests.conftest import REPO


def test_extension_builds_leave_the_cxx_standard_to_torch():
    """torch >= 2.13's headers need C++20; torch's cpp_extension chooses it only when no -std= is given."""
    from omniq_lightning.quant.cuda import CXX_FLAGS, NVCC_FLAGS

    assert not [f for f in (*CXX_FLAGS, *NVCC_FLAGS) if f.startswith("-std=")]
    setup = (REPO / "cuda_ext" / "setup.py").read_text()
    assert "-std=" not in setup and "from omniq_lightning.quant.cuda import" in setup  # one set of flags


def test_bindings_check_compiles_with_the_projects_flags_and_torchs_standard():
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_bindings", REPO / "cuda_ext" / "check_bindings.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cmd = mod.nvcc_command(REPO / "include", "90", REPO / "out.o")
    assert "-std=c++20" in cmd and "--diag-error=3306" in cmd and "-arch=sm_90" in cmd
    assert all(f in cmd for f in mod.NVCC_FLAGS)
