"""Distributors: where the extraction's tasks run. One small interface, three strategies.

``Engine.map`` runs a picklable callable ``fn`` over a list of tasks and yields ``(index,
result)`` as tasks finish. It never sees what a task is; it submits task ``i`` only while
``i`` is less than ``ahead`` past the first unfinished task, which bounds the results the
caller must hold back.

``Engine.build_shards`` is the extraction's use of it: run the clip tasks and write each
shard (``clipwork``), reporting clips and shards in plan order, so the output and the events
do not depend on the engine, the worker count or completion order. By default the results
come back to this process and an ``Assembler`` writes them (serial, local). Ray overrides it:
each shard is written (and, for s3://, uploaded) by a ``ShardBuilder`` task on the cluster
that takes its clip tasks' results straight from them, and this process only gets each
shard's ``ShardState`` back, so its own CPU and link no longer bound the cluster.

- ``serial``: in this process, one task after the other (``--workers 1``).
- ``local``: a process pool on this machine. A task whose worker dies (out of memory, a
  decoder crash) is retried on a fresh pool up to ``retries`` times. Workers die with the
  parent: they ask the kernel for SIGKILL when their parent goes (PR_SET_PDEATHSIG) and a
  thread watches the extracting process, so ``kill -9`` of ``avprep extract`` leaves no
  forkserver, worker or resource-tracker process behind.
- ``ray``: tasks on a Ray cluster (``--ray-address``, or a local Ray started for the run),
  retried by Ray when their worker dies: clip tasks, and one task per shard that writes it.
  Needs ``pip install avprep-ogmge[ray]`` and avprep importable on every node.
"""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .clipwork import Assembler, ClipTask, ShardBuilder, clip_reports
from .errors import AvprepError, ConfigError
from .outdir import ShardState

OnClip = Callable[[str, str, str | None, str | None], None]
OnShard = Callable[[ShardState], None]

ENGINES = ("serial", "local", "ray")
DEFAULT_RETRIES = 3


def cores() -> int:
    """Cores this process may use (a container's CPU set, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


_M_TOP_PAD, _M_MMAP_THRESHOLD = -2, -3      # glibc mallopt parameters
_heap_kept = False


def keep_heap() -> None:
    """Make this process serve allocations up to 32 MB from its heap and keep 64 MB of freed
    heap for reuse (glibc ``mallopt``; a no-op elsewhere). A clip's arrays (10 s of 44.1 kHz
    stereo, its STFT) are megabytes allocated and freed once per clip; by default glibc maps
    them afresh or hands the memory back, and page-faults it in again for the next clip: ~15%
    of the work on cheap-to-decode clips. Called by every engine in the processes that
    extract (the calling process for ``serial``); the cost is up to 64 MB held per process."""
    global _heap_kept
    if _heap_kept:
        return
    _heap_kept = True
    try:
        import ctypes
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(_M_TOP_PAD, 64 << 20)
    except (OSError, AttributeError):
        pass


class Engine:
    """Base of the strategies: ``map`` over ``_start``/``_submit``/``_wait``/``_stop``."""

    name = "?"
    workers = 1           # parallel tasks, for sizing the work split

    def map(self, fn: Callable, tasks: Sequence, ahead: int | None = None) -> Iterator[tuple[int, Any]]:
        """Yield ``(i, fn(tasks[i]))`` in completion order. Errors raised by ``fn`` end the run
        as an AvprepError; ``fn`` should return per-item problems as values."""
        if not tasks:
            return
        ahead = max(1, ahead or 4 * self.workers)
        self._start(fn)
        try:
            submitted, first_open, finished = 0, 0, set()
            while first_open < len(tasks):
                while submitted < len(tasks) and submitted < first_open + ahead:
                    self._submit(submitted, tasks[submitted])
                    submitted += 1
                for i, result in self._wait():
                    finished.add(i)
                    yield i, result
                while first_open in finished:
                    finished.discard(first_open)
                    first_open += 1
        finally:
            self._stop()

    def build_shards(self, fn: Callable, tasks: list[ClipTask], build: ShardBuilder, on_clip: OnClip,
                     on_shard: OnShard) -> set[int]:
        """Run ``fn`` (a ``ClipWorker``) over ``tasks`` (``clipwork.make_tasks``) and write each
        shard; call ``on_clip(shard, key, stage, error)`` per clip and ``on_shard(state)`` per
        finished shard, in plan order. Returns the ids of the processes that extracted clips.

        Here: in this process (an ``Assembler``), into the folder ``build.out``; a state with
        a file (``sha256``) has it there even for an s3:// output (``build.bucket``), whose
        upload is the caller's (in the background while the run goes on)."""
        assembler = Assembler(Path(build.out), tasks, on_clip, on_shard)
        try:
            for i, result in self.map(fn, tasks):
                assembler.add(i, result)
        finally:
            assembler.close()
        return assembler.pids

    def _start(self, fn: Callable) -> None:
        raise NotImplementedError

    def _submit(self, i: int, task) -> None:
        raise NotImplementedError

    def _wait(self) -> list[tuple[int, Any]]:
        """At least one finished task (blocking)."""
        raise NotImplementedError

    def _stop(self) -> None:
        pass


