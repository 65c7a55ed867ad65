"""The engine configuration: which array module, which kernels, how many threads.

This is the only module that reads fastseq's environment variables (once, at import):

    GPU=1                    the cupy engine (CuPy arrays and kernels on an NVIDIA GPU)
    FASTSEQ_KERNEL=name      numpy | cython | cupy (default: cython when built, else numpy;
                             GPU=1 means cupy whatever FASTSEQ_KERNEL says)
    FASTSEQ_THREADS=n        most threads fastseq's own kernels and the BLAS may use
                             (default: the CPUs this process may use)
    FASTSEQ_DATA=dir         download cache (default ~/.cache/fastseq)
    FASTSEQ_PTB_URL=url      base URL to download PTB from (default: the built-in mirrors)

An engine is an array module plus the kernels that go with it: ``numpy`` is NumPy alone (no
compiled extension is ever imported), ``cython`` adds every compiled CPU kernel of fastseq/_ext,
``cupy`` runs everything on the GPU. ``use(name)`` switches at run time; ``config`` holds the
resolved choice, ``info()``/``describe()`` report it. Other modules ask ``get_array_module(x)``
for math on arrays they were given, ``xp`` for new arrays, and ``ext(name)`` for a compiled
kernel module (None where the engine is not cython).
"""
import contextlib
import dataclasses
import importlib
import math
import os
import sys
import warnings

import numpy as np

ENGINES = ("numpy", "cython", "cupy")

xp = np  # the array module new arrays are created with (follows config.array)


class BackendError(RuntimeError):
    """The requested engine cannot run here (message says what is missing)."""


@dataclasses.dataclass
class Config:
    array: str = "numpy"          # array module: 'numpy' or 'cupy'
    kernel: str = "numpy"         # engine whose kernels run: 'numpy', 'cython' or 'cupy'
    cpus: int = 1                 # CPUs this process may use (affinity and cgroup quota)
    threads: int = 1              # most threads fastseq's kernels may use (FASTSEQ_THREADS)
    # thread policy of the CPU kernels, derived from threads (see _thread_policy)
    lstm_threads: int = 1         # threads taking the Cython LSTM's row chunks
    optim_threads: int = 1        # threads for the fused optimiser / clipping kernels
    blas_threads: int = 1         # threads the BLAS may use for fastseq's products
    small_blas_threads: int = 1   # BLAS threads for the numpy engine's small products (_thread_policy)
    blas: str = "auto"            # BLAS the Cython LSTM calls: 'auto', 'numpy' or 'scipy'
    data_dir: str = ""            # download cache (FASTSEQ_DATA)
    ptb_url: str = ""             # PTB base URL override (FASTSEQ_PTB_URL)
    gpu_requested: bool = False   # GPU=1 (or FASTSEQ_KERNEL=cupy) was set


# --- CPUs ------------------------------------------------------------------------------------

