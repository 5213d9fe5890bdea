"""Helpers for the test tiers (imported by tests as ``testutil``)."""

import functools
import os
import shutil
import sys


@functools.lru_cache(maxsize=None)
def gpu_count() -> int:
    """Visible CUDA GPUs (0 with no driver)."""
    try:
        import cupy
        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:
        return 0


def gpu_skip_reason(min_gpus: int = 1):
    """None if the GPU tier can run here, else why not."""
    n = gpu_count()
    if n < min_gpus:
        return f"needs {min_gpus} CUDA GPU(s), found {n}"
    return None


def world():
    """MPI.COMM_WORLD (imports mpi4py lazily)."""
    from mpi4py import MPI
    return MPI.COMM_WORLD


def assert_all_ranks(comm, ok: bool, message: str = "") -> None:
    """Collective assert: every rank learns whether any rank failed, so none hangs in a later
    collective; each failing rank's message is reported."""
    msgs = comm.allgather(None if ok else message)
    bad = [(r, m) for r, m in enumerate(msgs) if m is not None]
    assert not bad, "; ".join(f"rank {r}: {m}" for r, m in bad)


def launched_by_mpi() -> bool:
    """True when a launcher (mpiexec, mpirun, srun) started this process: its environment says so."""
    return any(v in os.environ for v in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMI_RANK", "PMIX_RANK",
                                         "MPI_LOCALNRANKS", "HYDI_CONTROL_FD"))


def find_mpiexec():
    """mpiexec next to this interpreter (pip mpich) or on PATH; None if there is none."""
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if os.path.isfile(here):
        return here
    return shutil.which("mpiexec") or shutil.which("mpirun")


# ------------------------------------------------------------------------------------------------
# scripts run in-process, and the shared mpiexec sessions
# ------------------------------------------------------------------------------------------------
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")

# What each shared ``mpiexec -n N`` session runs besides tests/multirank (tests/session_runs.py runs
# them): name -> (script relative to the repository, its arguments). The tests that check them read
# their records (``SessionResult.record``); the 1-rank runs of the same scripts happen in the main
# pytest process (``run_script``).
SESSION_RUNS = {
    2: {"jax_moe_train": ("examples/jax_moe_train.py", ("--steps", "20")),
        "cupy_moe_inference": ("examples/cupy_moe_inference.py", ()),
        "readme_cupy": ("examples/readme_cupy.py", ()),
        "readme_jax": ("examples/readme_jax.py", ()),
        "seed_scripts": ("tests/seed_scripts.py", ("--backend", os.environ.get("DEEPEP_CUPY_SEED_BACKEND",
                                                                             "reference")))},
    3: {"jax_moe_train": ("examples/jax_moe_train.py", ("--steps", "20")),
        "cupy_moe_inference": ("examples/cupy_moe_inference.py", ()),
        "cupy_moe_inference_fp8": ("examples/cupy_moe_inference.py", ("--fp8",))},
}
NEEDS_JAX = {"jax_moe_train", "readme_jax"}

# Files of tests/multirank a session of that size leaves out. The JAX operations' tests run at 2
# ranks (the acceptance of issue #13); at 3 ranks JAX is covered by the training example's run above,
# and the file's 40 jitted programs per rank would cost about a minute of the 2-core CI machine's CPU.
SUITE_LEAVES_OUT = {3: ("test_jax_multirank.py",)}


def scripts_in_process() -> bool:
    """Whether the scripts of SESSION_RUNS (and their 1-rank runs) run inside pytest processes: where
    no GPU is visible, so they run on the reference backend. With GPUs each run keeps its own
    interpreters (``launch_script``), as a user runs it: a CUDA context, NVSHMEM and JAX's GPU memory
    per process."""
    return gpu_count() == 0


def launch_script(path, args=(), num_ranks=1, timeout=600, env=None):
    """``python3 path args...`` in new interpreters: alone, or under ``mpiexec -n num_ranks`` (skips
    without mpiexec); ``env``: more environment. Returns (exit status, stdout followed by stderr)."""
    import subprocess
    import pytest
    path = path if os.path.isabs(path) else os.path.join(ROOT, path)
    cmd = [sys.executable, path, *map(str, args)]
    if num_ranks > 1:
        mpiexec = find_mpiexec()
        if mpiexec is None:
            pytest.skip("no mpiexec (pip install mpich)")
        cmd = [mpiexec, "-n", str(num_ranks), *cmd]
        if "Open MPI" in subprocess.run([mpiexec, "--version"], capture_output=True, text=True).stdout:
            cmd[1:1] = ["--oversubscribe", "--allow-run-as-root"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}),
               PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    return proc.returncode, proc.stdout + proc.stderr


