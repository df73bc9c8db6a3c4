"""Engine-owned threads: running a compiled step on several cores.

The analysis (avalon.passes.sharding) decides whether a step can run split
across the batch (a ShardPlan) or as independent parts (split_components);
this module runs those plans:

* ShardedFunction: one compiled copy of the shard graph per thread, each on its
  share of the batch, the outputs summed or joined; all-reduces are barriers
  between the threads (_Reducer);
* ComponentParallel: the independent parts of a graph in the threads;
* BlasThreads: one compiled graph with the BLAS library on several threads;
* Autotuned: several of these schedules of one step, timed on the first calls,
  the fastest kept.

The threads are persistent (_Workers): the calling thread runs the last share.
A kernel may also share its own work among them (kernel_threads), unless it
already runs in one of their shares.
"""
from __future__ import annotations

import functools
import os
import threading
import time
import weakref

import numpy as np

from ..ops._sharding import P, R
from ..primitive import PRIMITIVES
from ..threadsafe import private_backend
from .gc_pause import gc_paused
from . import tuning_memo
from .native import fp_mode, in_fp_mode, placing_threads, process_cpus

__all__ = ["ShardedFunction", "ComponentParallel", "BlasThreads", "Autotuned", "shard_count", "kernel_threads"]


def shard_count() -> int:
    """Threads a compiled step may be split into: AVALON_THREADS, else 2 on a
    machine with two cores or more."""
    env = os.environ.get("AVALON_THREADS")
    if env:
        return max(1, int(env))
    return max(1, min(2, os.cpu_count() or 1)) if (os.cpu_count() or 1) >= 2 else 1


class ShardedFunction:
    """Runs a ShardPlan: one compiled copy of the shard graph per thread (each
    with its own buffers and random generator), results combined."""

    def __init__(self, plan, backend, name):
        from ..codegen import generate
        self.plan = plan
        self.backend = backend
        self.copies = []
        self.reducers = {n.attrs["key"]: _Reducer(plan.shards) for n in plan.graph.nodes
                         if n.op == "allreduce_sum"}
        memory = None           # one memory plan for all copies (the same graph and backend)
        for index in range(plan.shards):
            b = private_backend(backend)
            b._shard_index, b._reducers = index, self.reducers
            self.copies.append((b, generate(plan.graph, b, name, plan=memory)))
            memory = self.copies[-1][1].plan
        self.compiled = self.copies[0][1]
        self.graph, self.plan_memory = plan.graph, self.compiled.plan
        self.source = (f"# runs in {plan.shards} threads, each on 1/{plan.shards} of the batch; outputs "
                       f"combined as {[_describe(s) for s in plan.output_states]}\n" + self.compiled.source)
        self.fn = self.__call__
        self._pool = _workers(plan.shards - 1)
        self._fresh = _fresh_outputs(plan.graph)
        # the writes into inputs, run once after the shards on their combined results
        self._tail = generate(plan.tail.graph, backend, name + "_tail") if plan.tail is not None else None
        if self._tail is not None:
            self.source += "\n# then, once the shards are combined, the writes into inputs:\n" + self._tail.source

    def __call__(self, *args):
        plan = self.plan
        k = plan.shards
        random = self._draws_random()
        if random:
            # every shard replays the generator from where the unsplit step would
            # start, so the draws (and what follows) equal the unsplit step's
            state = self.backend._rng().bit_generator.state
            for b, _ in self.copies:
                b.rng = np.random.Generator(type(self.backend.rng.bit_generator)())
                b.rng.bit_generator.state = state
        per_shard = []
        for s in range(k):
            shard_args = list(args)
            for i in plan.batch_input_index:
                x = args[i]
                step = x.shape[0] // k
                shard_args[i] = x[s * step:(s + 1) * step]
            per_shard.append(shard_args)
        for r in self.reducers.values():
            r.ready()
        self._error = None
        try:
            results = self._pool.run([(self._guarded, (c.fn, a)) for (_, c), a in zip(self.copies, per_shard)])
        except threading.BrokenBarrierError:
            if self._error is not None:  # the thread that failed first says why
                raise self._error from None
            raise
        if random:
            self.backend.rng.bit_generator.state = self.copies[0][0].rng.bit_generator.state
        outputs = len(plan.output_states) - len(plan.writes)
        for i, j in plan.writes:  # writes into inputs, deferred until no shard reads them (in graph order)
            self.backend.xp.copyto(args[i], results[0][j])
        combined = tuple(self._combine(j, st, results) for j, st in enumerate(plan.output_states[:outputs]))
        tail = plan.tail
        if tail is None:
            return combined
        self._tail.fn(*[args[k] if kind == "arg" else combined[k] for kind, k in tail.sources])
        return combined[:tail.n_outputs]

    def _guarded(self, fn, args):
        try:
            return fn(*args)
        except BaseException as e:
            if not isinstance(e, threading.BrokenBarrierError) and self._error is None:
                self._error = e
            for r in self.reducers.values():  # release the other threads waiting at a barrier
                r.abort()
            raise

    def _draws_random(self):
        return any(getattr(PRIMITIVES.get(n.op), "draws_random", False) for n in self.plan.graph.nodes)

    def _combine(self, j, st, results):
        xp = self.backend.xp
        if st == R:
            return results[0][j]
        if st == P:
            total = results[0][j]
            # the first share's array is summed into when the shard made it for this
            # call alone (saves a copy of every gradient per call); else copied
            if hasattr(total, "copy") and not (j in self._fresh and getattr(total, "base", 0) is None):
                total = total.copy()
            for r in results[1:]:
                total = xp.add(total, r[j], out=total) if getattr(total, "ndim", 0) else total + r[j]
            return total
        return xp.concatenate([r[j] for r in results], axis=st[1])