def _cgroup_cpus():
    """CPUs allowed by the cgroup quota (v2 cpu.max, else v1 cfs_quota), or None for no limit."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            return max(1, math.ceil(int(quota) / int(period)))
        return None
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f:
            quota = int(f.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
            period = int(f.read())
        if quota > 0 and period > 0:
            return max(1, math.ceil(quota / period))
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


# --- environment (read once) -------------------------------------------------------------------

_problems = []  # invalid environment settings: warned at import, raised by require_requested_engine


def _flag(value):
    return value.strip().lower() not in ("", "0", "false", "no", "off")


def _read_env(env):
    kernel = env.get("FASTSEQ_KERNEL", "").strip().lower() or None
    if kernel is not None and kernel not in ENGINES:
        _problems.append(f"FASTSEQ_KERNEL={env['FASTSEQ_KERNEL']!r}: expected numpy, cython or cupy")
        kernel = None
    threads = None
    raw = env.get("FASTSEQ_THREADS", "").strip()
    if raw:
        try:
            threads = int(raw)
            if threads < 1:
                raise ValueError
        except ValueError:
            _problems.append(f"FASTSEQ_THREADS={raw!r}: expected an integer >= 1")
            threads = None
    gpu = _flag(env.get("GPU", ""))
    if gpu:  # GPU=1 is the documented switch: it wins over FASTSEQ_KERNEL
        kernel = "cupy"
    return dict(kernel=kernel, threads=threads, gpu=gpu,
                data_dir=env.get("FASTSEQ_DATA", "").strip(),
                ptb_url=env.get("FASTSEQ_PTB_URL", "").strip())


_ENV = _read_env(os.environ)


SMALL_PRODUCT = 1 << 26  # multiply-adds: the numpy engine's smaller products use small_blas_threads


def blas_threads_for(macs):
    """BLAS threads for a NumPy product of ``macs`` multiply-adds (numpy engine)."""
    return config.small_blas_threads if macs < SMALL_PRODUCT else config.blas_threads


def _thread_policy(cfg):
    """Fill the per-kernel thread fields from cfg.threads."""
    cfg.lstm_threads = cfg.threads
    cfg.optim_threads = cfg.threads  # the kernels use them only for lists large enough to pay
    cfg.blas_threads = cfg.threads
    # The numpy engine's LSTM products (N x H x 4H per step) and others below SMALL_PRODUCT: split
    # over OpenBLAS's threads they gain a little when the machine is idle and lose several times
    # over when another process holds a core a thread waits on. One thread also gives the same
    # bits at any thread count or load.
    cfg.small_blas_threads = 1


# --- CuPy (optional) ----------------------------------------------------------------------------

_cupy = None
_cupy_error = None


def _load_cupy():
    global _cupy, _cupy_error
    if _cupy is not None or _cupy_error is not None:
        return _cupy
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
    except Exception as e:
        _cupy_error = f"CuPy is installed but no usable NVIDIA GPU was found ({type(e).__name__}: {e})"
        return None
    _cupy = cupy
    return _cupy


def gpu_available():
    return _load_cupy() is not None


# --- compiled kernels ---------------------------------------------------------------------------

_compiled = {}  # name -> module or None (not importable)
_compiled_errors = {}


def compiled(name):
    """The built extension module fastseq._ext.<name>, or None when it cannot be imported,
    whatever the engine (the engine tests compare it with the NumPy path)."""
    if name not in _compiled:
        try:
            _compiled[name] = importlib.import_module(f"fastseq._ext.{name}")
        except ImportError as e:
            _compiled[name] = None
            _compiled_errors[name] = f"{type(e).__name__}: {e}"
        else:
            _limit_blas()  # the extension may have loaded another BLAS (SciPy's)
            if name == "_optim_cpu" and compiled("_lstm_cpu") is not None:
                # one set of worker threads per process: the LSTM kernel's
                _compiled[name].set_pool(_compiled["_lstm_cpu"].pool_address())
    return _compiled[name]


def ext(name):
    """fastseq._ext.<name> when the engine is cython and it is built, else None (then the caller
    runs its NumPy code)."""
    if config.kernel != "cython":
        return None
    return compiled(name)


def cython_available():
    return compiled("_lstm_cpu") is not None


# --- choosing the engine ------------------------------------------------------------------------

def _default_engine():
    if _ENV["kernel"] is not None:
        return _ENV["kernel"]
    if _ENV["gpu"]:
        return "cupy"
    return "cython" if cython_available() else "numpy"


def use(name="auto"):
    """Select the engine: 'numpy', 'cython', 'cupy', or 'auto' (the environment's choice).
    Raises BackendError when it cannot run here. Returns the array module."""
    global xp
    if name in (None, "auto"):
        name = _default_engine()
        if name == "cupy" and not gpu_available():  # recorded; require_requested_engine raises
            name = "cython" if cython_available() else "numpy"
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; expected numpy, cython, cupy or auto")
    if name == "cupy":
        cp = _load_cupy()
        if cp is None:
            raise BackendError(f"GPU requested but unavailable: {_cupy_error}")
        xp = cp
    else:
        if name == "cython" and not cython_available():
            raise BackendError(f"the cython engine is not built here "
                               f"({_compiled_errors.get('_lstm_cpu', 'not importable')}); "
                               f"reinstall with a C compiler, or use the numpy engine")
        xp = np
    config.array = "cupy" if name == "cupy" else "numpy"
    config.kernel = name
    return xp


@contextlib.contextmanager
def using(name):
    """Run a block on another engine, then restore the previous configuration."""
    global xp
    saved, saved_xp = dataclasses.replace(config), xp
    try:
        use(name)
        yield config
    finally:
        for f in dataclasses.fields(Config):
            setattr(config, f.name, getattr(saved, f.name))
        xp = saved_xp


def _limit_blas():
    """Cap the BLAS pools loaded so far at config.blas_threads when that is below the CPU count
    (FASTSEQ_THREADS=1: every product single-threaded too); by default the BLAS keeps its own."""
    if config.blas_threads >= config.cpus:
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    threadpool_limits(config.blas_threads, user_api="blas")


def set_threads(n=None):
    """Change config.threads (None: back to FASTSEQ_THREADS or the CPU count) and the per-kernel
    thread fields derived from it."""
    if n is not None and (isinstance(n, bool) or int(n) != n or n < 1):
        raise ValueError(f"threads must be an integer >= 1, got {n!r}")
    config.threads = int(n) if n is not None else (_ENV["threads"] or config.cpus)
    _thread_policy(config)
    _limit_blas()


def is_gpu():
    return xp is not np


def requested_gpu():
    return config.gpu_requested


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
                           f"({_compiled_errors.get('_lstm_cpu', 'not importable')})")


# --- arrays ---------------------------------------------------------------------------------------

def _imported_cupy():
    """cupy if anything has imported it (arrays may come from user code), else None."""
    return _cupy if _cupy is not None else sys.modules.get("cupy")


def get_array_module(*arrays):
    """numpy or cupy, whichever owns the given arrays (numpy for plain Python values)."""
    cp = _imported_cupy()
    if cp is not None:
        return cp.get_array_module(*arrays)
    return np


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
    if xp is np:
        return np.asarray(to_cpu(a), dtype=dtype)
    return xp.asarray(a, dtype=dtype)


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
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    pools = []
    for d in threadpool_info():
        folder = os.path.basename(os.path.dirname(d.get("filepath", "")))
        owner = f" ({folder[:-5]})" if folder.endswith(".libs") else ""  # a wheel's bundled copy
        name = d.get("internal_api", "?") + owner
        pools.append((name, d.get("num_threads")))
    return pools


def info():
    """The resolved configuration as a dict (engine, kernel, cpus, threads, BLAS pools...)."""
    d = dataclasses.asdict(config)
    d["engine"] = config.kernel
    d["lstm"] = config.kernel  # the LSTM engine (kept for older readers of metrics.json)
    d["cython_built"] = cython_available() if config.kernel != "numpy" else None
    d["blas_pools"] = _blas_pools()
    if is_gpu():
        dev = xp.cuda.Device()
        d["device"] = xp.cuda.runtime.getDeviceProperties(dev.id)["name"].decode()
    return d


def describe():
    """One line for logs: engine, CPUs, threads and BLAS pools."""
    d = info()
    s = f"engine: {d['engine']} ({d['array']} arrays)"
    if "device" in d:
        s += f" on {d['device']}"
    s += f"; {d['cpus']} CPUs, {d['threads']} threads"
    if d["blas_pools"]:
        s += "; " + ", ".join(f"{api} {n} threads" for api, n in d["blas_pools"])
    return s


config = Config(cpus=available_cpus(), data_dir=_ENV["data_dir"], ptb_url=_ENV["ptb_url"],
                gpu_requested=_ENV["gpu"] or _ENV["kernel"] == "cupy")
set_threads()
try:
    use("auto")
except BackendError as e:  # FASTSEQ_KERNEL=cython without the build: NumPy runs meanwhile
    _problems.append(str(e))
    use("numpy")
for _p in _problems:
    warnings.warn(f"fastseq: {_p}", RuntimeWarning, stacklevel=2)