def run_script(path, args=()):
    """Run ``python3 path args...`` in this process instead of a new interpreter: the file as
    ``__main__`` with ``sys.argv`` set, stdout and stderr captured. Returns (exit status, stdout
    followed by stderr): apart, so that a line another thread writes to stderr meanwhile (a kernel
    build's progress) cannot split one of the script's printed lines.

    A new Python process costs 1 - 3 s of CPU before the script's first line (numpy, ml_dtypes'
    dtype registration, mpi4py, JAX), on the CPU tier's 2 cores. The script gets a fresh
    ``__main__`` namespace; ``sys.argv``, the environment and JAX's matmul precision (which the JAX
    examples set) are put back afterwards.
    """
    import contextlib
    import io
    import runpy
    import traceback
    path = path if os.path.isabs(path) else os.path.join(ROOT, path)
    out, err = io.StringIO(), io.StringIO()
    saved_argv, saved_env = sys.argv[:], dict(os.environ)
    jax = sys.modules.get("jax")
    saved_precision = jax.config.jax_default_matmul_precision if jax is not None else None
    rc = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            sys.argv = [path, *map(str, args)]
            try:
                runpy.run_path(path, run_name="__main__")
            except SystemExit as e:   # what the interpreter would make of it
                if e.code is None:
                    rc = 0
                elif isinstance(e.code, int):
                    rc = e.code
                else:
                    print(e.code, file=sys.stderr)
                    rc = 1
            except Exception:  # noqa: BLE001 - an uncaught exception: traceback, status 1
                traceback.print_exc()
                rc = 1
    finally:
        sys.argv = saved_argv
        for key in set(os.environ) - set(saved_env):   # key by key: other threads (the kernel
            del os.environ[key]                         # builds' nvcc) may start processes now
        for key, value in saved_env.items():
            if os.environ.get(key) != value:
                os.environ[key] = value
        jax = sys.modules.get("jax")
        if jax is not None:
            jax.config.update("jax_default_matmul_precision", saved_precision)
    return rc, out.getvalue() + err.getvalue()


class SessionResult:
    """One finished ``mpiexec -n N`` session: exit status, merged output, the records directory."""

    def __init__(self, num_ranks, cmd, returncode, output, records_dir, suite=False, skip=None):
        self.num_ranks, self.cmd, self.returncode, self.output = num_ranks, cmd, returncode, output
        self.records_dir, self.suite, self.skip = records_dir, suite, skip

    def record(self, name):
        """``{"returncodes": [per rank], "output": every rank's output in rank order}`` of the
        session's run ``name`` (SESSION_RUNS), or a failure naming what happened to the session."""
        import json
        if self.skip:
            import pytest
            pytest.skip(self.skip)
        path = os.path.join(self.records_dir, f"{name}.json")
        if not os.path.exists(path):
            import glob
            notes = "".join(open(p).read() for p in sorted(glob.glob(os.path.join(
                self.records_dir, f"{name}.aborted.rank*.txt"))))   # tests/session_runs.py: a rank gave up
            raise AssertionError(f"{name} left no record in `{self.cmd}` (exit {self.returncode}):\n"
                                 f"{notes[-6000:]}{self.output[-6000:]}")
        with open(path) as f:
            return json.load(f)


