"""Stop a run cleanly on a signal or a deadline: every rank agrees, saves, and exits 75.

Why it works this way:

* A cluster ends jobs with signals. Slurm sends the warning signal the job asked for
  (``--signal``) before the time limit, and SIGTERM on preemption, ``scancel`` and
  ``scontrol requeue``, followed by SIGKILL after its ``KillWait`` (30 s by default). Users
  send SIGUSR1 or SIGUSR2. The handlers here only write down the first signal and when it
  came. Saving inside a handler would start collectives on one rank at an arbitrary point,
  for example in the middle of a step's all-reduce.
* At every step boundary all ranks all-reduce a small tensor (MAX) holding "a signal
  arrived here" and "rank 0's deadline is near". If any rank says yes, every rank stops at
  that boundary. They save one checkpoint together (the atomic ``save_checkpoint``, complete
  once ``latest`` names it), rank 0 writes :data:`STATUS_FILE`, and all exit with
  :data:`EXIT_STOPPED`. No rank saves alone and no collective is left half done.
* From a signal to a complete checkpoint takes at most the rest of the step in progress
  (with an evaluation, when one falls due at that step) plus one save. The time is
  measured and logged. Under SIGTERM this has to fit in Slurm's ``KillWait``. Under the
  warning signal it has to fit in the warning's lead time.
* Deadlines: ``trainer.max_minutes`` after training started, and the Slurm job's end time
  (``SLURM_JOB_END_TIME``, else ``squeue -o %e``). The run stops when the time left is less
  than one more step plus one save (the slowest of each measured so far, carried across
  requeues in the status file) plus ``trainer.stop_margin_seconds``.
* torchrun's agent dies of SIGUSR1/SIGUSR2 unless started with ``--signals-to-handle``. So
  under torchrun each worker asks the kernel for a SIGTERM when its parent dies
  (``PR_SET_PDEATHSIG``). If the agent is killed, the workers still stop at the next step
  boundary and save.
* torch's data-loader workers die of SIGTERM (a C handler of torch's), which would fail the
  main process before it saves; :func:`keep_data_workers_alive` makes them ignore it.
* torchrun collapses its workers' exit codes to 1, and ``srun --kill-on-bad-exit`` turns
  the codes of tasks that exit a moment later into 143. So launchers read the outcome from
  :data:`STATUS_FILE`. Rank 0 writes it after the checkpoint is complete and before any
  rank exits.

Exit codes of the training process: :data:`EXIT_FINISHED` (0) when ``trainer.max_steps``
is reached, :data:`EXIT_STOPPED` (75, ``EX_TEMPFAIL``: "run me again") after a stop with a
complete checkpoint, 3 after too many bad steps in a row
(:data:`ling_pretrain.train.bad_steps.EXIT_BAD_STEPS`), and 1 for errors.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import logging
import math
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from ling_pretrain.core.io import atomic_write_json

logger = logging.getLogger(__name__)

EXIT_FINISHED = 0
"""The run reached ``trainer.max_steps``."""
EXIT_STOPPED = 75
"""The run stopped on a signal or a deadline after saving a complete checkpoint; running it
again resumes it (``EX_TEMPFAIL``)."""
EXIT_REFUSED = 2
"""The run was refused before any work: a configuration mistake, or at start-up a checkpoint
it must not or cannot resume (damaged with ``checkpoint.on_damaged=error``, optimizer state
this layout cannot load). Running it again as it is fails the same way."""
STATUS_FILE = "exit_status.json"
"""Written by rank 0 into ``run.output_dir`` when a run finishes or stops cleanly."""
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
"""The signals that ask a run to save and stop."""

_PR_SET_PDEATHSIG = 1
_PARENT_DIED = 1000
"""Recorded instead of SIGTERM when the kernel sent it because torchrun's agent died."""
_lock = threading.Lock()
_received: tuple[int, float] | None = None
_previous: dict[int, Any] | None = None
_parent: int | None = None