class _Reducer:
    """The rendezvous of one all-reduce: each thread brings its partial sum and
    leaves with the total.  One barrier: past it, every thread adds up (copies
    of) the partials itself, in shard order, so all get the same bits without
    waiting for one of them to do it (the partials are small: batch
    statistics).  A reducer serves one all-reduce node, once per call, and a
    call ends only when every thread is done, so no thread overwrites a
    partial another one still reads."""

    def __init__(self, shards):
        self.values = [None] * shards
        self.barrier = threading.Barrier(shards)

    def ready(self):
        if self.barrier.broken:
            self.barrier.reset()

    def abort(self):
        self.barrier.abort()

    def reduce(self, index, value):
        # a copy: past the barrier this thread's next kernels may reuse value's buffer
        self.values[index] = value.copy()
        self.barrier.wait()
        total = self.values[0].copy()
        for v in self.values[1:]:
            total += v
        return total


def _describe(state):
    return {R: "replicated", P: "sum"}.get(state, f"concat(axis={state[1]})" if state not in (R, P) else "")


_pools: dict = {}

#: .active is True in a thread running one share of a _Workers call (a worker,
#: or the caller running its own share): a kernel there runs alone.
_in_share = threading.local()


class _KernelThreads:
    """Runs a kernel's independent jobs, one per thread (the caller runs the last)."""

    def __init__(self, pool):
        self.pool, self.threads = pool, len(pool.tasks) + 1

    def __call__(self, jobs):
        idle = self.threads - len(jobs)    # fewer jobs than threads: some workers idle, not the caller
        return self.pool.run([(_nothing, ())] * idle + [(job, ()) for job in jobs])[idle:]


def _nothing():
    return None


def kernel_threads():
    """A runner for one kernel's independent jobs over the engine's threads
    (shard_count() of them), or None where the kernel should run alone: one
    core, or a thread already running a share of a split step (its sibling
    shares keep the other cores busy)."""
    n = shard_count()
    if n < 2 or getattr(_in_share, "active", False):
        return None
    return _KernelThreads(_workers(n - 1))


def _fresh_outputs(graph):
    """Positions of the graph's outputs made by a kernel for the call alone: not
    an input, a constant, a view or an array written in place, and not returned
    twice (such an array, when it owns its memory, may be summed into)."""
    count: dict = {}
    for o in graph.outputs:
        count[o] = count.get(o, 0) + 1
    fresh = set()
    for j, o in enumerate(graph.outputs):
        prim = PRIMITIVES.get(o.op)
        if (prim is not None and not prim.view and not prim.writes_input and count[o] == 1
                and o.op not in ("input", "const")):
            fresh.add(j)
    return fresh


def _workers(n):
    if n not in _pools:
        _pools[n] = _Workers(n)
    return _pools[n]


#: bumped in a forked child, whose pools of workers have no threads (only the
#: forking thread is copied) and whose locks may be held by threads that are gone
_fork_generation = 0
_restart_lock = threading.Lock()


