"""The drawing process: how it is started, how jobs and results travel, and its main loop.

How the child is started: ``sys.executable -c <bootstrap>`` through :mod:`subprocess` -- a fresh
interpreter, like multiprocessing's "spawn" (never ``fork``: the training process has torch threads), but
without re-running the user's ``__main__`` script in the child (multiprocessing's spawn does that, so a
training script without an ``if __name__ == "__main__":`` guard would start a second training run). The
bootstrap registers ``lit_probe`` as a bare namespace, so the child imports this module,
:mod:`lit_probe.compose` and :mod:`lit_probe.figures` (numpy + matplotlib) and never torch or Lightning.

The protocol: frames over the child's stdin/stdout, each a pickle (protocol 5) whose array buffers travel
out of band, written straight from the arrays and read straight into the arrays' memory (no second copy in a
pickle blob on either side). The parent sends an init dict (``dpi``, ``bins``, ``max_channels``, ``scales``),
then :class:`~lit_probe.compose.Job` objects and finally ``"stop"``; the child answers ``("ready", pid)``
once, then ``("done", job_id, Result)`` per job. The child's own prints go to stderr. It ignores SIGINT (the
training process decides), starts at ``nice`` +5 and, once ready, draws at the lowest priority (``nice`` 19 and
``SCHED_BATCH`` on Linux: about 1.5 % of a core while a training thread wants it, never preempting one on wakeup;
every idle cycle otherwise), with one thread per numeric library, and exits on the stop message, when its stdin
closes or when its parent is gone. A training that uses every core (``torch.set_num_threads(cores)``) then has its
figures drawn mostly in the cycles it leaves idle, and at fit end (bounded by ``figure_wait_s``); it still pays a
little (``benchmarks/paired.py --threads 2``: 1.139x with figures against 1.071x without on 2 cores before
``figure_share`` bounded how long it draws while training runs; 1.102x and 1.020x in two runs after). ``SCHED_IDLE``
was tried: it left the drawing so few cycles that a figure step's figures missed ``figure_wait_s``.

How long it draws while training runs (``figure_share``), the queue that feeds it, and what happens when it
cannot start, are :mod:`lit_probe.render`'s. This module
imports neither torch, lightning nor wandb.
"""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
import threading
import time
from typing import IO, Any

from .compose import Drawer
from .figures import ColorScale

__all__ = ["child_command", "child_env", "child_main", "end_process", "read_frame", "start_child",
           "write_frame"]

CHILD_NICE = 5  # while it starts (imports matplotlib): ready soon even on a busy machine
#: The niceness it draws at once ready: the lowest priority, so that it takes only cycles the training leaves idle.
DRAW_NICE = 19
_HEAD = struct.Struct("<QQ")  # pickle bytes, number of out-of-band buffers


def write_frame(f: IO[bytes], obj: Any) -> None:
    """Write one frame (a pickle and its out-of-band buffers) and flush."""
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    raws = [b.raw() for b in buffers]
    f.write(_HEAD.pack(len(data), len(raws)) + struct.pack(f"<{len(raws)}Q", *(r.nbytes for r in raws)))
    f.write(data)
    for r in raws:
        f.write(r)
    f.flush()


def _read_into(f: IO[bytes], buf: bytearray) -> bool:
    view, got = memoryview(buf), 0
    while got < len(buf):
        n = f.readinto(view[got:])  # type: ignore[attr-defined]
        if not n:
            return False
        got += n
    return True


def read_frame(f: IO[bytes]) -> Any:
    """Read one frame written by :func:`write_frame`; ``None`` at end of stream."""
    head = bytearray(_HEAD.size)
    if not _read_into(f, head):
        return None
    n, k = _HEAD.unpack(head)
    sizes = bytearray(8 * k)
    data = bytearray(n)
    if not _read_into(f, sizes) or not _read_into(f, data):
        return None
    buffers = []
    for size in struct.unpack(f"<{k}Q", sizes):
        b = bytearray(size)
        if not _read_into(f, b):
            return None
        buffers.append(b)
    return pickle.loads(data, buffers=buffers)


def _watch_parent(parent: int) -> None:
    """Exit the child when its parent is gone (its stdin may stay open in the parent's forked children)."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(0)


def _lower_priority() -> None:
    """Draw at the lowest priority (:data:`DRAW_NICE`, and ``SCHED_BATCH`` where there is one): a drawing process
    beside a training that uses every core would otherwise take a share of one core from a training thread, and
    every parallel region of the training waits for its slowest thread."""
    try:
        os.nice(max(0, DRAW_NICE - os.nice(0)))
    except (OSError, AttributeError):
        pass
    batch = getattr(os, "SCHED_BATCH", None)
    if batch is not None:
        try:
            os.sched_setscheduler(0, batch, os.sched_param(0))
        except (OSError, AttributeError):
            pass


def child_main(parent: int) -> None:
    """Entry point of the drawing process: read jobs from stdin, write results to stdout, until "stop"."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the parent decides
    inp = sys.stdin.buffer
    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints go to stderr, never into the protocol
    try:
        os.nice(CHILD_NICE)
    except (OSError, AttributeError):
        pass
    threading.Thread(target=_watch_parent, args=(parent,), name="lit-probe-watch", daemon=True).start()
    try:
        init = read_frame(inp)
        if init is None:
            return
        scales = {}
        for key, (sym, lo, hi) in init.pop("scales", {}).items():
            sc = ColorScale(symmetric=sym)
            sc.lo, sc.hi = lo, hi
            scales[key] = sc
        drawer = Drawer(scales=scales, **init)
        write_frame(out, ("ready", os.getpid()))
        _lower_priority()
        while True:
            job = read_frame(inp)
            if job is None or job == "stop":
                break
            write_frame(out, ("done", job.id, drawer.run_safely(job)))
    except (BrokenPipeError, OSError):  # the parent went away
        pass
    finally:
        try:
            out.close()
        except OSError:
            pass


_BOOTSTRAP = """\
import sys, types
sys.path[:0] = {paths!r}
_pkg = types.ModuleType("lit_probe"); _pkg.__path__ = [{pkg!r}]; sys.modules["lit_probe"] = _pkg
from lit_probe.drawing import child_main
child_main({parent!r})
"""


def child_command() -> list[str]:
    """The command line of the drawing process (``sys.executable -c <bootstrap>``)."""
    if not sys.executable:
        raise RuntimeError("sys.executable is not set (embedded interpreter)")
    pkg_dir = os.path.dirname(os.path.abspath(__file__))
    paths = [p for p in sys.path if isinstance(p, str)]
    return [sys.executable, "-c", _BOOTSTRAP.format(paths=paths, pkg=pkg_dir, parent=os.getpid())]


def child_env() -> dict[str, str]:
    """The child's environment: one thread per numeric library, the Agg backend."""
    env = dict(os.environ)
    # one thread per library in the child: drawing needs none, and the training process needs the cores
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg")
    return env


def start_child() -> subprocess.Popen:
    """Start a drawing process with pipes to its stdin and stdout (raises when it cannot be started)."""
    return subprocess.Popen(child_command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=child_env(),
                            close_fds=True)


def end_process(proc: Any, grace: float) -> None:
    """Wait ``grace`` seconds for ``proc`` to exit, then terminate, then kill; always reap it."""
    if grace > 0:
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    if proc.poll() is None:
        try:
            proc.terminate()
            proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        except OSError:
            pass
