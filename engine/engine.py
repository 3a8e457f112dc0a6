"""In-flight batching engine: a background thread that admits waiting requests into free cache slots, and
in each round prefills up to a token budget of their prompts (packed together), then runs one batched decode
step for every prefilled request. A prompt's start that a slot's cache already holds is not prefilled again
(KV cache reuse, `prefix_cache.py`)."""

import ctypes
import heapq
import logging
import os
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import native, sampling
from .model import Decoder
from .params import SamplingParams
from .prefix_cache import SlotPrefixes

log = logging.getLogger(__name__)

# Admitted prompts are prefilled as one packed sequence of at most this many tokens: one pass over the weights
# instead of one per prompt. A longer prompt goes alone, this many tokens a pass (chunked prefill, each chunk
# attending to the ones before it in its slot). One such pass goes between two decode steps, so new prompts
# delay the running streams by one pass per step rather than stalling them.
PREFILL_TOKENS = 512


def _release_openmp_workers() -> None:
    """Free the calling thread's idle OpenMP workers (OpenMP 5 `omp_pause_resource_all`, soft pause).

    Once GNU OpenMP runs more threads than there are CPUs, it stops spin-waiting between parallel regions;
    the caller's idle team (left by loading the model) plus the engine thread's team is enough for that on
    a 2-core machine, and every parallel region of a decode step then waits for sleeping workers to wake
    (~30% slower steps). The caller's next parallel region simply starts a new team.
    """
    bundled = Path(torch.__file__).parent / "lib" / "libgomp.so.1"
    try:
        ctypes.CDLL(str(bundled) if bundled.exists() else "libgomp.so.1").omp_pause_resource_all(1)
    except (OSError, AttributeError):
        pass  # another OpenMP runtime, or none


def _start_helpers(team: int) -> None:
    """Start the calling thread's compute helpers, `team - 1` of each kind: OpenMP's workers ("engine-omp"; steps
    of several rows, prefills) and the chunk pool's ("chunk-pool"; steps of one row: csrc/chunk_pool.c). They run
    under Linux's SCHED_IDLE policy (`ENGINE_SCHED_IDLE`, default 1), the calling thread at normal priority.

    The engine keeps the cores busy, while Triton, the adapter and the clients each wake for a moment per
    response. At normal priority a waking process may wait out a scheduler slice (milliseconds) behind a decode
    step, at every hop; a core whose thread is under SCHED_IDLE it takes at once (5-7 ms off each first token on
    2 cores). With the calling thread at normal priority they take a helper's core, not its own, and a one-row
    step goes on without the helper (chunk_pool.c), where an OpenMP team would wait at its next barrier.
    """
    idle = os.environ.get("ENGINE_SCHED_IDLE", "1") != "0" and hasattr(os, "SCHED_IDLE")
    pool = native.chunk_pool()
    if pool is not None:
        pool.chunk_pool_start(team - 1, int(idle))
        pool.openmp_workers_start(int(idle))
    elif idle:  # no native kernels: ATen's ops on OpenMP alone, so this thread and the workers it starts yield
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # 0: this thread, not the whole process
        except OSError as exc:
            log.warning("engine thread stays at normal priority: %s", exc)


# stream_interval 0 (auto): one engine step between streamed responses per this many running streams, so a
# step sends about this many responses on average. Each step's responses wake Triton, postprocessing, the
# adapter and the clients on the cores the engine computes on; at 16 streams on 2 cores, 16 responses every
# step cost the stack ~20% of its tokens/s against 4 every fourth step (bench/stream_traffic.py).
AUTO_STREAMS_PER_STEP = 4


