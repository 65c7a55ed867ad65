"""The engine configuration: which engine runs, on how many threads.

This is the only module that reads fastseq's environment variables (once, at import):

    GPU=1                    the cupy engine (CuPy arrays and kernels on an NVIDIA GPU)
    FASTSEQ_KERNEL=name      numpy | cython | cupy (default: cython when built, else numpy;
                             GPU=1 means cupy whatever FASTSEQ_KERNEL says)
    FASTSEQ_THREADS=n        most threads fastseq's own kernels and the BLAS may use
                             (default: the CPUs this process may use)
    FASTSEQ_DATA=dir         download cache (default ~/.cache/fastseq): DATA_DIR
    FASTSEQ_PTB_URL=url      base URL to download PTB from (default: the built-in mirrors): PTB_URL

An engine is an array module plus the kernels that go with it: ``numpy`` is NumPy alone (the
compiled extension is never imported), ``cython`` adds the compiled CPU kernels of
fastseq/_ext/_cpu, ``cupy`` runs everything on the GPU. ``config`` is an immutable Config;
``use(engine, threads)`` replaces it, ``using(...)`` does so for a block, ``describe()`` reports
it. Which engine's code runs an op is decided in one place, fastseq.ops.
"""
import contextlib
import dataclasses
import importlib
import math
import numbers
import os
import sys
import threading
import warnings

import numpy as np
import threadpoolctl

ENGINES = ("numpy", "cython", "cupy")


class BackendError(RuntimeError):
    """The requested engine cannot run here (message says what is missing)."""


@dataclasses.dataclass(frozen=True)
class Config:
    engine: str = "numpy"  # whose kernels run: 'numpy', 'cython' or 'cupy'
    threads: int = 1       # most threads fastseq's kernels and the BLAS may use


# --- CPUs ------------------------------------------------------------------------------------

def _cgroup_cpus():
    """CPUs allowed by the cgroup quota (v2 cpu.max, else v1 cfs_quota), or None for no limit."""
    for names in (["cpu.max"], ["cpu/cpu.cfs_quota_us", "cpu/cpu.cfs_period_us"]):
        try:
            text = []
            for name in names:
                with open(f"/sys/fs/cgroup/{name}") as f:
                    text += f.read().split()
            quota, period = text[:2]
            if quota == "max" or int(quota) <= 0 or int(period) <= 0:
                return None
            return max(1, math.ceil(int(quota) / int(period)))
        except (OSError, ValueError):
            pass
    return None