def _after_fork_in_child():
    global _fork_generation, _restart_lock
    _fork_generation += 1
    _restart_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _Workers:
    """n persistent worker threads; the calling thread runs the last task.  Each
    task runs in the caller's floating-point mode (denormals flushed or not), as
    if the caller ran it.  The workers are kept off the caller's CPU (_OffCaller).
    In a forked child the first run starts the threads again."""

    def __init__(self, n):
        self._start(n)

    def _start(self, n):
        self.generation = _fork_generation
        self.lock = threading.Lock()
        self.tasks = [None] * n
        self.results = [None] * n
        self.go = [threading.Event() for _ in range(n)]
        self.done = [threading.Event() for _ in range(n)]
        self.off_caller = _OffCaller(n)
        for k in range(n):
            threading.Thread(target=self._loop, args=(k,), daemon=True).start()
        self.off_caller.started.wait()

    def _loop(self, k):
        self.off_caller.register(k)
        _in_share.active = True
        while True:
            self.go[k].wait()
            self.go[k].clear()
            fn, args = self.tasks[k]
            try:
                self.results[k] = (True, fn(*args))
            except BaseException as e:  # re-raised in the caller
                self.results[k] = (False, e)
            self.done[k].set()

    def run(self, jobs):
        if self.generation != _fork_generation:     # a forked child: the parent's threads are not here
            with _restart_lock:
                if self.generation != _fork_generation:
                    self._start(len(self.tasks))
        with self.lock:
            return self._run(jobs)

    def _run(self, jobs):
        held = self.off_caller.enter()
        try:
            return self._run_apart(jobs)
        finally:
            self.off_caller.leave(held)

    def _run_apart(self, jobs):
        n = len(self.tasks)
        mode = fp_mode()
        for k in range(n):
            fn, args = jobs[k]
            self.tasks[k] = (in_fp_mode, (mode, fn) + tuple(args))
            self.done[k].clear()
            self.go[k].set()
        last_fn, last_args = jobs[n]
        outer, _in_share.active = getattr(_in_share, "active", False), True
        try:
            mine = last_fn(*last_args)
        finally:
            _in_share.active = outer
            # even when the caller's own share failed: a worker still running
            # this call's task must finish before the next call hands it another
            for k in range(n):
                self.done[k].wait()
        out = []
        for k in range(n):
            ok, value = self.results[k]
            if not ok:
                raise value
            out.append(value)
        return out + [mine]


class _OffCaller:
    """Keeps the caller and its worker threads on different CPUs while they run one
    call: the caller on the CPU it is on, the workers on every other CPU the process
    may use (set again when the caller has moved: a system call per worker then),
    the caller's own CPUs given back after the call.  Linux wakes a sleeping thread
    on its waker's CPU when the thread's own CPU looks busy (a virtual CPU after a
    pause), and the threads of a split step wake each other all the time (the GIL,
    the all-reduce barriers, the end of a share): a split LSTM step's two threads
    then shared one CPU for its first 4-5 steps after a pause, 10 ms a step
    against 6."""

    def __init__(self, n):
        self.tids = [None] * n
        self._left = n
        self._lock = threading.Lock()
        self.started = threading.Event()
        self.off = None
        self.allowed = process_cpus() if placing_threads() else frozenset()

    def register(self, k):
        self.tids[k] = threading.get_native_id()
        if self.allowed:      # not the CPU of a caller that started it while pinned
            try:
                os.sched_setaffinity(0, self.allowed)
            except OSError:
                pass
        with self._lock:
            self._left -= 1
            if self._left == 0:
                self.started.set()

    def enter(self):
        """Pin the caller to its CPU and the workers off it; the caller's CPUs
        before (for leave), or None when nothing was pinned."""
        cpu = current_cpu()
        if cpu is None or cpu not in self.allowed or len(self.allowed) < 2:
            return None
        try:
            if cpu != self.off:
                others = self.allowed - {cpu}
                for tid in self.tids:
                    os.sched_setaffinity(tid, others)
                self.off = cpu
            saved = os.sched_getaffinity(0)
            os.sched_setaffinity(0, (cpu,))
        except OSError:         # CPUs restricted from outside meanwhile: leave them as they are
            self.off = None
            return None
        return saved

    def leave(self, saved):
        if saved is not None:
            try:
                os.sched_setaffinity(0, saved)
            except OSError:
                pass


def current_cpu():
    """The CPU the calling thread runs on now, or None where the C library cannot say."""
    getcpu = _sched_getcpu()
    if getcpu is None:
        return None
    cpu = getcpu()
    return cpu if cpu >= 0 else None


