"""Install llama-cpp-python into this venv, built for this machine's CPU (`make install`).

llama-cpp-python has no wheels on PyPI: pip compiles llama.cpp from the sdist with
`-march=native` and caches the wheel under the sdist's name alone. A home folder whose pip cache
was filled on another CPU (a moved disk, a reused image, a CI cache) then installs a wheel that
crashes on the first matrix product (a general protection fault in libggml-cpu, exit 139), with
no error at install or import. So malt builds the wheel itself, once per CPU (`cpu_key()`: the
machine and its instruction-set flags) and per `CMAKE_ARGS`, caches it under
`~/.cache/malt/wheels/`, and installs that one before `pip install -e .` (which then finds the
pinned version already there). On x86 the build leaves out llama.cpp's AMX kernels, which crash
on the first matrix product of a Xeon with AMX (`no_amx_flags()`); the user's own `CMAKE_ARGS`
come after malt's, so theirs win. A venv records which build it holds; a rerun on the same CPU
only compares that record (well under a second).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from malt_local.bench.llama_server import cpu_key, no_amx_flags  # noqa: E402

WHEELS = Path.home() / ".cache" / "malt" / "wheels"
MARKER = Path(sys.prefix) / ".malt-llama-cpp-build"


def pinned_release() -> str:
    """The llama-cpp-python version pyproject.toml pins (`llama-cpp-python==X`)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    for dep in project["dependencies"]:
        name, _, release = dep.partition("==")
        if name.strip() == "llama-cpp-python":
            return release.strip()
    raise SystemExit("pyproject.toml does not pin llama-cpp-python==VERSION")


def build_name(release: str, cpu: str, cmake_args: str) -> str:
    """The build's name: one per release, CPU and CMAKE_ARGS (a CUDA build is another build)."""
    name = f"llama-cpp-python-{release}-{cpu}"
    if cmake_args.strip():
        name += "-" + hashlib.sha256(cmake_args.strip().encode()).hexdigest()[:8]
    return name


def cmake_args(user: str) -> str:
    """The CMAKE_ARGS of malt's build: no AMX on x86, then the user's own (which win)."""
    flags = no_amx_flags()
    ours = f'-DCMAKE_C_FLAGS="{flags}" -DCMAKE_CXX_FLAGS="{flags}"' if flags else ""
    return f"{ours} {user.strip()}".strip()


def cached_wheel(folder: Path) -> Path | None:
    wheels = sorted(folder.glob("llama_cpp_python-*.whl"))
    return wheels[0] if wheels else None


def build(release: str, folder: Path, args: str) -> Path:
    """Compile the sdist into a wheel in `folder` (about ten minutes on two cores)."""
    pip = [sys.executable, "-m", "pip"]
    started = time.monotonic()
    print(
        f"compiling llama-cpp-python {release} for this CPU (about 10 minutes on 2 cores)",
        file=sys.stderr,
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="malt-llama-wheel-") as tmp:
        subprocess.run(
            [
                *pip,
                "download",
                "-q",
                "--no-deps",
                "--no-binary",
                "llama-cpp-python",
                f"llama-cpp-python=={release}",
                "-d",
                tmp,
            ],
            check=True,
        )
        sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        out = Path(tmp) / "out"
        # --no-cache-dir: pip's own wheel cache is exactly what may hold another CPU's build.
        subprocess.run(
            [*pip, "wheel", "-q", "--no-deps", "--no-cache-dir", str(sdist), "-w", str(out)],
            check=True,
            env={**os.environ, "CMAKE_ARGS": args},
        )
        built = next(out.glob("llama_cpp_python-*.whl"))
        folder.mkdir(parents=True, exist_ok=True)
        part = folder / (built.name + ".part")
        shutil.copy2(built, part)
        os.replace(part, folder / built.name)
    print(f"built in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return folder / built.name


def main() -> int:
    release = pinned_release()
    args = cmake_args(os.environ.get("CMAKE_ARGS", ""))
    name = build_name(release, cpu_key(), args)
    if MARKER.is_file() and MARKER.read_text(encoding="utf-8").strip() == name:
        return 0
    wheel = cached_wheel(WHEELS / name) or build(release, WHEELS / name, args)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--force-reinstall",
            str(wheel),
        ],
        check=True,
    )
    MARKER.write_text(name + "\n", encoding="utf-8")
    print(f"llama-cpp-python {release}: {wheel}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