class MpiSessions:
    """The CPU tier's multi-rank runs, one ``mpiexec -n N python -m pytest`` per rank count.

    Each session runs tests/multirank (when test_mpi_launch.py's suite test is selected) and
    tests/session_runs.py: the examples, the README's examples and the seed scripts' shared launch at
    that rank count, in the ranks' pytest processes (``run_script``). One launch per rank count
    instead of one per script and rank count saves the interpreter, MPI and JAX start-up of 21
    processes (1 - 3 s of CPU each; the 2-core CI machine is CPU-bound). conftest.py starts the
    sessions when collection ends, so they run while the single-process tests do; the tests that
    check them wait for them (``result``).
    """

    LIMIT_S = 900

    def __init__(self):
        self._procs, self._results, self._waiting, self._dir = {}, {}, {}, None
        self._lock = __import__("threading").Lock()
        self._stopped = False

    def start(self, num_ranks, suite=False):
        """Launch the ``num_ranks`` session unless it runs already (``suite``: with tests/multirank)."""
        import subprocess
        import tempfile
        with self._lock:
            if num_ranks in self._procs or num_ranks in self._results or self._stopped:
                return
            mpiexec = find_mpiexec()
            why = ("no mpiexec (pip install mpich)" if mpiexec is None else
                   "already running under a launcher (no nested mpiexec)" if launched_by_mpi() else None)
            if why:
                self._results[num_ranks] = SessionResult(num_ranks, "", None, "", None, suite, skip=why)
                return
            if self._dir is None:
                self._dir = tempfile.mkdtemp(prefix="deepep_cupy_test_sessions.")
            work = os.path.join(self._dir, f"n{num_ranks}")
            os.makedirs(os.path.join(work, "records"))
            paths = (([os.path.join(TESTS, "session_runs.py")] if scripts_in_process() else [])
                     + ([os.path.join(TESTS, "multirank")] if suite else []))
            if not paths:   # with GPUs and without the suite: nothing for a session to run
                self._results[num_ranks] = SessionResult(num_ranks, "", None, "", None, suite,
                                                         skip="with GPUs the scripts run in their own processes")
                return
            # hypothesis is unused in these files; its pytest plugin alone costs ~1 s of CPU per rank
            ignore = [f"--ignore={os.path.join(TESTS, 'multirank', f)}" for f in SUITE_LEAVES_OUT.get(num_ranks, ())
                      if suite and scripts_in_process()]     # with GPUs every file runs
            cmd = [mpiexec, "-n", str(num_ranks), sys.executable, "-m", "pytest", "-q", "-rfE",
                   "-p", "no:cacheprovider", "-p", "no:hypothesispytest", *ignore, *paths]
            if "Open MPI" in subprocess.run([mpiexec, "--version"], capture_output=True, text=True).stdout:
                cmd[1:1] = ["--oversubscribe", "--allow-run-as-root"]
            env = dict(os.environ, PYTHONUNBUFFERED="1", DEEPEP_CUPY_CACHE_DIR=os.path.join(work, "kernels"),
                       DEEPEP_CUPY_TEST_RECORDS=os.path.join(work, "records"),
                       PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
            log = open(os.path.join(work, "output.txt"), "w+")
            # own process group: a hung session is killed with all its ranks
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=TESTS,
                                    start_new_session=True)
            self._procs[num_ranks] = (proc, log, " ".join(cmd), os.path.join(work, "records"), suite)

    def result(self, num_ranks, suite=False) -> SessionResult:
        """The finished session (started now if it was not: a test run some other way)."""
        self.start(num_ranks, suite)
        with self._lock:
            if num_ranks in self._results:
                return self._results[num_ranks]
            waiting = self._waiting.setdefault(num_ranks, __import__("threading").Lock())
        with waiting:     # one waiter reads the session's end; the others find its result
            with self._lock:
                if num_ranks in self._results:
                    return self._results[num_ranks]
                proc, log, cmd, records, with_suite = self._procs[num_ranks]
            import subprocess
            try:
                rc = proc.wait(timeout=self.LIMIT_S)
                note = ""
            except subprocess.TimeoutExpired:
                self._kill(proc)
                rc, note = proc.wait(), f"\n(killed after {self.LIMIT_S} s)"
            log.seek(0)
            res = SessionResult(num_ranks, cmd, rc, log.read() + note, records, with_suite)
            log.close()
            with self._lock:
                self._procs.pop(num_ranks, None)
                self._results[num_ranks] = res
            return res

    @staticmethod
    def _kill(proc):
        import signal
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            proc.kill()

    def stop(self):
        """End sessions still running (an interrupted run) and remove their files."""
        import shutil
        with self._lock:
            self._stopped = True
            procs, self._procs = list(self._procs.values()), {}
        for proc, log, *_ in procs:
            if proc.poll() is None:
                self._kill(proc)
                proc.wait()
            log.close()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)


SESSIONS = MpiSessions()