def available_cpus():
    """CPUs this process may use: its affinity mask, capped by the container's CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _cgroup_cpus()
    return max(1, min(n, quota) if quota else n)


CPUS = available_cpus()


# --- environment (read once) -------------------------------------------------------------------

_problems = []  # invalid environment settings: warned at import, raised by require_requested_engine
_env = {k: os.environ.get(k, "").strip()
        for k in ("GPU", "FASTSEQ_KERNEL", "FASTSEQ_THREADS", "FASTSEQ_DATA", "FASTSEQ_PTB_URL")}
DATA_DIR, PTB_URL = _env["FASTSEQ_DATA"], _env["FASTSEQ_PTB_URL"]
_ENV_ENGINE = _env["FASTSEQ_KERNEL"].lower() or None
if _ENV_ENGINE not in (None, *ENGINES):
    _problems.append(f"FASTSEQ_KERNEL={os.environ['FASTSEQ_KERNEL']!r}: "
                     f"expected numpy, cython or cupy")
    _ENV_ENGINE = None
try:
    _ENV_THREADS = int(_env["FASTSEQ_THREADS"]) if _env["FASTSEQ_THREADS"] else None
    if _ENV_THREADS is not None and _ENV_THREADS < 1:
        raise ValueError
except ValueError:
    _problems.append(f"FASTSEQ_THREADS={_env['FASTSEQ_THREADS']!r}: expected an integer >= 1")
    _ENV_THREADS = None
if _env["GPU"].lower() not in ("", "0", "false", "no", "off"):  # GPU=1 wins over FASTSEQ_KERNEL
    _ENV_ENGINE = "cupy"


# --- CuPy (optional) ----------------------------------------------------------------------------

_cupy = None
_cupy_error = None


def _load_cupy():
    global _cupy, _cupy_error
    if _cupy is None and _cupy_error is None:
        try:
            import cupy
        except Exception as e:  # ImportError, or a CUDA library failing to load
            _cupy_error = f"CuPy is not installed or failed to import ({type(e).__name__}: {e}); " \
                          f"install it with `pip install fastseq[gpu]`"
            return None
        try:
            if cupy.cuda.runtime.getDeviceCount() < 1:
                raise RuntimeError("no CUDA device found")
            # compile and run one tiny kernel: catches missing NVRTC / CUDA headers up front
            float((cupy.arange(2, dtype=cupy.float32) * 2).sum())
            _cupy = cupy
        except Exception as e:
            _cupy_error = f"CuPy is installed but no usable NVIDIA GPU was found " \
                          f"({type(e).__name__}: {e})"
    return _cupy


def gpu_available():
    return _load_cupy() is not None


# --- the compiled extension ----------------------------------------------------------------------

_ext = []          # [fastseq._ext._cpu or None], once tried
_ext_error = None


def compiled():
    """The compiled extension fastseq._ext._cpu, or None when it cannot be imported, whatever the
    engine (the engine tests compare it with the NumPy code)."""
    global _ext_error
    if not _ext:
        try:
            _ext.append(importlib.import_module("fastseq._ext._cpu"))
        except ImportError as e:
            _ext.append(None)
            _ext_error = f"{type(e).__name__}: {e}"
        else:
            _limit_blas()  # it loaded its BLAS: one thread per call, the kernels split the work
    return _ext[0]


def cython_available():
    return compiled() is not None


# --- BLAS threads (threadpoolctl) ------------------------------------------------------------------

def _blas_controllers():
    """threadpoolctl's controllers of the BLAS libraries loaded so far."""
    return threadpoolctl.ThreadpoolController().select(user_api="blas").lib_controllers


def _set_blas_threads(lib, n):
    """Set a BLAS library's process-wide thread count from whichever thread calls (threadpoolctl
    lets only the first thread that sets an OpenBLAS pool set it again: take and give back that
    role around the call)."""
    openblas = threadpoolctl.OpenBLASController
    if isinstance(lib, openblas):
        openblas.clear_controlling_thread(force=True)
        lib.set_num_threads(n)
        openblas.clear_controlling_thread()
    else:
        lib.set_num_threads(n)


def _is_kernels(lib):
    """Whether a BLAS is the one the compiled kernels call (scipy-openblas32's library)."""
    package = sys.modules.get("scipy_openblas32")
    if package is None or not lib.filepath:
        return False
    return os.path.abspath(lib.filepath).startswith(os.path.abspath(package.get_lib_dir()) + os.sep)


_capped = False  # whether _limit_blas capped the other BLAS libraries


def _limit_blas():
    """The kernels' BLAS on one thread, fastseq's threads cutting the work instead (a
    NumPy that shares it then runs its own products on one thread too); every other BLAS capped
    at config.threads when that is below the CPU count (by default it keeps its own)."""
    global _capped
    serial, cap = False, config.threads < CPUS
    for lib in _blas_controllers():
        if _is_kernels(lib):
            _set_blas_threads(lib, 1)
            serial = True
        elif cap or _capped:  # capped, or back to the CPU count after a cap
            _set_blas_threads(lib, min(config.threads, CPUS))
    _capped = cap
    if _ext and _ext[0] is not None:
        _ext[0].set_blas_serial(serial)
    _single.libs = None  # loaded libraries may have changed


