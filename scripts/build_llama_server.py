"""Build llama.cpp's `llama-server` from the llama-cpp-python source distribution, once.

The OpenAI-engine tests and `make bench` need a real OpenAI-compatible server on 127.0.0.1. The
llama.cpp that llama-cpp-python embeds ships inside its sdist (`vendor/llama.cpp`), so building
`llama-server` from the same sdist gives a server on exactly the llama.cpp the embedded engine
runs: the same kernels, the same chat template code. Nothing is downloaded at test time: pip
fetches the sdist (through its cache and index settings, like `make install`), cmake builds the
one target (CPU, Release, no curl or TLS, no web UI, no tests or examples, statically linked so
the binary stands alone), and the binary is moved atomically into
`~/.cache/malt/llama-server/<version>-<cpu>/`, where `malt_local.bench.llama_server` finds it.
The version is the installed llama-cpp-python's, so the server always runs the embedded engine's
llama.cpp; `<cpu>` is `cpu_key()`, since the build is native and another CPU's binary may crash
here (while `--version` still works). A second call finds the binary and returns at once; the
path is printed on stdout. Run it with the project's environment (`make llama-server`).

    python scripts/build_llama_server.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

from malt_local.bench.llama_server import cached_binary, no_amx_flags

CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    # The web UI is not in the sdist; without these the build tries to fetch it from the Hub.
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    # The embedded engine's build leaves out the AMX kernels, which crash (no_amx_flags()).
    *(
        [f"-DCMAKE_C_FLAGS={no_amx_flags()}", f"-DCMAKE_CXX_FLAGS={no_amx_flags()}"]
        if no_amx_flags()
        else []
    ),
]


def works(binary: Path) -> bool:
    """A cached binary counts only if it runs (a cut copy would not; a foreign CPU's build has
    its own folder, as `--version` alone would not show that it crashes here)."""
    if not binary.is_file():
        return False
    done = subprocess.run([str(binary), "--version"], capture_output=True, timeout=60, check=False)
    return done.returncode == 0


def build(release: str, dest: Path, jobs: str) -> None:
    """Download the sdist, build the `llama-server` target and move the binary to `dest`."""
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise SystemExit(
                f"{tool} not found: install cmake and a C++ compiler (build-essential)"
            )
    with tempfile.TemporaryDirectory(prefix="malt-llama-server-") as tmp:
        pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps"]
        sdist = ["--no-binary", "llama-cpp-python", f"llama-cpp-python=={release}"]
        subprocess.run([*pip, *sdist, "-d", tmp], check=True)
        sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        source = next(Path(tmp).glob("llama_cpp_python-*/vendor/llama.cpp"))
        out = Path(tmp) / "build"
        subprocess.run(["cmake", "-S", str(source), "-B", str(out), *CMAKE_FLAGS], check=True)
        target = ["--config", "Release", "--target", "llama-server", "-j", jobs]
        subprocess.run(["cmake", "--build", str(out), *target], check=True)
        built = out / "bin" / "llama-server"
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_suffix(".part")
        shutil.copy2(built, part)
        os.replace(part, dest)


def main() -> int:
    release = version("llama-cpp-python")
    dest = cached_binary(release)
    if works(dest):
        print(dest)
        return 0
    started = time.monotonic()
    build(release, dest, os.environ.get("MALT_BUILD_JOBS", "2"))
    if not works(dest):
        print(f"built {dest} but it does not run", file=sys.stderr)
        return 1
    print(f"built llama-server {release} in {time.monotonic() - started:.0f} s", file=sys.stderr)
    print(dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