class Stopped(Exception):
    """Raised by the training loop after a clean stop; the process should exit with
    :attr:`exit_code`."""

    def __init__(self, step: int, reason: str):
        super().__init__(f"stopped at step {step} ({reason})")
        self.step = step
        self.reason = reason
        self.exit_code = EXIT_STOPPED


def _handler(signum: int, frame: Any) -> None:
    global _received
    if _received is None:
        if signum == signal.SIGTERM and _parent is not None and os.getppid() != _parent:
            signum = _PARENT_DIED
        _received = (signum, time.time())


def _parent_gone() -> bool:
    """Whether torchrun's agent (the parent at start-up) has exited. A worker started from
    one of the agent's threads gets the parent-death signal when that thread exits, possibly
    before the rest of the agent: the parent may still look alive in the handler, so this is
    asked again when the stop is decided."""
    if _parent is None:
        return False
    if os.getppid() != _parent:
        return True
    try:
        with open(f"/proc/{_parent}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def _reason(code: int) -> str:
    if code == _PARENT_DIED or (code == signal.SIGTERM and _parent_gone()):
        return "torchrun agent died"
    return signal.Signals(code).name


def install_signal_handlers() -> bool:
    """Record SIGTERM, SIGUSR1 and SIGUSR2 instead of dying of them (idempotent).

    Under torchrun, also ask for a SIGTERM when the agent dies. Returns whether this call
    installed the handlers (False when they already were, or off the main thread, where
    Python cannot install any).
    """
    global _previous
    with _lock:
        if _previous is not None:
            return False
        if threading.current_thread() is not threading.main_thread():
            logger.warning("not on the main thread: signals will not stop the run cleanly")
            return False
        _previous = {s: signal.signal(s, _handler) for s in SIGNALS}
    if "TORCHELASTIC_RUN_ID" in os.environ:
        _die_with_parent()
    return True


def restore_signal_handlers() -> None:
    """Put back the handlers :func:`install_signal_handlers` replaced."""
    global _previous
    with _lock:
        if _previous is None:
            return
        for s, previous in _previous.items():
            signal.signal(s, previous)
        _previous = None


def keep_data_workers_alive() -> None:
    """Let data-loader workers outlive the stop signals, so the main process can save.

    torch's DataLoader workers install a C handler that makes SIGTERM fatal
    (``_set_worker_signal_handlers``). Slurm sends SIGTERM to every process of a job step, so
    a worker would die first and the main process would fail on its next batch ("DataLoader
    worker ... is killed by signal: Terminated") instead of saving. Workers started after
    this call ignore SIGTERM, SIGUSR1 and SIGUSR2; the main process decides. A worker ends
    when the main process shuts its loader down, when the main process dies (torch's
    watchdog), or at the main process's exit, where it is killed after 2 s: Python's
    multiprocessing would otherwise wait forever for a worker that ignores its SIGTERM. Idempotent; works for
    workers forked from this process (the default start method on Linux).
    """
    from torch.utils.data._utils import signal_handling

    original = signal_handling._set_worker_signal_handlers
    if getattr(original, "keeps_stop_signals", False):
        return

    def set_worker_signal_handlers(*args: Any, **kwargs: Any) -> None:
        original(*args, **kwargs)
        for s in SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        # A worker that ignores SIGTERM must not outlive its main process when that is
        # killed: it would hold the job step open (the nodes stay allocated) and keep the
        # rendezvous socket it inherited, so a requeued attempt could not bind it.
        _set_parent_death_signal(signal.SIGKILL)

    set_worker_signal_handlers.keeps_stop_signals = True
    signal_handling._set_worker_signal_handlers = set_worker_signal_handlers
    # atexit runs the newest handler first: before multiprocessing's, which joins children.
    atexit.register(_kill_data_workers)


def _kill_data_workers() -> None:
    """What multiprocessing does at exit to daemonic children (SIGTERM, then wait), except
    that the wait is bounded and a child that ignores SIGTERM is killed."""
    import multiprocessing

    children = [c for c in multiprocessing.active_children() if c.daemon]
    if not children:
        return
    # torch's SIGCHLD handler would report the workers ended here as failures.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in children:
        child.terminate()
    for child in children:
        child.join(timeout=2)
        if child.is_alive():
            child.kill()
            child.join(timeout=10)


def _set_parent_death_signal(sig: int) -> bool:
    """Have the kernel send ``sig`` to this process when its parent dies (Linux only);
    whether that took effect."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _die_with_parent() -> None:
    """Have the kernel send SIGTERM when the parent (torchrun's agent) dies (Linux only)."""
    global _parent
    parent = os.getppid()
    if not _set_parent_death_signal(signal.SIGTERM):
        return
    _parent = parent
    if os.getppid() != parent:  # the agent died before the request took effect
        _handler(int(signal.SIGTERM), None)


def received() -> tuple[int, float] | None:
    """The first stop signal this process got (its number) and its wall-clock time, or None."""
    return _received


def slurm_job_end_time(env: dict | None = None) -> float | None:
    """The Slurm job's end time (Unix seconds), or None outside Slurm or without a limit.

    Slurm 23.02+ exports ``SLURM_JOB_END_TIME``; older releases only tell ``squeue``.
    """
    env = os.environ if env is None else env
    job = env.get("SLURM_JOB_ID")
    if not job:
        return None
    value = env.get("SLURM_JOB_END_TIME")
    if value:
        try:
            return float(value)
        except ValueError:
            logger.warning("ignoring SLURM_JOB_END_TIME=%r: not a number", value)
    try:
        out = subprocess.run(
            ["squeue", "-h", "-j", job, "-o", "%e"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as err:
        logger.warning("cannot read the end time of Slurm job %s: %s", job, err)
        return None
    try:
        return datetime.fromisoformat(out).timestamp()  # squeue prints local time
    except ValueError:
        return None  # "N/A" or "Unknown": no time limit


def read_status(output_dir: str | os.PathLike) -> dict:
    """The last :data:`STATUS_FILE` written in ``output_dir`` ({} when none is readable)."""
    try:
        return json.loads((Path(output_dir) / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _clock(t: float) -> str:
    return datetime.fromtimestamp(t).strftime("%H:%M:%S.%f")[:-3]


@dataclass
class _Decision:
    reason: str
    """``SIGTERM``, ``SIGUSR1``, ``SIGUSR2``, ``torchrun agent died`` or ``time limit``."""
    since: float
    """Wall-clock time of the first signal on any rank, or of the decision for a deadline."""
    detail: str = ""


class StopRequests:
    """Decides, at step boundaries and the same way on every rank, whether to stop.

    Args:
        cfg: the job config (``trainer.max_minutes``, ``trainer.stop_margin_seconds``).
        output_dir: the run directory (status file, timings of earlier attempts).
        rank: this process's global rank; rank 0 owns the deadline and the status file.
    """

    def __init__(self, cfg: Any, output_dir: str, rank: int):
        self.output_dir = output_dir
        self.rank = rank
        self.margin = float(cfg.trainer.stop_margin_seconds)
        self.started = time.time()
        self.deadline: float | None = None
        self.deadline_source = ""
        self.slowest_step = 0.0
        self.slowest_save = 0.0
        self.decision: _Decision | None = None
        if rank != 0:
            return
        previous = read_status(output_dir)
        self.slowest_step = float(previous.get("slowest_step_seconds") or 0.0)
        self.slowest_save = float(previous.get("slowest_save_seconds") or 0.0)
        deadlines = []
        if cfg.trainer.max_minutes is not None:
            deadlines.append((self.started + 60.0 * cfg.trainer.max_minutes, "trainer.max_minutes"))
        end = slurm_job_end_time()
        if end is not None:
            deadlines.append((end, f"the end of Slurm job {os.environ['SLURM_JOB_ID']}"))
        if deadlines:
            self.deadline, self.deadline_source = min(deadlines)
            logger.info(
                "deadline %s (%s): stopping when less than one step + one save + %.0f s is left",
                datetime.fromtimestamp(self.deadline).isoformat(sep=" ", timespec="seconds"),
                self.deadline_source,
                self.margin,
            )

    def step_done(self, seconds: float) -> None:
        """Record how long a training step (with its logging and evaluation) took."""
        self.slowest_step = max(self.slowest_step, seconds)

    def save_done(self, seconds: float) -> None:
        """Record how long a checkpoint save took."""
        self.slowest_save = max(self.slowest_save, seconds)

    def _near_deadline(self) -> bool:
        if self.deadline is None:
            return False
        needed = self.slowest_step + self.slowest_save + self.margin
        return self.deadline - time.time() < needed

    def requested(self, device: Any) -> bool:
        """Collective: whether any rank got a stop signal or rank 0's deadline is near."""
        import torch
        import torch.distributed as dist

        got = received()
        near = self.rank == 0 and self._near_deadline()
        flags = torch.tensor(
            [
                1.0 if got else 0.0,
                1.0 if near else 0.0,
                -got[1] if got else -math.inf,
                float(got[0]) if got else 0.0,
            ],
            dtype=torch.float64,
            device=device,
        )
        if dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        signalled, timed_out, first, signum = flags.tolist()
        if signalled:
            self.decision = _Decision(_reason(int(signum)), -first)
        elif timed_out:
            now = time.time()
            left = self.deadline - now if self.deadline is not None else 0.0
            self.decision = _Decision(
                "time limit", now, f"{left:.0f} s before {self.deadline_source}"
            )
        return self.decision is not None

    def announce(self, step: int, save_needed: bool) -> None:
        """Log why the run stops at this boundary (a short line on ranks other than 0)."""
        d = self.decision
        if d is None:
            return
        if self.rank != 0:
            logger.warning("stopping at step %d (%s)", step, d.reason)
            return
        what = "saving a checkpoint" if save_needed else "its checkpoint is already complete"
        if d.reason == "time limit":
            logger.warning("time limit near (%s): stopping at step %d, %s", d.detail, step, what)
        else:
            logger.warning(
                "%s at %s: stopping at step %d, %s", d.reason, _clock(d.since), step, what
            )

    def finish(
        self,
        step: int,
        max_steps: int,
        checkpoint: str | None = None,
        failure: tuple[int, str] | None = None,
        collective: bool = True,
    ) -> None:
        """Collective (unless ``collective`` is false): rank 0 logs and writes the status file,
        then every rank waits for it.

        Call after the last checkpoint of this launch is complete, whether the run finished
        (no decision) or stopped (a decision was made by :meth:`requested`), or when it gives
        up without saving: ``failure`` is then its exit code and reason, and ``checkpoint``
        the newest one it leaves.
        """
        import torch.distributed as dist

        stopped = self.decision is not None and failure is None
        if self.rank == 0:
            now = time.time()
            if failure is not None:
                code, outcome, reason = failure[0], "failed", failure[1]
            elif stopped:
                code, outcome, reason = EXIT_STOPPED, "stopped", self.decision.reason
            else:
                code, outcome, reason = EXIT_FINISHED, "finished", "max_steps"
            status = {
                "exit_code": code,
                "outcome": outcome,
                "reason": reason,
                "step": step,
                "max_steps": max_steps,
                "checkpoint": checkpoint,
                "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT", "0")
                if "SLURM_JOB_ID" in os.environ
                else None,
                "slowest_step_seconds": round(self.slowest_step, 3),
                "slowest_save_seconds": round(self.slowest_save, 3),
                "time": datetime.fromtimestamp(now).isoformat(timespec="seconds"),
            }
            if stopped:
                elapsed = now - self.decision.since
                status["stop_requested_at"] = datetime.fromtimestamp(self.decision.since).isoformat(
                    timespec="milliseconds"
                )
                status["stop_to_checkpoint_seconds"] = round(elapsed, 3)
                logger.warning(
                    "%s at %s: checkpoint of step %d complete after %.2f s; exiting with "
                    "code %d (run again to resume)",
                    self.decision.reason,
                    _clock(self.decision.since),
                    step,
                    elapsed,
                    EXIT_STOPPED,
                )
            atomic_write_json(Path(self.output_dir) / STATUS_FILE, status)
        if collective and dist.is_initialized():
            dist.barrier()
