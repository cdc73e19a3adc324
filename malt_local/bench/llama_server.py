"""llama.cpp's own `llama-server`, started on 127.0.0.1 for the tests and `make bench`.

`--engine openai` is tested and benchmarked against a real server, and llama-server is the one
that runs on a CPU and behaves like vLLM where it matters (parallel slots, continuous batching,
`n` with seed + i, a prefix cache, 503 while loading). `make llama-server`
(`scripts/build_llama_server.py`) builds it once from the llama-cpp-python source distribution of
the installed version, so the server and the embedded engine run the same llama.cpp; the binary
is cached under `~/.cache/malt/llama-server/<version>-<cpu>/`. Nothing here downloads or builds:
a missing binary is an error that names the command that makes it.

llama.cpp builds for the CPU it is built on (`-march=native`), so a binary or wheel made on one
machine may crash on another (a general protection fault in libggml-cpu on the first matrix
product, not an error at start-up): every build malt caches is keyed by `cpu_key()`, and a home
folder moved to another CPU builds again instead of crashing. Both builds also leave out
llama.cpp's AMX kernels (`no_amx_flags()`).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

from malt_local.errors import MaltError

BINARY_ENV = "MALT_LLAMA_SERVER"
CACHE_ROOT = Path.home() / ".cache" / "malt" / "llama-server"


def cpu_key(cpuinfo: str | None = None) -> str:
    """12 hex digits naming what a native build depends on: the machine and its CPU's flags.

    Two CPUs with the same instruction sets share builds whatever their names; a CPU with one
    flag more or less gets its own (the build would use, or lack, its instructions)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            cpuinfo = ""
    flags = next(
        (
            line.split(":", 1)[1]
            for line in cpuinfo.splitlines()
            if line.split(":")[0].strip() in ("flags", "Features")
        ),
        platform.processor(),
    )
    seen = f"{platform.machine()}:{' '.join(sorted(set(flags.split())))}"
    return hashlib.sha256(seen.encode()).hexdigest()[:12]


def no_amx_flags() -> str:
    """Compiler flags that keep a native x86 build off AMX ("" elsewhere).

    The vendored llama.cpp's AMX matrix product loads its tile configuration with only 32 of its
    64 bytes zeroed (ggml_backend_amx_mul_mat: `vmovdqa ymm0` then `ldtilecfg`), so on a Xeon
    with AMX the rest is stack garbage and the first matrix product dies of a general
    protection fault. Explicit `-mno-*` flags win over `-march=native` whatever their order."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ""
    return "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


def cached_binary(release: str) -> Path:
    """Where `make llama-server` puts the server built from llama-cpp-python `release` here."""
    return CACHE_ROOT / f"{release}-{cpu_key()}" / "llama-server"


def server_binary() -> Path:
    """`$MALT_LLAMA_SERVER`, else the binary cached for the installed llama-cpp-python."""
    if os.environ.get(BINARY_ENV):
        return Path(os.environ[BINARY_ENV])
    return cached_binary(version("llama-cpp-python"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LlamaServer:
    """`with LlamaServer(model) as server:` serves `model` at `server.url` until the block ends.

    `slots` parallel sequences (`-np`), each with `ctx_per_slot` cells of KV cache; `unified_kv`
    gives all slots one shared cache instead (`-kvu`). The chat template is the GGUF's own,
    rendered by llama.cpp's Jinja engine (`--jinja`), as the embedded engine renders it.
    """

    model: Path
    slots: int = 4
    ctx_per_slot: int = 2048
    threads: int | None = None
    unified_kv: bool = False
    flash_attn: bool | None = None  # None: llama-server's default (auto)
    binary: Path | None = None
    extra: list[str] = field(default_factory=list)
    log_path: Path | None = None
    port: int = 0
    _proc: subprocess.Popen | None = field(default=None, init=False, repr=False)
    _log: object = field(default=None, init=False, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        argv = [
            str(self.binary or server_binary()),
            "--model", str(self.model),
            "--host", "127.0.0.1", "--port", str(self.port),
            "--parallel", str(self.slots),
            "--ctx-size", str(self.slots * self.ctx_per_slot),
            "--jinja", "--no-webui", "--metrics",
        ]  # fmt: skip
        if self.threads:
            argv += ["--threads", str(self.threads), "--threads-batch", str(self.threads)]
        argv.append("--kv-unified" if self.unified_kv else "--no-kv-unified")
        if self.flash_attn is not None:
            argv += ["--flash-attn", "on" if self.flash_attn else "off"]
        return argv + self.extra

    def start(self, timeout: float = 180.0) -> LlamaServer:
        binary = self.binary or server_binary()
        if not binary.is_file():
            raise MaltError(
                f"llama-server not found at {binary}: run `make llama-server` "
                f"(or set {BINARY_ENV} to a llama-server binary)"
            )
        if not self.port:
            self.port = free_port()
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="llama-server-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(
            self.argv(), stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        try:
            self._wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_healthy(self, timeout: float) -> None:
        """Until `/health` answers 200 (llama-server says 503 while the model loads)."""
        deadline = time.monotonic() + timeout
        assert self._proc is not None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise MaltError(
                    f"llama-server exited with code {self._proc.returncode} while starting: "
                    + self.log_tail()
                )
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise MaltError(f"llama-server not healthy after {timeout:.0f} s: " + self.log_tail())

    def log_tail(self, chars: int = 2000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_bytes()[-chars:].decode("utf-8", "replace")

    def get(self, path: str) -> object:
        """GET a JSON document from the server (`/props`, `/slots`, `/v1/models`)."""
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, payload: dict, timeout: float = 300) -> dict:
        """POST JSON and return the JSON answer (`/v1/chat/completions`, `/apply-template`)."""
        req = urllib.request.Request(
            self.url + path,
            data=json.dumps(payload).encode("utf-8"),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def metrics(self) -> dict[str, float]:
        """The Prometheus counters of `/metrics` (`llamacpp:…`), by name."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=30) as r:
            text = r.read().decode("utf-8")
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def peak_rss_mib(self) -> float | None:
        """The server process's peak resident memory (Linux `VmHWM`; None elsewhere)."""
        if self._proc is None:
            return None
        try:
            with open(f"/proc/{self._proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        return None

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log is not None:
            self._log.close()  # type: ignore[attr-defined]
            self._log = None

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
