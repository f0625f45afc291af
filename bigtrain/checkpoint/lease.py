"""One owner per run dir: `<run dir>/owner.json`, a lease that rank 0 of the training job renews while it trains.

Why: torchrun starts its workers in sessions of their own, so when its agent dies — or a node drops off the
network while its processes live on, and Slurm requeues the job elsewhere — the old workers go on training,
saving and pruning while the new job resumes from the same run dir. Two writers there lose checkpoints.
So a training job takes the run dir's lease before it touches the run dir, and:

- at start: no lease, a stale one (not renewed for `checkpoint.lease_timeout_s`), or one whose process on this
  host is gone (this job restarted after a crash, or a new one after a hang's exit: rank 0, the only rank that
  publishes and prunes, is dead) is taken, the takeover in one log line; a lease of this same job held on
  another host (a requeue while the old node may live on) is waited on until it goes stale; any other live
  lease stops the start with one line naming its holder (exit 2);
- while training, a thread renews it every timeout / 5 s (an atomic rewrite), and stops once it is not ours;
- before every save, and again before a checkpoint is published and older ones pruned, `problem()` tells
  whether it is still ours: a job that lost its lease stops with one line before it writes or deletes anything;
- at exit it is deleted, if still ours.

Staleness compares the time written in the lease with this host's clock: the nodes' clocks must agree to well
within the timeout (NTP), as Slurm's own need.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from bigtrain.core.errors import UserError, say

LEASE_FILE = "owner.json"
JOB_ID_VARIABLES = ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID")  # the first one set names the job


class RunDirLease:
    """This process's claim on a run dir (rank 0 of a training job holds one; see the module docstring)."""

    def __init__(self, run_dir: Path, timeout_s: float, *, log=say, poll_s: float | None = None):
        self.path = Path(run_dir) / LEASE_FILE
        self.timeout_s = timeout_s
        self.log = log
        self.poll_s = poll_s if poll_s is not None else min(5.0, timeout_s / 5)
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "job_id": job_id(), "token": uuid.uuid4().hex}
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    # -- start ------------------------------------------------------------------------------------

    def acquire(self) -> None:
        """Take the lease, or raise UserError naming its live holder (see the module docstring)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        waited_since = None
        while True:
            holder = self._read()
            if holder is None:
                try:
                    self._write(exclusive=True)  # two jobs starting at once: one creates it, the other looks again
                    return
                except FileExistsError:
                    continue
            age = time.time() - float(holder.get("renewed_at", 0))
            same_job = holder.get("job_id") == self.me["job_id"]
            if not holder:
                reason = "its lease file is unreadable"
            elif holder.get("host") == self.me["host"] and not _pid_alive(holder.get("pid")):
                reason = "its process is gone (a crash or a hang's exit: it can write nothing more)"
            elif age > self.timeout_s:
                reason = f"not renewed for {age:.0f} s (checkpoint.lease_timeout_s={self.timeout_s:g})"
            elif same_job and holder.get("host") != self.me["host"] and \
                    (waited_since is None or time.monotonic() - waited_since < self.timeout_s + 2 * self.poll_s):
                if waited_since is None:  # a requeue: the old node may still run the old workers
                    waited_since = time.monotonic()
                    self.log(f"bigtrain: {self.path} is held by {describe(holder)} of this same job; waiting up to "
                             f"{self.timeout_s:g} s for it to go stale (checkpoint.lease_timeout_s)")
                time.sleep(self.poll_s)
                continue
            else:
                raise UserError(f"run dir {self.path.parent} is in use by {describe(holder)} (its lease {self.path} "
                                f"was renewed {age:.0f} s ago) — stop that job first or train into another run.name; "
                                f"a lease not renewed for checkpoint.lease_timeout_s={self.timeout_s:g} s is taken over")
            self._write()
            self.log(f"bigtrain: took over the run dir from {describe(holder)}: {reason}")
            return

    def start_renewing(self) -> None:
        """Renew the lease every timeout / 5 s on a daemon thread until `release()` or until it is lost."""
        self._renewer = threading.Thread(target=self._renew, name="bigtrain-lease", daemon=True)
        self._renewer.start()

    # -- while training ---------------------------------------------------------------------------

    def problem(self) -> str | None:
        """None while the lease is ours; else the one line that stops this job (another job took the run dir)."""
        holder = self._read()
        if holder is None or holder.get("token") == self.me["token"]:
            return None  # deleted by hand: nobody else claims it, and the next renewal writes it again
        return (f"run dir {self.path.parent} was taken over by {describe(holder)} (see {self.path}); this job "
                f"stops here, before writing or deleting any checkpoint — the other job goes on from its checkpoints")

    def release(self) -> None:
        """Stop renewing; delete the lease if it is still ours (a job that lost it leaves the new owner's)."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        if self.problem() is None:
            self.path.unlink(missing_ok=True)

    def _renew(self) -> None:
        while not self._stop.wait(self.timeout_s / 5):
            try:
                lost = self.problem()
                if lost is not None:
                    self.log(f"bigtrain: warning: {lost}")
                    return
                self._write()
            except OSError as e:  # a filesystem hiccup: the next round tries again; a long one makes the lease stale
                self.log(f"bigtrain: warning: could not renew {self.path} ({e}); trying again")

    # -- the file ---------------------------------------------------------------------------------

    def _read(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # torn or unreadable: never renewed, so stale at once
        return holder if isinstance(holder, dict) else {}

    def _write(self, exclusive: bool = False) -> None:
        """Write the lease whole, then put it in place in one step (`exclusive`: only where none is)."""
        part = self.path.with_name(f".{self.path.name}.{self.me['token']}")
        with open(part, "w") as f:
            json.dump({**self.me, "renewed_at": time.time()}, f)
            f.flush()
            os.fsync(f.fileno())
        if not exclusive:
            os.replace(part, self.path)
            return
        try:
            os.link(part, self.path)  # fails where a file is: an atomic create-if-absent, contents and all
        finally:
            part.unlink()


def job_id() -> str | None:
    """The scheduler's name for this job (SLURM_JOB_ID, else torchrun's TORCHELASTIC_RUN_ID); None for a plain run."""
    return next((os.environ[name] for name in JOB_ID_VARIABLES if os.environ.get(name)), None)


def describe(holder: dict) -> str:
    job = f", job {holder['job_id']}" if holder.get("job_id") else ""
    return f"host {holder.get('host', '?')} pid {holder.get('pid', '?')}{job}"


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError, OverflowError):
        return True  # another user's process, or no pid to check: assume it lives
    return True
