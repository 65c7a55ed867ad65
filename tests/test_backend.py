"""fastseq.backend: one engine configuration, read once; a pure numpy engine; no import cycles."""
import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from fastseq import backend

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fastseq"


def _run(code, **env):
    full = {k: v for k, v in os.environ.items()
            if not k.startswith("FASTSEQ_") and k != "GPU"}
    full.update(env, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=full, cwd=ROOT, timeout=600)


# --- import graph -------------------------------------------------------------------------------

def _module_name(path):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path, name):
    """fastseq modules imported anywhere in the file (module level or inside functions)."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "fastseq")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "fastseq":
                continue
            found.add(mod)
            for a in node.names:  # `from . import lstm` imports a module
                found.add(f"{mod}.{a.name}")
    return found


def import_graph():
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    graph = {}
    for name, path in files.items():
        deps = set()
        for m in _imports(path, name):
            while m and m not in modules:  # `from .x import name`: the module is x
                m = m.rpartition(".")[0]
            if m and m != name and not name.startswith(m + "."):  # a package's own parents
                deps.add(m)
        graph[name] = deps
    return graph


def find_cycle(graph):
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == "open":
                return stack[stack.index(d):] + [d]
            if d not in state:
                cycle = visit(d)
                if cycle:
                    return cycle
        stack.pop()
        state[n] = "done"
        return None

    for n in sorted(graph):
        if n not in state:
            cycle = visit(n)
            if cycle:
                return cycle
    return None


def test_no_import_cycle_in_fastseq():
    graph = import_graph()
    assert "fastseq.layers" in graph and "fastseq.ops" in graph["fastseq.layers"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_backend_imports_nothing_above_it():
    assert import_graph()["fastseq.backend"] == set()


def test_only_backend_reads_the_environment_or_imports_ext():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        if name == "fastseq.backend":
            continue
        if any(m.startswith("fastseq._ext") for m in _imports(path, name)):
            offenders.append(f"{name} imports fastseq._ext")
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv")
                    and isinstance(node.value, ast.Name) and node.value.id == "os"):
                offenders.append(f"{name} reads os.{node.attr}")
    assert not offenders


# --- configuration -------------------------------------------------------------------------------

def test_config_fields():
    import dataclasses
    c = backend.config
    assert [f.name for f in dataclasses.fields(c)] == ["engine", "threads"]
    assert c.engine in backend.ENGINES and c.threads >= 1
    assert 1 <= backend.CPUS <= len(os.sched_getaffinity(0))
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.threads = 2  # replaced by use(), never changed in place
    info = backend.info()
    for key in ("engine", "cpus", "threads", "blas_pools"):
        assert key in info
    line = backend.describe()
    assert f"engine: {c.engine}" in line and f"{c.threads} threads" in line


def test_cgroup_quota_caps_cpus(monkeypatch):
    monkeypatch.setattr(backend, "_cgroup_cpus", lambda: 1)
    assert backend.available_cpus() == 1
    monkeypatch.setattr(backend, "_cgroup_cpus", lambda: None)
    assert backend.available_cpus() == len(os.sched_getaffinity(0))


def test_cgroup_v2_quota_parsing(tmp_path, monkeypatch):
    import builtins
    real_open = builtins.open

    def fake(text):
        def opener(path, *a, **k):
            if str(path) == "/sys/fs/cgroup/cpu.max":
                f = tmp_path / "cpu.max"
                f.write_text(text)
                return real_open(f, *a, **k)
            return real_open(path, *a, **k)
        return opener

    monkeypatch.setattr(builtins, "open", fake("150000 100000\n"))
    assert backend._cgroup_cpus() == 2
    monkeypatch.setattr(builtins, "open", fake("max 100000\n"))
    assert backend._cgroup_cpus() is None


def test_environment_is_read_once_at_import():
    r = _run("""
        import os
        from fastseq import backend
        os.environ["FASTSEQ_THREADS"] = "7"   # too late: the configuration is already resolved
        print(backend.config.threads, backend.DATA_DIR)
        """, FASTSEQ_THREADS="3", FASTSEQ_DATA="/tmp/fsdata")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["3", "/tmp/fsdata"]


def test_single_thread_setting():
    r = _run("""
        from fastseq import backend
        print(backend.config.threads)
        """, FASTSEQ_THREADS="1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["1"]


def test_one_thread_caps_the_blas_pools():
    r = _run("""
        import numpy as np
        import fastseq
        from threadpoolctl import threadpool_info
        m = fastseq.Seq2seq(13, 8, 16, seed=0)
        m.forward(np.zeros((4, 5), dtype=np.int64), np.ones((4, 3), dtype=np.int64))
        print(sorted({d["num_threads"] for d in threadpool_info() if d["user_api"] == "blas"}))
        """, FASTSEQ_THREADS="1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[-1] == "[1]"


@pytest.mark.parametrize("var,value", [("FASTSEQ_THREADS", "0"), ("FASTSEQ_THREADS", "two"),
                                       ("FASTSEQ_KERNEL", "fortran")])
def test_invalid_setting_warns_and_cli_exits_2(var, value):
    r = _run("import fastseq", **{var: value})
    assert r.returncode == 0 and f"{var}={value!r}" in r.stderr
    r = _run("import sys; from fastseq.train import main; sys.exit(main(['--epochs', '1']))",
             **{var: value})
    assert r.returncode == 2
    assert f"{var}={value!r}" in r.stderr and "Traceback" not in r.stderr


def test_gpu_wins_over_fastseq_kernel():
    r = _run("import sys; sys.modules['cupy'] = None\n"
             "from fastseq import backend; print(backend.requested_gpu())\n"
             "backend.require_requested_engine()", GPU="1", FASTSEQ_KERNEL="numpy")
    assert r.returncode == 1 and r.stdout.strip() == "True" and "GPU=1" in r.stderr


def test_use_threads_validates():
    old = backend.config
    with backend.using(threads=1):
        assert backend.config.threads == 1 and backend.config.engine == old.engine
        for bad in (0, -1, 1.5, True, "two"):
            with pytest.raises(ValueError, match="threads"):
                backend.use(threads=bad)
    assert backend.config == old


def test_use_switches_and_using_restores():
    from fastseq import ops
    before = (backend.config, backend.xp)
    with backend.using("numpy"):
        assert backend.config.engine == "numpy" and ops.engine_for(np.zeros(1)) is ops._numpy
    assert (backend.config, backend.xp) == before
    with pytest.raises(ValueError, match="unknown engine"):
        backend.use("fortran")


def test_cython_engine_uses_the_extension():
    if not backend.cython_available():
        pytest.skip("the cython engine is not built here")
    from fastseq import ops
    with backend.using("cython"):
        assert ops.engine_for(np.zeros(1))._cpu is backend.compiled() is not None


def test_numpy_engine_never_touches_the_extension(monkeypatch, numpy_kernel):
    """In process: with the numpy engine nobody asks for a compiled module."""
    from fastseq import Adam, Seq2seq, clip_grads
    calls = []
    monkeypatch.setattr(backend, "compiled", lambda: calls.append("compiled"))
    m = Seq2seq(13, 8, 16, seed=0)
    rng = np.random.default_rng(0)
    loss = m.forward(rng.integers(0, 13, (4, 5)), rng.integers(0, 13, (4, 4)))
    m.backward()
    clip_grads(m.grads, 0.1)
    Adam(0.01).update(m.params, m.grads)
    assert np.isfinite(loss) and calls == []


def test_gpu_requested_without_cupy_is_one_clear_line():
    code = """
        import sys
        sys.modules["cupy"] = None   # CuPy not installed
        from fastseq.train import main
        sys.exit(main(["--epochs", "1"]))
        """
    r = _run(code, GPU="1")
    assert r.returncode == 2, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "GPU" in lines[0] and "CuPy" in lines[0], r.stderr


def test_cupy_is_never_imported_without_gpu():
    r = _run("""
        import sys
        import numpy as np
        import fastseq
        m = fastseq.Rnnlm(20, 8, 8, seed=0)
        m.forward(np.zeros((2, 3), dtype=np.int64), np.ones((2, 3), dtype=np.int64))
        m.backward()
        print(fastseq.backend.describe())
        print("cupy" in sys.modules)
        """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[-1] == "False"


# --- the numpy engine is pure NumPy ----------------------------------------------------------------

PURE = """
    import sys
    sys.modules["fastseq._ext"] = None   # any import of the compiled extension now fails
    import numpy as np
    import fastseq
    from fastseq import backend
    assert backend.config.engine == "numpy", backend.config
    rng = np.random.default_rng(0)

    m = fastseq.PeekySeq2seq(13, 8, 16, seed=0)
    x, t = rng.integers(0, 13, (64, 7)), rng.integers(0, 13, (64, 5))
    tr = fastseq.Trainer(m, fastseq.Adam(1e-2), seed=0, progress=False)
    tr.fit(x, t, max_epoch=2, batch_size=16, max_grad=5.0)
    acc = fastseq.eval_seq2seq(m, x[:20], t[:20])
    assert 0 <= acc <= 1 and m.generate(x[:3], 1, 4).shape == (3, 4)

    lm = fastseq.BetterRnnlm(30, 16, 16, seed=0)
    corpus = rng.integers(0, 30, 2000)
    rt = fastseq.RnnlmTrainer(lm, fastseq.SGD(1.0), progress=False)
    rt.fit(corpus[:-1], corpus[1:], max_epoch=1, batch_size=4, time_size=5)
    lm.reset_state()
    assert len(lm.generate(1, sample_size=10, seed=0)) == 10
    ppl = fastseq.eval_perplexity(lm, corpus[:500], batch_size=4, time_size=5)
    assert np.isfinite(ppl)

    from fastseq.train import main
    rc = main(sys.argv[1:])
    assert rc in (0, None), rc
    assert not [k for k in sys.modules if k.startswith("fastseq._ext.")]
    print("pure", backend.describe())
    """


@pytest.mark.parametrize("env", [{"FASTSEQ_KERNEL": "numpy"}, {}],
                         ids=["FASTSEQ_KERNEL=numpy", "extension-missing"])
def test_numpy_engine_runs_with_the_extension_unimportable(tmp_path, env):
    data = tmp_path / "add.txt"
    rng = np.random.default_rng(1)
    data.write_text("".join(f"{a}+{b}".ljust(7) + f"_{a + b}".ljust(5) + "\n"
                            for a, b in rng.integers(0, 100, (300, 2))))
    r = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(PURE), "--epochs", "1", "--data", str(data),
         "--hidden-size", "16", "--wordvec-size", "8", "--batch-size", "32",
         "--out", str(tmp_path / "run"), "--no-progress"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("FASTSEQ_")},
             "PYTHONPATH": str(ROOT), **env})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "pure engine: numpy" in r.stdout
    assert (tmp_path / "run" / "model.npz").exists()


def test_readme_table_lists_every_variable_backend_reads():
    import re
    read = set(re.findall(r'env(?:\.get)?\(?\[?"([A-Z_]+)"', (PACKAGE / "backend.py").read_text()))
    table = set(re.findall(r"^\| `([A-Z_]+)` \|", (ROOT / "README.md").read_text(), re.M))
    assert read and read <= table, f"missing from README's table: {read - table}"
    assert table - read <= {"FASTSEQ_REQUIRE_EXT", "FASTSEQ_SIMD", "FASTSEQ_TEXTBOOK_DATA"}  # build, tests only


# --- BLAS threads ------------------------------------------------------------------------------------

def test_single_blas_thread_covers_every_thread_and_restores():
    """Inside single_blas_thread every BLAS runs on one thread, seen from any thread (nested and
    concurrent uses included); the counts come back when the last use leaves."""
    import threading
    libs = backend._blas_controllers()
    if not libs:
        pytest.skip("threadpoolctl finds no BLAS here")
    before = [lib.num_threads for lib in libs]
    seen = []
    with backend.single_blas_thread():
        def other():
            with backend.single_blas_thread():
                seen.append([lib.num_threads for lib in libs])
        t = threading.Thread(target=other)
        t.start()
        t.join()
        seen.append([lib.num_threads for lib in libs])
    assert seen == [[1] * len(libs)] * 2
    assert [lib.num_threads for lib in libs] == before


def test_kernels_blas_is_on_one_thread(cython_engine):
    """The compiled kernels call scipy-openblas32's BLAS; threadpoolctl sees it, and it runs each
    call on one thread (fastseq's workers split the work), so the kernels may use their worker
    threads."""
    kernel = backend.compiled()
    kernels_blas = [lib for lib in backend._blas_controllers() if backend._is_kernels(lib)]
    assert kernels_blas, "threadpoolctl does not see the kernels' BLAS"
    assert [lib.num_threads for lib in kernels_blas] == [1] * len(kernels_blas)
    assert kernel.can_thread()
    with backend.using(threads=1):
        assert [lib.num_threads for lib in kernels_blas] == [1] * len(kernels_blas)