class _SingleBlasThread:
    """Context manager: every BLAS on one thread inside (nested and concurrent uses share one
    setting, restored when the last one leaves). Small products (the numpy engine's per-step
    ones, one row times a matrix) run faster on one thread, avoid a hand-off to workers that may
    not be running on a busy machine, and give the same bits at any thread count. The counts it
    restores are read once after each change of the configuration (_limit_blas)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.depth = 0
        self.libs = None  # [(controller, its thread count outside), ...]

    def __enter__(self):
        with self.lock:
            if self.depth == 0:
                if self.libs is None:
                    self.libs = [(lib, lib.num_threads) for lib in _blas_controllers()]
                for lib, n in self.libs:
                    if n != 1:
                        _set_blas_threads(lib, 1)
            self.depth += 1
        return self

    def __exit__(self, *exc):
        with self.lock:
            self.depth -= 1
            if self.depth == 0:
                for lib, n in self.libs or ():  # None: use() re-read the libraries meanwhile
                    if n != 1:
                        _set_blas_threads(lib, n)
        return False


_single = _SingleBlasThread()


def single_blas_thread():
    """A context in which every BLAS runs on one thread (see _SingleBlasThread)."""
    return _single


# --- choosing the engine ------------------------------------------------------------------------

def _default_engine():
    return _ENV_ENGINE or ("cython" if cython_available() else "numpy")


def _check_engine(name):
    """name resolved ('auto': the environment's choice, falling back from an unusable GPU; the
    fallback is recorded for require_requested_engine), or BackendError."""
    if name in (None, "auto"):
        name = _default_engine()
        if name == "cupy" and not gpu_available():
            name = "cython" if cython_available() else "numpy"
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; expected numpy, cython, cupy or auto")
    if name == "cupy" and _load_cupy() is None:
        raise BackendError(f"GPU requested but unavailable: {_cupy_error}")
    if name == "cython" and not cython_available():
        raise BackendError(f"the cython engine is not built here ({_ext_error}); "
                           f"reinstall with a C compiler, or use the numpy engine")
    return name


def _check_threads(n):
    if n == "auto":
        return _ENV_THREADS or CPUS
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"threads must be an integer >= 1 or 'auto', got {n!r}")
    return int(n)


def use(engine=None, threads=None):
    """Select the engine ('numpy', 'cython', 'cupy', or 'auto': the environment's choice) and the
    thread count (an integer, or 'auto': FASTSEQ_THREADS or the CPU count); None keeps the
    current one. Raises BackendError when the engine cannot run here. Returns the array module."""
    _apply(Config(config.engine if engine is None else _check_engine(engine),
                  config.threads if threads is None else _check_threads(threads)))
    return array_module()


def _apply(new):
    global config
    old, config = config, new
    if new.threads != old.threads:
        _limit_blas()


@contextlib.contextmanager
def using(engine=None, threads=None):
    """Run a block with another engine and/or thread count, then restore the configuration."""
    saved = config
    try:
        use(engine, threads)
        yield config
    finally:
        _apply(saved)


def array_module():
    """The module new arrays are created with: cupy on the cupy engine, else numpy."""
    return _cupy if config.engine == "cupy" else np


def __getattr__(name):
    if name == "xp":  # backend.xp: array_module()
        return array_module()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def is_gpu():
    return config.engine == "cupy"


def requested_gpu():
    """Whether GPU=1 (or FASTSEQ_KERNEL=cupy) was set."""
    return _ENV_ENGINE == "cupy"


def require_requested_engine():
    """Raise BackendError for an invalid setting in the environment or GPU=1 / FASTSEQ_KERNEL
    naming an engine that cannot run here (the CLI turns it into exit 2)."""
    if _problems:
        raise BackendError("; ".join(_problems))
    wanted = _default_engine()
    if wanted == "cupy" and not is_gpu():
        raise BackendError(f"GPU=1 was set but the GPU engine is unavailable: {_cupy_error}")
    if wanted == "cython" and not cython_available():
        raise BackendError(f"FASTSEQ_KERNEL=cython but the cython engine is not built here "
                           f"({_ext_error})")


# --- arrays ---------------------------------------------------------------------------------------

def _imported_cupy():
    """cupy if anything has imported it (arrays may come from user code), else None."""
    return _cupy if _cupy is not None else sys.modules.get("cupy")


def get_array_module(*arrays):
    """numpy or cupy, whichever owns the given arrays (numpy for plain Python values)."""
    cp = _imported_cupy()
    return np if cp is None else cp.get_array_module(*arrays)


def to_cpu(a):
    """A NumPy array (copied from the GPU when needed)."""
    cp = _imported_cupy()
    if cp is not None and isinstance(a, cp.ndarray):
        return cp.asnumpy(a)
    return np.asarray(a)


def to_gpu(a):
    """A CuPy array (raises BackendError when no GPU is usable)."""
    cp = _load_cupy()
    if cp is None:
        raise BackendError(f"GPU requested but unavailable: {_cupy_error}")
    return cp.asarray(a)


def asarray(a, dtype=None):
    """An array on the current engine's device."""
    return _cupy.asarray(a, dtype=dtype) if is_gpu() else np.asarray(to_cpu(a), dtype=dtype)


_ids_checked = 0  # > 0 inside ids_checked()


@contextlib.contextmanager
def ids_checked():
    """Inside, id range checks on device arrays are skipped: each one reads a value back to the
    host, a stall per batch. For a trainer that has checked its whole data set once."""
    global _ids_checked
    _ids_checked += 1
    try:
        yield
    finally:
        _ids_checked -= 1


def skip_id_check(a):
    """Whether a range check of the ids in ``a`` is skipped (a device array inside ids_checked)."""
    return _ids_checked > 0 and get_array_module(a) is not np


def check_same_device(*arrays, what="arrays"):
    """Raise a clear TypeError when NumPy and CuPy arrays are mixed."""
    cp = _imported_cupy()
    if cp is None:
        return
    host = any(isinstance(a, np.ndarray) for a in arrays)
    device = any(isinstance(a, cp.ndarray) for a in arrays)
    if host and device:
        raise TypeError(f"{what} mix host (NumPy) and device (CuPy) arrays; "
                        "move them with fastseq.backend.to_gpu / to_cpu")


# --- report ----------------------------------------------------------------------------------------

def _blas_pools():
    """[(library (owning package), threads), ...] for the BLAS and OpenMP pools loaded here."""
    pools = []
    for d in threadpoolctl.threadpool_info():
        folder = os.path.basename(os.path.dirname(d.get("filepath", "")))
        owner = f" ({folder[:-5]})" if folder.endswith(".libs") else ""  # a wheel's bundled copy
        name = d.get("internal_api", "?") + owner
        pools.append((name, d.get("num_threads")))
    return pools


def info():
    """The configuration and what it runs on, as a dict (engine, threads, cpus, BLAS pools...)."""
    d = dataclasses.asdict(config)
    d["cpus"] = CPUS
    d["cython_built"] = cython_available() if config.engine != "numpy" else None
    d["blas_pools"] = _blas_pools()
    if is_gpu():
        dev = _cupy.cuda.Device()
        d["device"] = _cupy.cuda.runtime.getDeviceProperties(dev.id)["name"].decode()
    return d


def describe():
    """One line for logs: engine, CPUs, threads and BLAS pools."""
    d = info()
    s = f"engine: {d['engine']} ({'cupy' if is_gpu() else 'numpy'} arrays)"
    if "device" in d:
        s += f" on {d['device']}"
    s += f"; {d['cpus']} CPUs, {d['threads']} threads"
    if d["blas_pools"]:
        s += "; " + ", ".join(f"{api} {n} threads" for api, n in d["blas_pools"])
    return s


config = Config(threads=_ENV_THREADS or CPUS)
_limit_blas()
try:
    use("auto")
except BackendError as e:  # FASTSEQ_KERNEL=cython without the build: NumPy runs meanwhile
    _problems.append(str(e))
    use("numpy")
for _p in _problems:
    warnings.warn(f"fastseq: {_p}", RuntimeWarning, stacklevel=2)