@functools.lru_cache(maxsize=1)
def _sched_getcpu():
    import ctypes
    try:
        fn = ctypes.CDLL(None, use_errno=False).sched_getcpu
    except (AttributeError, OSError):
        return None
    fn.restype, fn.argtypes = ctypes.c_int, []
    return fn


class BlasThreads:
    """A compiled graph run with its matrix products on `threads` threads (and
    back to one afterwards): for steps whose time is mostly a few large
    matrix products, where splitting the batch gains less.  The backend
    decides how (CpuBackend.set_blas_threads: the products of compiled
    segments split across the segment driver's helper threads, each piece a
    one-thread BLAS call; without the driver, BLAS's own threads)."""

    def __init__(self, compiled, backend, threads):
        self.compiled, self.backend, self.threads = compiled, backend, threads
        self.graph, self.plan, self.source = compiled.graph, compiled.plan, (
            f"# BLAS on {threads} threads (each large product in {threads} pieces)\n" + compiled.source)
        self.fn = self.__call__

    def __call__(self, *args):
        self.backend.set_blas_threads(self.threads)
        try:
            return self.compiled.fn(*args)
        finally:
            self.backend.set_blas_threads(1)


class Later:
    """A schedule compiled on first need: build() -> the compiled schedule."""
    __slots__ = ("build",)

    def __init__(self, build):
        self.build = build


class _TuningTurn:
    """Which Autotuned times its schedules now: one at a time in the process.

    A training loop calls two tuned functions, the gradient step and the
    optimizer's update, and each one's iteration holds the other's call: timed
    together, each would time its schedules while the other switched between
    its own, and a schedule's trials would carry the other's slowest one (the
    VAE's "BLAS on 2 threads" was timed at 4.9 ms against 3.1 ms steady and
    lost to a schedule 0.7 ms slower).  So a tuner waits for its turn, running
    its current schedule untimed meanwhile.  A turn held by a tuner not called
    for STALE calls of the others is taken over: in a loop each tuner is called
    every few calls, and one called once (a prediction between epochs) or no
    longer must not keep the loop's tuners waiting."""

    STALE = 8

    def __init__(self):
        self._owner = None        # weak reference to the tuner timing now
        self._owner_tick = 0
        self._tick = 0

    def take(self, tuner) -> bool:
        """Whether `tuner` may time its schedules at this call (it then holds the turn)."""
        self._tick += 1
        owner = self._owner() if self._owner is not None else None
        if owner is not tuner and owner is not None and self._tick - self._owner_tick <= self.STALE:
            return False
        if owner is not tuner:
            self._owner = weakref.ref(tuner)
        self._owner_tick = self._tick
        return True

    def give_back(self, tuner) -> None:
        if self._owner is not None and self._owner() is tuner:
            self._owner = None


_turn = _TuningTurn()


