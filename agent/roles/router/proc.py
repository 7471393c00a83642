"""Subprocesses: one-shot commands and supervised daemons (no shell, every wait bounded).

Daemons run as our children, each in its own session (process group), in the foreground,
so their exit is seen through ``wait()`` — never through ``kill -0`` / ``pgrep``, which
call a zombie alive. Stopping kills the whole group (apache's workers would otherwise keep
port 80) and waits until no live process of the group is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

log = logging.getLogger("sysvm.agent.router")


class CommandError(Exception):
    def __init__(self, argv: Sequence[str], code: int | None, stderr: str) -> None:
        tail = stderr.strip()[-2000:]
        super().__init__(f"{' '.join(argv)} exited {code}: {tail}")
        self.argv = list(argv)
        self.code = code
        self.stderr = stderr


@dataclass(frozen=True, slots=True)
class Result:
    code: int
    stdout: bytes
    stderr: str


async def run(
    argv: Sequence[str],
    *,
    input: bytes | None = None,
    limit: float = 30.0,
    check: bool = True,
) -> Result:
    """Run ``argv``; raise :class:`CommandError` (argv, exit code, stderr tail) on failure
    or timeout (the process is killed)."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(limit):
            out, err = await proc.communicate(input)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise CommandError(argv, None, f"timed out after {limit}s") from None
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    code = proc.returncode if proc.returncode is not None else -1
    res = Result(code, out, err.decode(errors="replace"))
    if check and code != 0:
        raise CommandError(argv, code, res.stderr)
    return res


def group_alive(pgid: int) -> bool:
    """Is any non-zombie process left in process group ``pgid``? (reads /proc)"""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # comm may contain spaces/parens: fields after the last ')'
        rest = stat[stat.rfind(b")") + 2 :].split()
        if len(rest) > 2 and int(rest[2]) == pgid and rest[0] not in (b"Z", b"X"):
            return True
    return False


def stale_groups(marker: str, names: frozenset[str]) -> set[int]:
    """Process groups of live processes named one of ``names`` (``/proc/PID/comm``) whose
    command line mentions ``marker`` (our config directory): daemons left by a previous
    run of the agent."""
    me = os.getpid()
    out: set[int] = set()
    needle = marker.encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.find(b"(") + 1 : stat.rfind(b")")].decode(errors="replace")
        rest = stat[stat.rfind(b")") + 2 :].split()
        if comm in names and needle in cmd and len(rest) > 2 and rest[0] not in (b"Z", b"X"):
            out.add(int(rest[2]))
    return out


async def kill_group(pgid: int, limit: float = 5.0) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + limit
    while group_alive(pgid):
        if time.monotonic() > deadline:
            raise TimeoutError(f"process group {pgid} still alive after SIGKILL")
        await asyncio.sleep(0.01)