def _task_error(task, e: BaseException) -> AvprepError:
    if isinstance(e, AvprepError):
        return e
    return AvprepError(f"{getattr(task, 'label', task)}: {type(e).__name__}: {e}")


class SerialEngine(Engine):
    """Every task in this process, in order."""

    name = "serial"

    def _start(self, fn):
        keep_heap()
        self.fn, self.queue = fn, []

    def _submit(self, i, task):
        self.queue.append((i, task))

    def _wait(self):
        i, task = self.queue.pop(0)
        try:
            return [(i, self.fn(task))]
        except AvprepError:
            raise
        except Exception as e:      # not an item's fault: the run cannot go on
            raise _task_error(task, e) from e


# ---------------------------------------------------------------- local process pool

def _mp_context():
    # forkserver: workers fork from a clean server that already imported the decoders (fast
    # start), and never from a parent that may hold torch/OpenMP threads (fork would be unsafe).
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["avprep._preload"])
        return ctx
    return mp.get_context("spawn")


def _die_with(parent: int) -> None:
    """Pool worker initialiser: end this process when ``parent`` (the extracting process) ends;
    keep freed heap (``keep_heap``)."""
    keep_heap()
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)   # PR_SET_PDEATHSIG: when our parent (forkserver) dies
    except (OSError, AttributeError):            # not Linux
        pass

    def watch() -> None:
        while True:
            time.sleep(0.5)
            try:
                os.kill(parent, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:
                pass

    threading.Thread(target=watch, daemon=True, name="avprep-parent-watch").start()


class LocalEngine(Engine):
    """A process pool of ``workers`` processes on this machine."""

    name = "local"

    def __init__(self, workers: int | None = None, retries: int = DEFAULT_RETRIES):
        self.workers = max(1, workers or cores())
        self.retries = retries

    def _new_pool(self):
        return cf.ProcessPoolExecutor(self.workers, mp_context=_mp_context(), initializer=_die_with,
                                      initargs=(os.getpid(),))

    def _start(self, fn):
        self.fn, self.pool = fn, self._new_pool()
        self.futures: dict[cf.Future, tuple[int, Any]] = {}
        self.attempts: dict[int, int] = {}
        self.stash: list[tuple[int, Any]] = []      # finished before a restart, not yet yielded

    def _submit(self, i, task):
        self.futures[self.pool.submit(self.fn, task)] = (i, task)

    def _wait(self):
        if self.stash:
            out, self.stash = self.stash, []
            return out
        finished, _ = cf.wait(self.futures, return_when=cf.FIRST_COMPLETED)
        out, broken = [], False
        for fut in finished:
            i, task = self.futures.pop(fut)
            try:
                out.append((i, fut.result()))
            except cf.process.BrokenProcessPool:
                broken = True
                self.futures[fut] = (i, task)       # to retry below
            except AvprepError:
                raise
            except Exception as e:
                raise _task_error(task, e) from e
        if broken:
            self._restart()
        return out

    def _restart(self) -> None:
        """A worker died: every unfinished task goes again on a fresh pool."""
        self.pool.shutdown(wait=True, cancel_futures=True)
        retry = []
        for fut, (i, task) in sorted(self.futures.items(), key=lambda it: it[1][0]):
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.stash.append((i, fut.result()))
            else:
                retry.append((i, task))
        self.futures.clear()
        self.pool = self._new_pool()
        for i, task in retry:
            self.attempts[i] = self.attempts.get(i, 0) + 1
            if self.attempts[i] > self.retries:
                raise AvprepError(f"{getattr(task, 'label', i)}: a worker process died {self.attempts[i]} "
                                  "times on this task (out of memory, or a decoder crash?); finished "
                                  "shards are kept, re-run the same command to resume")
            self._submit(i, task)

    def _stop(self):
        self.pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------- Ray

def _ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("--engine ray needs Ray: pip install 'avprep-ogmge[ray]'") from None
    return ray


def _call(fn, task):
    keep_heap()
    return fn(task)


def _build(build, shard, split, *results):
    return build(shard, split, results)


class RayEngine(Engine):
    """Tasks on a Ray cluster: the one this process is connected to, the one at ``address``
    (``auto``, ``ray://host:10001``, ``host:6379``), or a local one started (and stopped)
    for the run with ``workers`` CPUs."""

    name = "ray"

    def __init__(self, address: str | None = None, workers: int | None = None,
                 retries: int = DEFAULT_RETRIES):
        self.address, self.retries = address, retries
        self._workers = workers
        self.workers = workers or cores()

    def _start(self, fn):
        ray = self.ray = _ray()
        self.owned = not ray.is_initialized()
        if self.owned:
            try:
                ray.init(address=self.address, num_cpus=None if self.address else self.workers,
                         include_dashboard=False, log_to_driver=False, configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise ConfigError(f"--ray-address {self.address}: cannot connect to Ray: {e}") from None
        if not self._workers:
            self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.remote = ray.remote(num_cpus=1, max_retries=self.retries)(_call)
        self.fn_ref = ray.put(fn)
        self.refs: dict[Any, tuple[int, Any]] = {}

    def _submit(self, i, task):
        self.refs[self.remote.remote(self.fn_ref, task)] = (i, task)

    def build_shards(self, fn, tasks, build, on_clip, on_shard):
        """Each shard's clip tasks, then one ``ShardBuilder`` task taking their ObjectRefs as
        arguments: Ray runs it once they are done, on a node it picks by where their results
        are, and hands it the results there; it writes (and, for s3://, uploads) the shard and
        returns a ``BuiltShard``. This process gets only those, and reports each in plan order
        (early finishers wait). Shards are submitted whole while their clip tasks, counted from
        the first unfinished shard, are fewer than ``4 * workers``, and at least two at a time
        (one building while the next extracts): that bounds the results waiting in the object
        store. A builder, like a clip task, is retried by Ray when its worker dies."""
        shards: list[list[ClipTask]] = []
        for task in tasks:
            if not shards or shards[-1][-1].last:
                shards.append([])
            shards[-1].append(task)
        if not shards:
            return set()
        self._start(fn)
        ray, pids = self.ray, set()
        builder = ray.remote(num_cpus=1, max_retries=self.retries)(_build)
        build_ref = ray.put(build)
        clips: dict[int, list] = {}       # a shard's clip task refs, cancelled if the run stops
        try:
            submitted, first_open, built = 0, 0, {}
            while first_open < len(shards):
                while submitted < len(shards) and (
                        submitted < first_open + 2
                        or sum(map(len, shards[first_open:submitted])) < 4 * self.workers):
                    group = shards[submitted]
                    clips[submitted] = [self.remote.remote(self.fn_ref, t) for t in group]
                    ref = builder.remote(build_ref, group[0].shard, group[0].split, *clips[submitted])
                    self.refs[ref] = (submitted, group[0].shard)
                    submitted += 1
                for i, result in self._wait():
                    built[i] = result
                    del clips[i]
                while first_open in built:
                    result = built.pop(first_open)
                    pids |= result.pids
                    for report in clip_reports(result.state):
                        on_clip(result.state.name, *report)
                    on_shard(result.state)
                    first_open += 1
        finally:
            for refs in clips.values():
                for ref in refs:
                    self._cancel(ref)
            self._stop()
        return pids

    def _cancel(self, ref) -> None:
        try:
            self.ray.cancel(ref, force=True)
        except Exception:
            pass

    def _wait(self):
        ray = self.ray
        ready, rest = ray.wait(list(self.refs), num_returns=1)
        if rest:
            more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
            ready += more
        out = []
        for ref in ready:
            i, task = self.refs.pop(ref)
            try:
                out.append((i, ray.get(ref)))
            except ray.exceptions.RayTaskError as e:
                cause = e.as_instanceof_cause()
                if isinstance(cause, AvprepError):
                    raise cause from None
                raise _task_error(task, cause) from None
            except ray.exceptions.RayError as e:     # worker died past the retries, node lost
                raise AvprepError(f"{getattr(task, 'label', task)}: Ray task failed: "
                                  f"{' '.join(str(e).split())[:300]}; finished shards are kept, "
                                  "re-run the same command to resume") from None
        return out

    def _stop(self):
        for ref in self.refs:
            self._cancel(ref)
        self.refs.clear()
        if self.owned:
            self.ray.shutdown()


def make_engine(name: str | None, workers: int | None = None, ray_address: str | None = None) -> Engine:
    """``name`` None: ``ray`` when an address is given, else ``serial`` for one worker and
    ``local`` for more (all cores by default)."""
    if name is None:
        name = "ray" if ray_address else ("serial" if workers == 1 else "local")
    if ray_address and name != "ray":
        raise ConfigError("--ray-address needs --engine ray")
    if name == "serial":
        return SerialEngine()
    if name == "local":
        engine = LocalEngine(workers)
        return SerialEngine() if engine.workers == 1 else engine
    if name == "ray":
        return RayEngine(ray_address, workers)
    raise ConfigError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