def stream_due(step: int, num_generated: int, stream_interval: int, running: int, after_prefill: bool = False) -> bool:
    """Whether a streaming request's new tokens go out at this engine step: TensorRT-LLM's `stream_interval`.

    Counted in engine steps shared by all requests, not per request: every stream's response then leaves at
    the same steps, so the processes downstream wake once per interval for all streams instead of at every
    step for some. The first token always goes at once, so the time to first token does not depend on it.
    `stream_interval` 0 picks the interval from the `running` streams (AUTO_STREAMS_PER_STEP): every step
    while at most that many run, and every step that came after a prefill pass (a pass takes as long as tens of
    steps: holding its tokens back would save the stack little and double the streams' gaps).
    """
    if not stream_interval and after_prefill:
        return True
    interval = stream_interval or max(1, -(-running // AUTO_STREAMS_PER_STEP))
    return num_generated == 1 or step % interval == 0


class PromptTooLongError(ValueError):
    pass


class QueueFullError(RuntimeError):
    pass


@dataclass
class GenerationOutput:
    request_id: str
    token_ids: list[int]  # new tokens since the previous callback (all of them when not streaming)
    log_probs: list[float] | None = None  # of token_ids, when return_log_probs
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per token, when top_logprobs > 0
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    stop_reason: int | list[int] | None = None  # the end id or stop word that ended generation
    num_input_tokens: int = 0
    num_cached_tokens: int = 0  # of the prompt: taken from the KV cache instead of prefilled (KV cache reuse)
    num_output_tokens: int = 0  # cumulative
    cum_log_prob: float = 0.0  # cumulative; computed only when return_log_probs
    error: str | None = None


@dataclass
class _Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    on_output: Callable[[GenerationOutput], None]
    generator: torch.Generator | None
    slot: int = -1
    cached: int = 0  # prompt tokens whose keys and values the slot already held
    prefilled: int = 0  # prompt positions written so far (chunked prefill: the chunks done)
    generated: list[int] = field(default_factory=list)
    seen: torch.Tensor | None = None  # prompt + generated, for the repetition penalty
    counts: torch.Tensor | None = None  # generated-token counts, for presence / frequency penalties
    cum_log_prob: float = 0.0
    # produced but not yet delivered
    out_tokens: list[int] = field(default_factory=list)
    out_log_probs: list[float] = field(default_factory=list)
    out_top: list[list[tuple[int, float]]] = field(default_factory=list)


class Engine:
    def __init__(
        self,
        checkpoint_dir: str | Path,
        *,
        max_batch_size: int = 16,
        max_seq_len: int | None = None,
        max_queue_size: int = 64,
        dtype: torch.dtype = torch.float32,
        num_threads: int | None = None,
        stream_interval: int = 0,
        kv_cache_reuse: bool = True,
        cpu_cores: frozenset[int] | None = None,
    ):
        self._start(
            Decoder.from_dir(checkpoint_dir, dtype), max_batch_size, max_seq_len, max_queue_size, num_threads,
            stream_interval, kv_cache_reuse, cpu_cores,
        )

    @classmethod
    def from_model(
        cls,
        model: Decoder,
        *,
        max_batch_size: int = 16,
        max_seq_len: int | None = None,
        max_queue_size: int = 64,
        num_threads: int | None = None,
        stream_interval: int = 0,
        kv_cache_reuse: bool = True,
        cpu_cores: frozenset[int] | None = None,
    ) -> "Engine":
        engine = cls.__new__(cls)
        engine._start(model, max_batch_size, max_seq_len, max_queue_size, num_threads, stream_interval, kv_cache_reuse,
                      cpu_cores)
        return engine

    def _start(self, model: Decoder, max_batch_size, max_seq_len, max_queue_size, num_threads, stream_interval,
               kv_cache_reuse, cpu_cores) -> None:
        if max_batch_size < 1 or max_queue_size < 0 or stream_interval < 0:
            raise ValueError("max_batch_size must be >= 1, max_queue_size and stream_interval >= 0")
        self.model = model
        self.config = model.config
        self.max_batch_size = max_batch_size
        self.max_queue_size = max_queue_size
        self.max_seq_len = max_seq_len or min(self.config.max_position_embeddings, 4096)
        # On cores of its own (launcher/cpu_cores.py), one compute thread per core unless told otherwise.
        self._cpu_cores = cpu_cores
        self._num_threads = num_threads or (len(cpu_cores) if cpu_cores else None)
        self.stream_interval = stream_interval
        self._step = 0  # rounds of the loop so far: the clock of stream_interval
        self._streams = 0  # streaming requests running in this round: what the auto interval is set by
        self._after_prefill = False  # whether this round's decode step follows a prefill pass
        model.allocate_cache(max_batch_size, self.max_seq_len)
        _release_openmp_workers()

        self._cv = threading.Condition()
        self._waiting: deque[_Request] = deque()
        self._running: dict[int, _Request] = {}  # slot -> request, prefilled or not
        self._prefilling: deque[_Request] = deque()  # holding a slot, prompt not yet prefilled
        self._live: dict[str, _Request] = {}  # waiting or running, by id
        self._free_slots = list(range(max_batch_size))  # min-heap: low slots first keeps the batch compact
        # What each slot's cache holds, for prompts that start the same way (None: every prompt prefilled whole)
        self._prefixes = SlotPrefixes(max_batch_size) if kv_cache_reuse else None
        self._reused_tokens = 0  # prompt tokens taken from the cache instead of prefilled, since the start
        self._cancels: set[str] = set()
        self._closed = False
        self._placed = threading.Event()  # the engine thread is on its cores: a launcher may confine the rest
        self._placement_error: OSError | None = None
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()
        self._placed.wait()
        if self._placement_error:
            raise ValueError(f"the engine cannot run on cores {sorted(cpu_cores)}") from self._placement_error

    # ---- client API (any thread) -----------------------------------------------------------------

    def submit(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        on_output: Callable[[GenerationOutput], None],
    ) -> None:
        vocab = self.config.vocab_size
        params.validate(vocab)
        prompt = list(prompt_ids)
        if not prompt:
            raise ValueError("prompt must contain at least one token")
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        total = len(prompt) + params.max_new_tokens
        if total > self.max_seq_len:
            raise PromptTooLongError(
                f"This model's maximum context length is {self.max_seq_len} tokens. However, you requested "
                f"{total} tokens ({len(prompt)} in the prompt, {params.max_new_tokens} for the completion). "
                "Please reduce the length of the prompt or completion."
            )
        generator = None
        if not params.greedy:
            # One generator per request: its samples do not depend on batch neighbours.
            generator = torch.Generator()
            if params.seed is not None:
                generator.manual_seed(params.seed)
            else:
                generator.seed()
        request = _Request(request_id, prompt, params, on_output, generator)
        with self._cv:
            if self._closed:
                raise RuntimeError("engine is closed")
            if request_id in self._live:
                raise ValueError(f"request id {request_id!r} is already in use")
            if len(self._waiting) >= self.max_queue_size:
                raise QueueFullError(f"the waiting queue is full ({self.max_queue_size} requests)")
            self._waiting.append(request)
            self._live[request_id] = request
            self._cv.notify()

    def cancel(self, request_id: str) -> bool:
        """Ask the engine to drop a live request; False when no such request is waiting or running."""
        with self._cv:
            if request_id not in self._live:
                return False
            self._cancels.add(request_id)
            self._cv.notify()
            return True

    def stats(self) -> dict:
        with self._cv:
            return {
                "running": len(self._running),
                "waiting": len(self._waiting),
                "free_slots": len(self._free_slots),
                "max_batch_size": self.max_batch_size,
                "max_queue_size": self.max_queue_size,
                "steps": self._step,
                "reused_prompt_tokens": self._reused_tokens,
            }

    def close(self) -> None:
        """Stop the loop; requests still live get a final "cancelled" output."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- engine thread ---------------------------------------------------------------------------

    def _loop(self) -> None:
        # Both before this thread's first parallel region: the OpenMP workers it starts inherit them.
        try:
            if self._cpu_cores:
                os.sched_setaffinity(0, self._cpu_cores)  # 0: this thread
        except OSError as exc:
            self._placement_error = exc
            return
        finally:
            self._placed.set()
        if self._num_threads:
            torch.set_num_threads(self._num_threads)
        self._team = torch.get_num_threads()
        _start_helpers(self._team)
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not (self._closed or self._waiting or self._running or self._cancels):
                        self._cv.wait()
                    if self._closed:
                        break
                    cancels, self._cancels = self._cancels, set()
                for request_id in cancels:
                    request = self._live.get(request_id)
                    if request is not None:
                        self._finish(request, "cancelled")
                admitted = self._admit()
                self._bring_prefixes(admitted)
                self._prefilling.extend(admitted)
                # Counted once per round, so that every stream of the round gets the same interval.
                self._streams = sum(r.params.streaming for r in self._running.values())
                pieces = self._next_prefill_group()
                self._after_prefill = bool(pieces)
                if pieces:
                    self._prefill(pieces)
                self._decode_step()
                self._step += 1
            for request in list(self._live.values()):
                self._finish(request, "cancelled")

    def _admit(self) -> list[_Request]:
        with self._cv:
            admitted = []
            while self._waiting and self._free_slots:
                request = self._waiting.popleft()
                request.slot = heapq.heappop(self._free_slots)
                self._running[request.slot] = request
                admitted.append(request)
            return admitted

    def _bring_prefixes(self, requests: list[_Request]) -> None:
        """Give each admitted request's slot the longest start of its prompt that any slot holds, its own
        first: a copy of cache positions (microseconds a token, against ~2 ms to prefill one here). Positions a
        slot holds stay as they are while its request runs, and a new one's prefill writes only past them.
        What the new request would overwrite is first moved to the free slot that holds the least, when that
        loses fewer tokens (another conversation's next turn may come)."""
        if self._prefixes is None:
            return
        prefixes = self._prefixes
        for r in requests:
            others = (slot for slot in range(self.max_batch_size) if slot != r.slot)
            source, length = prefixes.best([r.slot, *others], r.prompt)
            kept = length if source == r.slot else 0
            spare = min(self._free_slots, key=prefixes.held, default=None)
            if spare is not None and spare != source and prefixes.held(spare) < prefixes.held(r.slot) - kept:
                self._copy_prefix(r.slot, spare, prefixes.held(r.slot))
            if source != r.slot:
                self._copy_prefix(source, r.slot, length)

    def _copy_prefix(self, source: int, target: int, length: int) -> None:
        self.model.copy_cache_prefix(source, target, length)
        self._prefixes.copy(source, target, length)

    def _prefill_start(self, request: _Request) -> int:
        """Where `request`'s prefill goes on: past what its slot holds of its prompt (reused, or its own earlier
        chunks)."""
        return self._prefixes.reusable(request.slot, request.prompt) if self._prefixes else request.prefilled

    def _next_prefill_group(self) -> list[tuple[_Request, int, int]]:
        """The next pass's (request, start, end) pieces of prompts: whole prompts while they fit the budget, or
        the next chunk of one longer than it, which stays first in line until its last chunk."""
        group, tokens = [], 0
        while self._prefilling:
            request = self._prefilling[0]
            if self._live.get(request.id) is not request:  # finished (cancelled) while waiting for its prefill
                self._prefilling.popleft()
                continue
            start = self._prefill_start(request)
            fresh = len(request.prompt) - start
            if tokens + fresh <= PREFILL_TOKENS:
                group.append((self._prefilling.popleft(), start, len(request.prompt)))
                tokens += fresh
                continue
            if not group:
                group.append((request, start, start + PREFILL_TOKENS))
            break
        return group

    def _prefill(self, pieces: list[tuple[_Request, int, int]]) -> None:
        requests = [r for r, _, _ in pieces]
        try:
            hidden = self.model.prefill(
                [r.slot for r in requests],
                [torch.tensor(r.prompt[start:end], dtype=torch.long) for r, start, end in pieces],
                [start for _, start, _ in pieces],
            )
        except Exception as e:
            log.exception("prefill failed for requests %s", [r.id for r in requests])
            self._forget_slots(r.slot for r in requests)
            self._fail(requests, e)
            return
        for r, start, end in pieces:
            if not r.prefilled:  # its first piece: what it starts from was reused
                r.cached = start
                self._reused_tokens += start
            r.prefilled = end
            if self._prefixes:
                self._prefixes.hold(r.slot, r.prompt[:end])
        done = [i for i, (r, _, end) in enumerate(pieces) if end == len(r.prompt)]
        if not done:
            return
        try:
            self._choose_all([requests[i] for i in done], hidden[done])
        except Exception as e:
            log.exception("choosing the first tokens failed for requests %s", [requests[i].id for i in done])
            self._fail([requests[i] for i in done], e)

    def _forget_slots(self, slots) -> None:
        """After a failed pass: what these slots' caches hold is unknown."""
        if self._prefixes:
            for slot in slots:
                self._prefixes.forget(slot)

    def _decode_step(self) -> None:
        # Slots still waiting for their prefill ride along like idle ones: their cache rows are written by
        # the prefill before they are ever attended to.
        requests = sorted((r for r in self._running.values() if r.generated), key=lambda r: r.slot)
        if not requests:
            return
        n = requests[-1].slot + 1
        last_pos = max(len(r.prompt) + len(r.generated) - 1 for r in requests)
        # Idle slots below n ride along (their results are discarded) and write one cache row. A slot whose prompt
        # is being prefilled writes just past what it holds: its prefill's next chunk overwrites that row. A free
        # slot writes there too, or at the batch's last position where that comes first (it then holds less).
        idle = set(range(n)) - {r.slot for r in requests}
        tokens = torch.zeros(n, dtype=torch.long)
        positions = torch.full((n,), last_pos, dtype=torch.long)
        for slot in idle:
            waiting = self._running.get(slot)  # admitted, prompt not prefilled yet
            if waiting is not None:
                written = self._prefixes.held(slot) if self._prefixes else waiting.prefilled
                positions[slot] = min(written, self.max_seq_len - 1)
            elif self._prefixes:
                positions[slot] = min(self._prefixes.held(slot), last_pos)
        for r in requests:
            tokens[r.slot] = r.generated[-1]
            positions[r.slot] = len(r.prompt) + len(r.generated) - 1
        # One row: the chunk pool's helpers share its kernels' work (csrc/chunk_pool.c), and ATen's ops run on
        # this thread alone, so that OpenMP's workers sleep rather than spin beside those helpers after each op.
        alone = n == 1 and self._team > 1
        if alone:
            torch.set_num_threads(1)
        try:
            self._decode_and_choose(requests, idle, tokens, positions)
        finally:
            if alone:
                torch.set_num_threads(self._team)

    def _decode_and_choose(self, requests: list[_Request], idle: set[int], tokens: torch.Tensor,
                           positions: torch.Tensor) -> None:
        n = len(tokens)
        try:
            hidden = self.model.decode(tokens, positions)[[r.slot for r in requests]]
        except Exception as e:
            log.exception("decode step failed")
            self._forget_slots(range(n))
            self._fail(requests, e)
            return
        if self._prefixes:
            for slot in idle:
                self._prefixes.truncate(slot, int(positions[slot]))
            for r in requests:
                self._prefixes.append(r.slot, r.generated[-1])
        try:
            self._choose_all(requests, hidden)
        except Exception as e:
            log.exception("choosing the next tokens failed")
            self._fail(requests, e)

    def _fail(self, requests: list[_Request], error: Exception) -> None:
        for r in requests:
            self._finish(r, "error", error=f"{type(error).__name__}: {error}")

    def _choose_all(self, requests: list[_Request], hidden: torch.Tensor) -> None:
        """Next token of each request from its row of final hidden states."""
        # Rows that only need the argmax of their logits get it from the model's greedy path (which skips most
        # of the output layer); rows that only need a draw from their softmax get it from one batched call;
        # the others go through the full per-row path. Tokens are all chosen before any is delivered.
        greedy = [i for i, r in enumerate(requests) if sampling.plain_greedy(r.params, len(r.generated))]
        others = sorted(set(range(len(requests))) - set(greedy))
        tokens = {}
        if greedy:
            tokens.update(zip(greedy, self.model.greedy(hidden[greedy]).tolist()))
        logits = self.model.logits(hidden[others]) if others else None
        drawn = [
            j for j, i in enumerate(others) if sampling.plain_sampling(requests[i].params, len(requests[i].generated))
        ]
        if drawn:
            params = [requests[others[j]].params for j in drawn]
            temperatures = torch.tensor([p.temperature for p in params], dtype=logits.dtype)
            uniforms = torch.stack([sampling.uniform(requests[others[j]].generator) for j in drawn])
            drawn_tokens = sampling.sample(logits[drawn], uniforms, temperatures).tolist()
            tokens.update(zip((others[j] for j in drawn), drawn_tokens))
        row_of = {i: j for j, i in enumerate(others)}  # request -> its row of `logits`
        for i, r in enumerate(requests):
            if i in tokens:
                self._append(r, sampling.Choice(tokens[i], None, None))
            else:
                self._advance(r, logits[row_of[i]])

    def _advance(self, request: _Request, logits: torch.Tensor) -> None:
        """Sample the next token of `request` from its logits row, then deliver or finish."""
        p = request.params
        try:
            if p.repetition_penalty != 1.0 and request.seen is None:
                request.seen = torch.zeros(logits.shape[-1], dtype=torch.bool)
                request.seen[request.prompt] = True
            if (p.presence_penalty or p.frequency_penalty) and request.counts is None:
                request.counts = torch.zeros(logits.shape[-1], dtype=logits.dtype)
            sequence = request.prompt + request.generated if p.bad_words else []
            logits = sampling.process_logits(
                logits, p, sequence, len(request.generated), request.seen, request.counts
            )
            choice = sampling.choose(logits, p, request.generator)
        except Exception as e:
            log.exception("sampling failed for request %s", request.id)
            self._finish(request, "error", error=f"{type(e).__name__}: {e}")
            return
        self._append(request, choice)

    def _append(self, request: _Request, choice: sampling.Choice) -> None:
        """Record the chosen token, then deliver or finish."""
        p = request.params
        token = choice.token
        request.generated.append(token)
        request.out_tokens.append(token)
        if request.seen is not None:
            request.seen[token] = True
        if request.counts is not None:
            request.counts[token] += 1
        if choice.log_prob is not None:
            request.cum_log_prob += choice.log_prob
            request.out_log_probs.append(choice.log_prob)
        if choice.top_logprobs is not None:
            request.out_top.append(choice.top_logprobs)

        reason, stop_reason = self._finish_reason(request)
        if reason is not None:
            self._finish(request, reason, stop_reason=stop_reason)
        elif p.streaming and stream_due(self._step, len(request.generated), self.stream_interval, self._streams,
                                        self._after_prefill):
            self._deliver(request, finished=False)

    def _finish_reason(self, request: _Request):
        p, generated = request.params, request.generated
        n = len(generated)
        if n >= p.min_tokens:
            if generated[-1] in p.end_ids:
                return "stop", generated[-1]
            for word in p.stop_words:
                if len(word) <= n and generated[n - len(word) :] == list(word):
                    return "stop", list(word)
        if n >= p.max_new_tokens or len(request.prompt) + n >= self.max_seq_len:
            return "length", None
        return None, None

    def _finish(self, request: _Request, reason: str, stop_reason=None, error: str | None = None) -> None:
        with self._cv:
            if self._live.pop(request.id, None) is None:
                return  # already finished
            if request.slot >= 0:
                del self._running[request.slot]
                heapq.heappush(self._free_slots, request.slot)
            else:
                self._waiting.remove(request)
        self._deliver(request, finished=True, reason=reason, stop_reason=stop_reason, error=error)

    def _deliver(self, request: _Request, finished: bool, reason=None, stop_reason=None, error=None) -> None:
        p = request.params
        output = GenerationOutput(
            request_id=request.id,
            token_ids=request.out_tokens,
            log_probs=request.out_log_probs if p.return_log_probs else None,
            top_logprobs=request.out_top if p.top_logprobs else None,
            finished=finished,
            finish_reason=reason,
            stop_reason=stop_reason,
            num_input_tokens=len(request.prompt),
            num_cached_tokens=request.cached,
            num_output_tokens=len(request.generated),
            cum_log_prob=request.cum_log_prob,
            error=error,
        )
        request.out_tokens, request.out_log_probs, request.out_top = [], [], []
        try:
            request.on_output(output)
        except Exception:
            log.exception("output callback failed for request %s; cancelling it", request.id)
            if not finished:
                self._finish(request, "cancelled", error="output callback raised")