class Daemon:
    """One supervised daemon. ``start()`` spawns it and waits until ``ready()`` is true;
    if it exits unexpectedly it is restarted with backoff (up to ``max_restarts`` in a
    row, then left down and reported as failed)."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        ready: Callable[[], Awaitable[bool]],
        *,
        ready_timeout: float = 10.0,
        max_restarts: int = 5,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.ready = ready
        self.ready_timeout = ready_timeout
        self.max_restarts = max_restarts
        self.proc: asyncio.subprocess.Process | None = None
        self.state = "stopped"  # stopped | starting | running | restarting | failed
        self.restarts = 0
        self._watch: asyncio.Task[None] | None = None
        self._stopping = False
        self._forwarders: set[asyncio.Task[None]] = set()
        self.recent: deque[str] = deque(maxlen=50)  # last stderr lines (diagnostics)
        self.watchers: list[Callable[[str], None]] = []

    @property
    def status(self) -> str:
        """``state``, except that a process that has just exited (and is not yet seen by
        the supervisor) is reported as ``exited``, never ``running``."""
        if self.state in ("starting", "running") and not self.running():
            return "exited"
        return self.state

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc and self.proc.returncode is None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self) -> None:
        await self._spawn()
        await self.wait_ready()
        self.state = "running"
        self._stopping = False
        self._watch = asyncio.create_task(self._supervise(), name=f"router-{self.name}-watch")

    async def _spawn(self) -> None:
        # The output pipe is ours, not the subprocess transport's: apache's (or haproxy's)
        # workers inherit it, and a transport waits for its pipes to close before wait()
        # returns - a killed master would look alive for as long as its workers live.
        r, w = os.pipe()
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=w,
                stderr=w,
                start_new_session=True,  # own process group: killed as a whole
            )
        except BaseException:
            os.close(r)
            raise
        finally:
            os.close(w)
        reader = asyncio.StreamReader(limit=1 << 20)
        loop = asyncio.get_running_loop()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(r, "rb", 0)
        )
        task = asyncio.create_task(self._forward(reader, transport), name=f"router-{self.name}-log")
        self._forwarders.add(task)
        task.add_done_callback(self._forwarders.discard)
        self.state = "starting"
        log.info("event=daemon_started name=%s pid=%s", self.name, self.proc.pid)

    async def _forward(
        self, stream: asyncio.StreamReader, transport: asyncio.BaseTransport
    ) -> None:
        """Copy the daemon's output to our stderr (one line each, tagged) and to watchers;
        ends when every process holding the pipe is gone."""
        try:
            while True:
                try:
                    line = await stream.readline()
                except ValueError:  # a line over the limit: take what is there
                    line = await stream.read(1 << 20)
                if not line:
                    return
                text = line.decode(errors="replace").rstrip()
                self.recent.append(text)
                sys.stderr.write(f"daemon={self.name} {text}\n")
                for watcher in list(self.watchers):
                    watcher(text)
        finally:
            transport.close()

    async def wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while True:
            if self.proc is None or self.proc.returncode is not None:
                code = self.proc.returncode if self.proc else None
                raise CommandError(self.argv, code, f"{self.name} exited while starting")
            if await self.ready():
                return
            if time.monotonic() > deadline:
                raise CommandError(
                    self.argv, None, f"{self.name} not ready after {self.ready_timeout}s"
                )
            await asyncio.sleep(0.02)

    async def _supervise(self) -> None:
        while True:
            proc = self.proc
            if proc is None:
                return
            code = await proc.wait()
            if self._stopping:
                return
            log.warning("event=daemon_exited name=%s pid=%s code=%s", self.name, proc.pid, code)
            await kill_group(proc.pid)
            self.restarts += 1
            if self.restarts > self.max_restarts:
                self.state = "failed"
                log.error("event=daemon_failed name=%s restarts=%s", self.name, self.restarts - 1)
                return
            self.state = "restarting"
            await asyncio.sleep(min(30.0, 0.2 * 2**self.restarts))
            try:
                await self._spawn()
                await self.wait_ready()
                self.state = "running"
            except (CommandError, OSError) as e:
                log.warning("event=daemon_restart_failed name=%s error=%s", self.name, e)

    def signal(self, sig: int) -> None:
        if self.proc is None or self.proc.returncode is not None:
            raise CommandError(self.argv, None, f"{self.name} is not running")
        os.kill(self.proc.pid, sig)

    async def stop(self, limit: float = 5.0) -> None:
        self._stopping = True
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
        proc = self.proc
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                async with asyncio.timeout(limit):
                    await proc.wait()
            except TimeoutError:
                log.warning("event=daemon_kill name=%s pid=%s", self.name, proc.pid)
        await kill_group(proc.pid)
        await proc.wait()
        for task in list(self._forwarders):
            try:
                async with asyncio.timeout(limit):
                    await task  # ends at EOF: the whole group is gone
            except TimeoutError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self.state = "stopped"
        log.info("event=daemon_stopped name=%s pid=%s", self.name, proc.pid)