class Autotuned:
    """Several compiled schedules of one graph (split across threads or not,
    BLAS threads or not): the first calls try each in turn, then the fastest
    runs from there on.  Every call computes the same step, so the trial calls
    are real work.

    A schedule is judged by the caller's whole iteration: the time from the
    start of one call to the start of the next, which holds what the caller
    does in between (the optimizer update, the next batch).  A schedule whose
    call is quick but leaves threads spinning afterwards (BLAS's) slows that
    work, and timing the call alone would pick it wrongly.  Each schedule gets
    WARMUP calls, then TRIALS timed iterations, and the median decides.  Two
    calls are not timed: a schedule's first calls after another's are slower
    (its helper threads start or wake, BLAS sets up their buffers); the VAE's
    "BLAS on 2 threads" took 4.3, 3.5, 3.4, 3.1 ms in its first calls.  One
    tuner times at a time (_TuningTurn): in a training loop the gradient
    step's and the update's each hold the other's call.

    The machine's load changes (another process takes a core, and BLAS's
    spinning threads then starve), so the choice is checked again after
    RECHECK calls, then after twice as many each time: one more round of
    trials, in which a schedule whose first two timed iterations are both over
    GIVE_UP times the best known median is not tried further (one slow
    iteration is a spike: a page fault, a collection); the current choice is
    always timed in full, so that a spike cannot hand its place to a schedule
    the round never compared it with.  A later round moves
    to another schedule only when its median beats the current choice's by
    SWITCH_GAIN (10 %): on a shared machine a round's few trials are noisy,
    and a flip to a slower schedule would last until the next round.

    An iteration in which the caller spent more than IDLE_FACTOR times the
    call's own time, and more than IDLE_S, between calls (an evaluation, a
    checkpoint, a pause: far more than spinning threads slow its work) says
    nothing of the schedule: it is not a trial, nor is the call after the
    pause, which runs with cold caches and sleeping threads (a benchmark that
    takes turns with another framework: the VAE's one-sample "BLAS on 2
    threads" took 0.56 ms in that call, 0.07-0.11 ms in the next ones), and
    other calls are timed instead (at most MAX_IDLE pauses per schedule and
    round, so that a caller who always works that long between calls still
    gets a choice).

    With `memo_key` (runtime.tuning_memo) each choice is kept on disk, and a
    tuner of the same step in a later process starts from it: its first call
    compiles that schedule alone and no call runs trials until the first
    check, RECHECK // 4 calls later (`remembered` is True until a round of its
    own chooses)."""

    WARMUP, TRIALS = 2, 5
    RECHECK, GIVE_UP = 400, 3.0
    SWITCH_GAIN = 0.9
    IDLE_FACTOR, IDLE_S, MAX_IDLE = 10.0, 0.02, 10

    def __init__(self, candidates, memo_key=None):
        # [(label, compiled or Later)]: a schedule given as Later is compiled when
        # first tried, so a function's first call compiles one schedule, not all
        self._candidates = [list(c) for c in candidates]
        # the choice an earlier process made for this step (runtime.tuning_memo)
        self._memo_key = memo_key
        self._recalled = tuning_memo.recall(memo_key)
        if self._recalled is not None and self._recalled["choice"] not in [c[0] for c in candidates]:
            self._recalled = None
        self.remembered = False               # whether the choice is the one an earlier process made
        self.calls = [0] * len(candidates)
        self.times = [[] for _ in candidates]  # seconds per iteration (call to next call)
        self.idle = [0] * len(candidates)     # iterations not counted: the caller idled in them
        self.choice = self._chosen = None
        self._open = None                     # (candidate, call start, call end) of the iteration being timed
        self._last = None                     # (candidate, call start, call end) of the last call in a round
        self._since, self._next_check = 0, self.RECHECK   # calls since the choice; when to check it
        self._best = None                     # the winning median of the last round
        self._timings: dict = {}              # label -> median seconds per iteration, last round

    @property
    def fn(self):
        # a property, not an attribute holding the bound method: that would be a reference
        # cycle, and a dropped tuner would hold the tuning turn until the cyclic collector ran
        return self.__call__

    @property
    def candidates(self):
        """[(label, compiled)], every schedule compiled (for reading them)."""
        return [(label, self._schedule(k)) for k, (label, _) in enumerate(self._candidates)]

    def _schedule(self, k):
        entry = self._candidates[k]
        if isinstance(entry[1], Later):
            with gc_paused():
                entry[1] = entry[1].build()
        return entry[1]

    def current(self):
        k = self.choice if self.choice is not None else self._chosen
        return self._schedule(k if k is not None else 0)

    graph = property(lambda self: self.current().graph)
    plan = property(lambda self: self.current().plan)
    source = property(lambda self: self.current().source)

    @property
    def timings(self) -> dict:
        """{label: median seconds of an iteration} of the schedules the last completed
        round timed (a schedule given up: the slower of its two timed iterations),
        what the choice was made on; {} before the first choice."""
        return dict(self._timings)

    @property
    def label(self):
        """The chosen schedule (the last one chosen while a later round re-times them)."""
        return self._candidates[self._chosen][0] if self._chosen is not None else "(still timing)"

    def __call__(self, *args):
        if self.choice is not None:
            self._since += 1
            if self._since < self._next_check:
                return self._candidates[self.choice][1].fn(*args)
            if not _turn.take(self):
                return self._candidates[self.choice][1].fn(*args)   # another tuner is timing: later
            self._start_round()
        elif self._recalled is not None:
            return self._adopt_recalled().fn(*args)
        elif not _turn.take(self):
            # another tuner is timing its schedules: the first one runs meanwhile, untimed
            self._open = self._last = None
            return self._schedule(self._waiting_schedule()).fn(*args)
        start = time.perf_counter()
        after_pause = self._close_iteration(start)
        if all(self._done(i) for i in range(len(self.times))):
            self._choose()
            return self._schedule(self.choice).fn(*args)
        # one candidate after the other (not round-robin): the threads a schedule
        # leaves spinning slow the caller's work after ITS calls, not the next schedule's
        k = next(i for i in range(len(self.times)) if not self._done(i))
        self.calls[k] += 1
        out = self._schedule(k).fn(*args)   # compiled here on its first, untimed, call
        self.backend_sync()
        self._last = (k, start, time.perf_counter())
        if self.calls[k] > self.WARMUP and not after_pause:
            self._open = self._last
        return out

    def _done(self, k):
        """Whether schedule k has had its trials in this round (or was given up)."""
        t = self.times[k]
        if len(t) >= self.TRIALS:
            return True
        given_up = self._best is not None and len(t) >= 2 and min(t[:2]) > self.GIVE_UP * self._best
        return given_up and k != self._chosen

    def _choose(self):
        full = {i: t for i, t in enumerate(self.times) if len(t) >= self.TRIALS}
        timed = full or {i: t for i, t in enumerate(self.times) if t}   # none timed in full: the times they had
        medians = {i: sorted(t)[len(t) // 2] for i, t in timed.items()}
        self._timings = {self._candidates[i][0]: medians[i] for i in sorted(medians)}
        best = min(medians, key=medians.get)
        kept = self._chosen
        if kept is not None and kept in medians and medians[best] > self.SWITCH_GAIN * medians[kept]:
            best = kept       # a later round: not clearly faster, so no switch
        self.choice = self._chosen = best
        self._best = medians[best]
        self.remembered = False
        tuning_memo.remember(self._memo_key, self._candidates[best][0], self._timings)
        _turn.give_back(self)

    def _adopt_recalled(self):
        """The schedule an earlier process chose for this step, compiled alone and
        chosen without trials (checked after a quarter of RECHECK calls)."""
        recalled, self._recalled = self._recalled, None
        labels = [label for label, _ in self._candidates]
        k = labels.index(recalled["choice"])
        schedule = self._schedule(k)
        self.choice = self._chosen = k
        self._timings = {label: t for label, t in recalled["timings"].items() if label in labels}
        self._best = self._timings.get(recalled["choice"])
        self.remembered = True
        # checked sooner than a choice of its own: it was made in another process, and a
        # noisy round there (a schedule timed slow once) would otherwise last RECHECK calls
        self._since, self._next_check = 0, max(1, self.RECHECK // 4)
        return schedule

    def _waiting_schedule(self) -> int:
        """The schedule run while another tuner times its own: the last choice, or
        the one being tried (compiled already), or the first."""
        if self._chosen is not None:
            return self._chosen
        tried = [k for k, n in enumerate(self.calls) if n]
        return tried[-1] if tried else 0

    def _start_round(self):
        """Time every schedule again (the choice is kept for reading until then)."""
        self._since, self._next_check = 0, 2 * self._next_check
        self.calls = [0] * len(self.times)
        self.times = [[] for _ in self.times]
        self.idle = [0] * len(self.times)
        self.choice = None
        self._open = self._last = None

    def _close_iteration(self, now) -> bool:
        """Times the open iteration, unless the caller paused since the last call;
        True when it did (the call starting now is not a trial either)."""
        opened, self._open = self._open, None
        if self._last is None:
            return False
        k, start, end = self._last
        if now - end > max(self.IDLE_FACTOR * (end - start), self.IDLE_S) and self.idle[k] < self.MAX_IDLE:
            self.idle[k] += 1        # the caller idled between the calls
            return True
        if opened is not None:
            self.times[k].append(now - start)
        return False

    def backend_sync(self):
        b = getattr(self._schedule(0), "backend", None)
        if b is not None:
            b.synchronize()


class ComponentParallel:
    """Runs the independent parts of a graph (split_components) in the engine's
    threads and puts their outputs back in the graph's order."""

    def __init__(self, graph, parts, backend):
        from ..codegen import generate
        self.graph = graph
        self.parts = []
        for g in parts:
            b = private_backend(backend)
            self.parts.append((generate(g, b, g.name), [graph.outputs.index(o) for o in g.outputs]))
        self.plan = self.parts[0][0].plan
        self.source = "".join(f"# part {k} of {len(self.parts)}, in its own thread\n{c.source}"
                              for k, (c, _) in enumerate(self.parts))
        self.backend = backend
        self.fn = self.__call__
        self._pool = _workers(len(parts) - 1)

    def __call__(self, *args):
        results = self._pool.run([(c.fn, args) for c, _ in self.parts])
        out = [None] * len(self.graph.outputs)
        for (_, where), values in zip(self.parts, results):
            for k, v in zip(where, values):
                out[k] = v
        return tuple(out)
