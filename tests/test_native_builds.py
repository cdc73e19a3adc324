"""Native builds are keyed by the CPU they were made on.

llama.cpp compiles with `-march=native`, and pip caches the llama-cpp-python wheel under its
version alone: a home folder filled on another CPU installed a wheel (and kept a llama-server)
that crashed here with exit 139 on the first model load, while import and `--version` worked.
`make install` now builds the wheel per `cpu_key()` (scripts/install_llama_cpp.py) and
`make llama-server` caches the binary per key.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from importlib.metadata import version
from pathlib import Path

from malt_local.bench.llama_server import cached_binary, cpu_key, no_amx_flags

ROOT = Path(__file__).resolve().parent.parent

INTEL = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu sse2 avx avx2 fma f16c avx512f avx512bw amx_tile
bogomips\t: 4000

processor\t: 1
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu sse2
"""


def install_script():
    spec = importlib.util.spec_from_file_location(
        "install_llama_cpp", ROOT / "scripts" / "install_llama_cpp.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_key_is_the_cpus_flags_not_their_order_or_the_cpus_name():
    same = INTEL.replace("fpu sse2 avx avx2", "avx2 avx fpu sse2").replace("Xeon(R)", "Other")
    assert cpu_key(same) == cpu_key(INTEL)
    assert cpu_key(INTEL.replace(" amx_tile", "")) != cpu_key(INTEL)  # one instruction set less
    assert cpu_key(INTEL.replace("avx512bw", "avx512bw avx512vl")) != cpu_key(INTEL)
    arm = "processor\t: 0\nFeatures\t: fp asimd sve\n"
    assert cpu_key(arm) != cpu_key(arm.replace(" sve", ""))
    assert len(cpu_key(INTEL)) == 12 and int(cpu_key(INTEL), 16) >= 0


def test_the_server_binary_is_cached_per_release_and_cpu():
    path = cached_binary("0.3.36")
    assert path.name == "llama-server"
    assert path.parent.name == f"0.3.36-{cpu_key()}"


def test_a_cuda_or_other_cmake_build_is_another_build():
    script = install_script()
    plain = script.build_name("0.3.36", "abc", "")
    assert plain == "llama-cpp-python-0.3.36-abc"
    cuda = script.build_name("0.3.36", "abc", "-DGGML_CUDA=on")
    assert cuda.startswith(plain + "-") and cuda != script.build_name("0.3.36", "abc", "-DX=1")
    assert script.build_name("0.3.37", "abc", "") != plain
    assert script.pinned_release() == version("llama-cpp-python")  # the pin is what is installed


def test_malts_build_leaves_out_amx_and_the_users_cmake_args_come_last():
    script = install_script()
    flags = no_amx_flags()
    if flags:  # x86
        assert "-mno-amx-tile" in flags and "-mno-amx-int8" in flags
        args = script.cmake_args("-DGGML_CUDA=on")
        assert args.startswith(f'-DCMAKE_C_FLAGS="{flags}"') and args.endswith("-DGGML_CUDA=on")
    assert script.cmake_args("") == script.cmake_args("  ")


def test_this_venv_holds_this_cpus_build():
    """`make install` put the wheel built for this very CPU into the venv the tests run in."""
    script = install_script()
    marker = Path(sys.prefix) / ".malt-llama-cpp-build"
    assert marker.is_file(), "the venv's llama-cpp-python was not installed by make install"
    wanted = script.build_name(
        script.pinned_release(), cpu_key(), script.cmake_args(os.environ.get("CMAKE_ARGS", ""))
    )
    assert marker.read_text(encoding="utf-8").strip() == wanted


def test_a_venv_of_another_cpu_gets_the_cached_wheel_of_this_one(tmp_path, monkeypatch):
    script = install_script()
    calls = []
    monkeypatch.setattr(script.subprocess, "run", lambda argv, **kw: calls.append(argv))
    monkeypatch.setattr(script, "WHEELS", tmp_path / "wheels")
    monkeypatch.setattr(script, "MARKER", tmp_path / "marker")
    monkeypatch.delenv("CMAKE_ARGS", raising=False)
    name = script.build_name(script.pinned_release(), cpu_key(), script.cmake_args(""))
    wheel = tmp_path / "wheels" / name / "llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl"
    wheel.parent.mkdir(parents=True)
    wheel.write_bytes(b"")
    (tmp_path / "marker").write_text("llama-cpp-python-0.3.36-0123456789ab\n")  # another CPU
    assert script.main() == 0
    assert len(calls) == 1 and calls[0][-1] == str(wheel) and "--force-reinstall" in calls[0]
    assert (tmp_path / "marker").read_text().strip() == name
    calls.clear()
    assert script.main() == 0 and calls == []  # the same CPU again: nothing to do
