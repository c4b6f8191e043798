"""Data-parallel training over MPI: `mpiexec -n N dlc run FILE` (or `dlc run FILE --ranks N`).

Every rank loads the same program and data, compiles the same step (with the collective
parts of passes/data_parallel.py) and walks the same shuffled global batches; each trains
on its shard of every batch. This module is the runtime side:

  World          the job as this process sees it: rank, size, MPI communicator; the sums
                 over ranks the steps ask for (dlc.core.collective's Communicator, in rank
                 order), shards of batches and of the test set, and the start-up check that
                 every rank runs the same program on the same data and weights;
  Watchdog       a thread per rank exchanging heartbeats with rank 0 (rank 0 with everyone):
                 a rank that stops answering ends the whole job with a message naming it;
  launch()       `--ranks N`: start mpiexec (from the mpich wheel, or on the PATH) on this
                 command line.

mpi4py is imported only here, and only when a job has several ranks.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from dlc.core.diagnostics import DlcError, UsageError

JOB_DIR_VAR = "DLC_JOB_DIR"  # set by launch(): where each rank writes its pid
_SIGNALS = {"6", "9", "11", "15"}  # exit codes mpiexec reports for SIGABRT, SIGKILL, SIGSEGV, SIGTERM
INSTALL_HINT = "pip install 'dlc[mpi]'  (mpi4py and the mpich wheel)"
# what process managers tell their processes: the number of ranks, then the rank
_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "PMIX_SIZE")
HEARTBEAT_SECONDS = 0.5
TIMEOUT_SECONDS = float(os.environ.get("DLC_MPI_TIMEOUT", "5"))
_HEARTBEAT_TAG = 7101


def launched_size() -> int:
    """How many ranks the process manager started this process among (1: not under mpiexec)."""
    for var in _SIZE_VARS:
        value = os.environ.get(var)
        if value and value.isdigit():
            return int(value)
    return 1


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise UsageError(f"data-parallel training needs mpi4py and an MPI library ({e})",
                         hint=INSTALL_HINT) from None
    return MPI


def world_from_env() -> "World | None":
    """The job this process was started in by mpiexec, or None for a single process."""
    if launched_size() <= 1:
        return None
    return World.get()


class World:
    """This process's place in a data-parallel job (one per process, as MPI's world is)."""

    _instance: "World | None" = None

    @classmethod
    def get(cls) -> "World":
        if cls._instance is None:
            cls._instance = World()
        return cls._instance

    @classmethod
    def current(cls) -> "World | None":
        """The job, if this process joined one."""
        return cls._instance

    def __init__(self):
        MPI = self.MPI = _mpi()
        self.comm = MPI.COMM_WORLD.Dup()
        self.comm.Set_errhandler(MPI.ERRORS_RETURN)  # a failed exchange raises: see failure()
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.lead = self.rank == 0
        # where every rank runs: messages about a rank name its process and machine
        self.places = self.comm.allgather((os.getpid(), socket.gethostname()))
        self.local_size = self.comm.Split_type(MPI.COMM_TYPE_SHARED).Get_size()
        folder = os.environ.get(JOB_DIR_VAR)
        if folder:  # started by launch(): tell it which pid is this rank
            try:
                part = Path(folder, f"rank{self.rank}.part")
                part.write_text(str(os.getpid()))
                part.replace(part.with_suffix(".pid"))  # whole, for launch()'s watch
            except OSError:
                pass
        self.comm_seconds = 0.0  # spent in exchanges the steps asked for
        self.watchdog = Watchdog(self)
        self.watchdog.start()
        from dlc.core import collective
        collective.install(self)

    def where(self, rank: int) -> str:
        pid, host = self.places[rank]
        return f"rank {rank} (pid {pid} on {host})"

    def failure(self, error: Exception) -> "JobError":
        """What to say when an exchange failed: which rank has died (its process is gone,
        where that can be seen from here), or else what MPI said -- and this rank's
        watchdog or rank 0's names a dead rank on another machine within its timeout."""
        text = error.Get_error_string() if hasattr(error, "Get_error_string") else str(error)
        detail = text.strip().splitlines()[0] if text.strip() else repr(error)
        dead = [r for r in range(self.size) if r != self.rank and not self._alive(r)]
        if dead:
            who = " and ".join(self.where(r) for r in dead)
            return JobError(f"{who} ended during an exchange of gradients; stopping all {self.size} ranks",
                            notes=[f"MPI said: {detail}"])
        time.sleep(TIMEOUT_SECONDS + 2 * HEARTBEAT_SECONDS)  # a watchdog may name a dead rank meanwhile
        return JobError(f"an exchange between the ranks failed: {detail}")

    def _alive(self, rank: int) -> bool:
        pid, host = self.places[rank]
        if host != socket.gethostname():
            return True  # cannot tell from here
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except OSError:
            pass
        try:  # a zombie (dead, not yet reaped by mpiexec's proxy) is dead too
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except (OSError, IndexError):
            return True

    def default_threads(self) -> int:
        """Threads per rank when none are asked for: this machine's cores shared by its ranks."""
        return max(1, (os.cpu_count() or 1) // self.local_size)

    # --- the sums a step asks for (dlc.core.collective.Communicator) ---------------------------
    def allreduce(self, arrays: Sequence[np.ndarray], out: Sequence[np.ndarray]) -> None:
        try:
            self._allreduce(arrays, out)
        except self.MPI.Exception as e:
            raise self.failure(e) from None

    def start(self, arrays: Sequence[np.ndarray]) -> object:
        try:
            return self._start(arrays)
        except self.MPI.Exception as e:
            raise self.failure(e) from None

    def finish(self, handle, out: Sequence[np.ndarray]) -> None:
        try:
            self._finish(handle, out)
        except self.MPI.Exception as e:
            raise self.failure(e) from None

    def _allreduce(self, arrays: Sequence[np.ndarray], out: Sequence[np.ndarray]) -> None:
        """out = the sums over ranks, added in rank order. Two ranks: each gets the other's
        values (allgather) and adds them; more: rank r adds up the r-th chunk of everyone's
        (all-to-all), then everyone gathers the chunks (bandwidth 2x the data, not N x)."""
        started = time.perf_counter()
        flat = _pack(arrays)
        if self.size <= 2:
            parts = np.empty((self.size, flat.size), flat.dtype)
            self.comm.Allgather(flat, parts)
            total = _sum_rows(parts)
        else:
            counts = _chunks(flat.size, self.size)
            displs = [sum(counts[:r]) for r in range(self.size)]
            mine = counts[self.rank]
            parts = np.empty((self.size, mine), flat.dtype)
            self.comm.Alltoallv([flat, (counts, displs)],
                                [parts, ([mine] * self.size, [r * mine for r in range(self.size)])])
            total = np.empty(flat.size, flat.dtype)
            self.comm.Allgatherv(_sum_rows(parts), [total, (counts, displs)])
        _unpack(total, out)
        self.comm_seconds += time.perf_counter() - started

    def _start(self, arrays: Sequence[np.ndarray]) -> object:
        """Begin the same sum without waiting: one non-blocking allgather (the only collective
        call of the exchange, so exchanges started in the same order match up whatever order
        they are finished in). The sources are copied: they may change after the start."""
        started = time.perf_counter()
        flat = _pack(arrays).copy() if len(arrays) == 1 else _pack(arrays)
        parts = np.empty((self.size, flat.size), flat.dtype)
        handle = (self.comm.Iallgather(flat, parts), parts, flat)
        self.comm_seconds += time.perf_counter() - started
        return handle

    def _finish(self, handle, out: Sequence[np.ndarray]) -> None:
        started = time.perf_counter()
        request, parts, _ = handle
        request.Wait()
        _unpack(_sum_rows(parts), out)
        self.comm_seconds += time.perf_counter() - started

    # --- shards ---------------------------------------------------------------------------------
    def shard(self, n: int) -> tuple[int, int]:
        """(first, count): this rank's samples of a global batch of n, as even as can be,
        in rank order (rank 0 first)."""
        base, extra = divmod(n, self.size)
        count = base + (self.rank < extra)
        return self.rank * base + min(self.rank, extra), count

    def shard_capacity(self, n: int) -> int:
        """The largest shard of a global batch of n (rank 0's): the batch size every rank
        compiles its steps for; a smaller shard (another rank's, or any of a last, partial
        global batch) is padded to it, its padded rows masked (passes/mask_batch.py)."""
        return max(1, -(-n // self.size))

    def shard_feeds(self, x: np.ndarray, y, n: int) -> tuple[np.ndarray, object, float, int]:
        """(x, y, shard weight, first sample) of this rank for a global batch of n samples. A
        rank with no sample this step (n < ranks) runs on a copy of the batch's first
        sample with weight 0, so it still takes part in the step's exchanges."""
        first, count = self.shard(n)
        if count == 0:
            return x[:1], (None if y is None else y[:1]), 0.0, 0
        part = slice(first, first + count)
        return x[part], (None if y is None else y[part]), count / n, first

    def batches_of(self, starts: range) -> list[int]:
        """The evaluation batches (by start) this rank evaluates: every size-th, so each is
        computed exactly as one process would."""
        return list(starts)[self.rank::self.size]

    def sum_floats(self, values: dict[str, float], keys: Sequence[str]) -> dict[str, float]:
        """{key: the sum over ranks} in float64, in rank order."""
        mine = np.array([values.get(k, 0.0) for k in keys], np.float64)
        everyone = np.empty((self.size, len(keys)), np.float64)
        self.comm.Allgather(mine, everyone)
        return dict(zip(keys, _sum_rows(everyone).tolist()))

    def broadcast(self, arrays: dict[str, np.ndarray], names: Sequence[str]) -> None:
        """Copy rank 0's arrays into every rank's, in place."""
        for name in names:
            a = arrays[name]
            buf = np.ascontiguousarray(a)
            self.comm.Bcast(buf, root=0)
            if buf is not a:
                a[...] = buf

    # --- start-up -------------------------------------------------------------------------------
    def check_same(self, session, data, opts) -> None:
        """Every rank must run the same program, dlc and recipe on the same data and start
        from the same weights: digests of each are compared with rank 0's."""
        from dlc import __version__
        from dlc.pipeline import compiler_fingerprint
        state = session.state
        parts = {"program": digest(session.model.source_key("train", session.config, self.size, session.bucket_bytes)),
                 "dlc version": digest(__version__, compiler_fingerprint()),
                 "options": digest(session.target, opts.epochs, opts.batch, opts.lr, opts.seed, opts.shuffle,
                                   opts.resume and (opts.resume["epoch"], opts.resume["batch"])),
                 "training data": digest(data.x_train, data.y_train),
                 "weights": digest(*(state[k] for k in sorted(state)))}
        everyone = self.comm.allgather(parts)
        for rank, theirs in enumerate(everyone[1:], start=1):
            differ = [what for what in parts if theirs.get(what) != everyone[0].get(what)]
            if differ:
                what = " and ".join([", ".join(differ[:-1]), differ[-1]] if len(differ) > 1 else differ)
                raise JobError(f"{self.where(rank)} does not run what rank 0 runs: its "
                               f"{what} differ{'s' if len(differ) == 1 else ''}",
                               hint="every rank must run the same .dln file, dlc version, options, data "
                                    "and checkpoint; with several machines, copy them to each")

    def end(self, code: int) -> None:
        """This rank is done: when all went well, wait for every rank (the watchdog still
        watching), then stop the watchdog; otherwise stop the whole job with `code`."""
        if code == 0:
            self.comm.Barrier()  # every rank got here: from now on one may exit before another
            self.watchdog.ending = True
            self.watchdog.stop()
            return
        folder = os.environ.get(JOB_DIR_VAR)
        if folder:  # tell launch() the job ends by this rank's choice, after its error
            try:
                Path(folder, f"rank{self.rank}.stopped").write_text(str(code))
            except OSError:
                pass
        _before_abort()
        self.MPI.COMM_WORLD.Abort(code)


class JobError(DlcError):
    """A data-parallel job cannot go on: a rank died, or an exchange failed."""


def _before_abort() -> None:
    """Flush, and give mpiexec a moment to pass on what this rank printed: MPI_Abort ends
    every process of the job, and output still in a pipe would be lost."""
    sys.stdout.flush()
    sys.stderr.flush()
    time.sleep(0.3)


def digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, np.ndarray):
            h.update(str((p.dtype.str, p.shape)).encode())
            h.update(np.ascontiguousarray(p).tobytes())
        else:
            h.update(repr(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _pack(arrays: Sequence[np.ndarray]) -> np.ndarray:
    if len(arrays) == 1:
        return np.ascontiguousarray(arrays[0]).reshape(-1)
    return np.concatenate([np.asarray(a).reshape(-1) for a in arrays])


def _unpack(flat: np.ndarray, out: Sequence[np.ndarray]) -> None:
    at = 0
    for o in out:
        o[...] = flat[at:at + o.size].reshape(o.shape)
        at += o.size


def _sum_rows(parts: np.ndarray) -> np.ndarray:
    """parts[0] + parts[1] + ... in that order (numpy's own reduction may pair them up)."""
    total = parts[0].copy()
    for row in parts[1:]:
        total += row
    return total


def _chunks(n: int, size: int) -> list[int]:
    base, extra = divmod(n, size)
    return [base + (r < extra) for r in range(size)]


class Watchdog(threading.Thread):
    """Heartbeats between rank 0 and every other rank on a communicator of their own, every
    HEARTBEAT_SECONDS. A rank that sends none for TIMEOUT_SECONDS has died, or its machine
    has: the watchdog says which, and aborts the job (a rank blocked in an exchange with a
    dead rank would otherwise wait forever). mpiexec's own clean-up, when it is on, may stop
    the job first; its message names the dead process by pid, which the start-up line of
    `dlc run` maps to a rank."""

    def __init__(self, world: World):
        super().__init__(name="dlc-watchdog", daemon=True)
        self.world = world
        self.comm = world.comm.Dup()
        self.peers = list(range(1, world.size)) if world.lead else [0]
        self._stopping = threading.Event()  # (not `_stop`: threading.Thread has a method of that name)
        self._done = threading.Event()
        self.ending = False  # every rank has finished: peers may now exit

    def run(self) -> None:
        MPI, comm = self.world.MPI, self.comm
        beat = np.zeros(1, np.int64)
        inbox = {p: np.zeros(1, np.int64) for p in self.peers}
        recvs = {p: comm.Irecv(inbox[p], source=p, tag=_HEARTBEAT_TAG) for p in self.peers}
        sends: list = []
        last = {p: time.monotonic() for p in self.peers}
        try:
            while not self._stopping.is_set():
                now = time.monotonic()
                for p in self.peers:
                    try:
                        sends.append(comm.Isend(beat, dest=p, tag=_HEARTBEAT_TAG))
                        while recvs[p].Test():
                            last[p] = now
                            recvs[p] = comm.Irecv(inbox[p], source=p, tag=_HEARTBEAT_TAG)
                    except MPI.Exception:
                        pass  # a dead peer: its heartbeats stop, the timeout below tells
                    if not self.world._alive(p):  # on this machine a dead process shows at once
                        self._abort(p, "died")
                    if now - last[p] > TIMEOUT_SECONDS:
                        self._abort(p, f"stopped: no heartbeat for {now - last[p]:.0f} s (it hangs, or died "
                                       "with its machine)")
                try:
                    sends = [s for s in sends if not s.Test()]
                except MPI.Exception:
                    sends = []
                self._stopping.wait(HEARTBEAT_SECONDS)
        finally:
            try:
                for r in recvs.values():
                    r.Cancel()
                MPI.Request.Waitall(list(recvs.values()))
            except MPI.Exception:
                pass
            self._done.set()

    def _abort(self, rank: int, what: str) -> None:
        if self.ending or self._stopping.is_set():
            return
        sys.stdout.flush()
        sys.stderr.write(f"dlc: {self.world.where(rank)} {what}; stopping all {self.world.size} ranks\n")
        _before_abort()
        self.world.MPI.COMM_WORLD.Abort(3)

    def stop(self) -> None:
        self._stopping.set()
        self._done.wait(5.0)


# --- launching ---------------------------------------------------------------------------------

def find_mpiexec() -> str:
    """mpiexec from the mpich wheel (beside this Python, in its scripts folder, or among the
    wheel's files), or else the first one on the PATH."""
    candidates = [Path(sys.executable).parent / "mpiexec", Path(sysconfig.get_path("scripts")) / "mpiexec"]
    try:
        from importlib.metadata import PackageNotFoundError, distribution
        try:
            for f in distribution("mpich").files or ():
                if f.name in ("mpiexec", "mpiexec.hydra"):
                    candidates.append(Path(f.locate()))
        except PackageNotFoundError:
            pass
    except ImportError:
        pass
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which("mpiexec")
    if found:
        return found
    raise UsageError("--ranks needs mpiexec, and none was found", hint=INSTALL_HINT)


def launch(ranks: int, argv: Sequence[str]) -> int:
    """Run `dlc` with `argv` as `ranks` processes under mpiexec; returns its exit status.

    The ranks' output passes through. When a rank dies, mpiexec stops the others at once
    and reports a dead process by pid; each rank told us its pid (a file in a folder of
    this launch), so the last line says which rank it was. mpiexec names the first rank in
    rank order that a signal ended, which after its clean-up can be one it killed itself;
    so this process also watches which rank's process ends first, and where the two
    disagree the line names both (neither is certain: a killed rank's process may finish
    ending after the ranks the clean-up killed)."""
    import re
    import tempfile
    try:
        import mpi4py  # noqa: F401 - each rank needs it: say so before starting them
    except ImportError as e:
        raise UsageError(f"--ranks needs mpi4py and an MPI library ({e})", hint=INSTALL_HINT) from None
    command = [find_mpiexec(), "-n", str(ranks), sys.executable, "-m", "dlc", *argv]
    with tempfile.TemporaryDirectory(prefix="dlc-job-") as folder:
        env = dict(os.environ, **{JOB_DIR_VAR: folder})
        try:
            proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except OSError as e:
            raise UsageError(f"cannot start {command[0]}: {e}") from None
        dead: list[tuple[str, str]] = []  # (pid, exit code) as mpiexec reports them
        noticed: list[int] = []  # ranks whose MPI library ended the job on a failed exchange

        def stopped_by_a_rank() -> bool:  # a rank reported its error and ended the job (World.end)
            return any(Path(folder).glob("rank*.stopped"))

        def relay(src, dst) -> None:
            for raw in iter(src.readline, b""):
                if b"application called MPI_Abort(MPI_COMM_WORLD" in raw and stopped_by_a_rank():
                    continue  # MPICH's line for that ending: the rank's error said why
                dst.buffer.write(raw)
                dst.flush()
                found = re.search(rb"\(rank (\d+) in comm \d+\): Fatal error", raw)  # MPICH's abort
                if found:
                    noticed.append(int(found.group(1)))
                if b"RUNNING AT" in raw or b"EXIT CODE" in raw:  # mpiexec's report, on stdout
                    found = re.search(rb"PID (\d+) RUNNING AT", raw)
                    if found:
                        dead.append((found.group(1).decode(), ""))
                    code = re.search(rb"EXIT CODE: (\d+)", raw)
                    if code and dead and not dead[-1][1]:
                        dead[-1] = (dead[-1][0], code.group(1).decode())
        watch = _EndWatch(Path(folder), ranks)
        threads = [threading.Thread(target=relay, args=(proc.stdout, sys.stdout), daemon=True),
                   threading.Thread(target=relay, args=(proc.stderr, sys.stderr), daemon=True),
                   threading.Thread(target=watch.run, daemon=True)]
        for t in threads:
            t.start()
        while True:
            try:
                code = proc.wait()
                break
            except KeyboardInterrupt:  # mpiexec passes Ctrl-C on to every rank: wait for them
                continue
        watch.stop.set()
        for t in threads:
            t.join()
        who = _who_ended(dead, watch, noticed) if (dead or code != 0) and not stopped_by_a_rank() else None
        if who:
            sys.stderr.write(f"dlc: {who}; mpiexec stopped the other ranks\n")
    return code


# Without mpiexec's report, ranks the watch saw end within this long of the first are
# named with it: which of them died first is not known.
_END_WINDOW_S = 0.5


def _who_ended(dead: list[tuple[str, str]], watch: "_EndWatch", noticed=()) -> str | None:
    """Which rank died and how, by mpiexec's report (`dead`: pids and exit codes); where
    `watch` saw another rank's process end first, that rank is named too. Without a report
    (another rank's MPI library noticed the death and aborted the job first), the ranks
    `watch` saw end first or within _END_WINDOW_S of it; where it saw nothing, or every
    rank end at once, the ranks other than those whose MPI library ended the job on a
    failed exchange (`noticed`); else None."""
    if not dead:
        first = watch.first_ended()
        if not first or len(first) == watch.size:
            others = [r for r in sorted(watch.pids) if r not in noticed]
            if not noticed or not others:
                return None
            names = " or ".join(f"rank {r} (pid {watch.pids[r]})" for r in others)
            them = "it" if len(others) == 1 else "them"
            which = " and ".join(f"rank {r}" for r in sorted(set(noticed)))
            return f"{names} stopped answering: the MPI library of {which} ended the job when an exchange with {them} failed"
        # the rank that noticed the death may end before the dead one's process is gone
        # (a loaded test run met it): every rank that ended soon after the first is named
        near = [(at, ranks) for at, ranks in zip(watch.ended_at, watch.ended)
                if at - watch.ended_at[0] <= _END_WINDOW_S]
        names = " or ".join(f"rank {r} (pid {watch.pids[r]})" for _, ranks in near for r in ranks)
        apart = near[-1][0] - near[0][0]
        return f"{names} ended first" + (f" ({apart:.2f} s apart)" if len(near) > 1 else "")
    pid, status = dead[0]
    reported = watch.rank_of(pid)
    who = f"rank {reported} (pid {pid})" if reported is not None else f"the process with pid {pid}"
    how = f"was killed by signal {status}" if status in _SIGNALS else \
        f"exited with status {status}" if status else "ended"
    first = watch.first_ended()
    others = [r for r in first if r != reported]
    if not others:  # the watch agrees, or saw nothing
        return f"{who} {how}"
    named = " or ".join(f"rank {r} (pid {watch.pids[r]})" for r in others)
    seen = "their processes ended together here" if reported in first else \
        f"{'its' if len(others) == 1 else 'their'} process ended first here"
    return (f"{named} or {who} died first: mpiexec reports that {who} {how}, but {seen} "
            f"(mpiexec's clean-up kills the other ranks the same way)")


class _EndWatch:
    """The order in which the ranks' processes end, watched through pidfds (the ranks
    write their pids into the job's folder). Usually the rank that died ends first, as
    mpiexec's proxy stops the others only once it saw it go; but its pidfd signals only
    when all its threads are gone, and the proxy may have ended another rank by then."""

    def __init__(self, folder: Path, size: int):
        self.folder, self.size = folder, size
        self.pids: dict[int, int] = {}  # rank -> pid
        self.ended: list[list[int]] = []  # ranks, in the groups one look saw end
        self.ended_at: list[float] = []  # when each group was seen (time.monotonic)
        self.stop = threading.Event()

    def rank_of(self, pid: str) -> "int | None":
        self._read_new()  # also when the ranks were not watched
        return next((r for r, p in self.pids.items() if str(p) == pid), None)

    def _read_new(self) -> list[int]:
        """The ranks whose pid files appeared since the last look."""
        new = []
        for f in self.folder.glob("rank*.pid") if len(self.pids) < self.size else ():
            rank = int(f.stem[len("rank"):])
            if rank not in self.pids:
                self.pids[rank] = int(f.read_text())
                new.append(rank)
        return new

    def first_ended(self) -> list[int]:
        return self.ended[0] if self.ended else []

    def run(self) -> None:
        if not hasattr(os, "pidfd_open"):  # Linux >= 5.3: without it, mpiexec's report alone
            return
        import select
        poller, fds = select.poll(), {}
        try:
            while not self.stop.is_set():
                gone = []
                for rank in self._read_new():
                    try:
                        fd = os.pidfd_open(self.pids[rank])
                    except ProcessLookupError:
                        gone.append(rank)
                        continue
                    fds[fd] = rank
                    poller.register(fd, select.POLLIN)
                for fd, _ in poller.poll(0 if gone else 50):
                    poller.unregister(fd)
                    gone.append(fds[fd])
                if gone:
                    self.ended.append(sorted(gone))
                    self.ended_at.append(time.monotonic())
        except (OSError, ValueError):
            pass  # cannot watch: mpiexec's report alone
        finally:
            for fd in fds:
                os.close(fd)


def without_ranks(argv: Sequence[str]) -> list[str]:
    """argv with its `--ranks N` (or `--ranks=N`) taken out."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--ranks":
            skip = True
        elif not a.startswith("--ranks="):
            out.append(a)
    return out
