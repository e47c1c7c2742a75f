"""The engine's synchronous core: requests of token ids in, one step at a time (schedule, run, sample), token ids
out. It never tokenizes or detokenizes: that is the API side's work (`inputs.py`, `outputs.py`).

`core.py` runs it in a process of its own behind the API; `generate()` drives it on the calling thread (command line,
benchmarks, tests).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import queue
import select
import time
import uuid
from collections.abc import Callable

import torch

from loramux.core.adapter_source import AdapterRef, AdapterSource
from loramux.server.engine.adapter_cache import FETCH_CPU_THREADS_ON_GPU, AdapterCache
from loramux.server.engine.adapter_reader import ReadSpec
from loramux.server.engine.adapter_slots import AdapterSlots
from loramux.server.engine.batch import Chunk
from loramux.server.engine.block_manager import BlockManager
from loramux.server.engine.config import EngineConfig, fit_to_device, kv_blocks_for
from loramux.server.engine.errors import AdapterLoadError, ContextLengthError, InvalidRequestError, QueueFullError
from loramux.server.engine.host_arena import HostArena
from loramux.server.engine.inputs import InputProcessor
from loramux.server.engine.model_runner import ModelRunner
from loramux.server.engine.outputs import OutputProcessor
from loramux.server.engine.request import EngineOutput, Request, RequestOutput, RequestStatus, SamplingParams
from loramux.server.engine.scheduler import Scheduler
from loramux.server.engine.slot_writer import SlotWriter
from loramux.server.layers.sampler import Sampler
from loramux.server.models.loader import BaseModel

log = logging.getLogger(__name__)

# What a step computed: "decode", one generated token for each of its sequences; "prefill", prompt tokens only (or a
# preempted request's tokens computed again); "mixed", both.
STEP_KINDS = ("decode", "mixed", "prefill")


def step_kind(prompt_tokens: int, decode_tokens: int) -> str:
    return "decode" if not prompt_tokens else "prefill" if not decode_tokens else "mixed"


class LLMEngine:
    """The engine driven synchronously, on one thread: `add`, `abort`, `step` and `stats` are called there (the
    scheduler and slot memory's bookkeeping take no lock); adapter reads finish on other threads and queue their
    follow-up for the next step (`wake_fd` tells a waiting loop).

    It allocates the KV cache and adapter slots inside `base.model`: one engine per loaded base at a time.
    """

    def __init__(self, base: BaseModel, source: AdapterSource | None = None, config: EngineConfig | None = None):
        self.base = base
        self.config, self.notes = fit_to_device(config or EngineConfig(), base)
        config = self.config
        layout = config.slot_layout
        if config.num_slots:  # slots first, so that the KV cache is sized from the memory that remains
            base.model.allocate_lora_slots(layout)
        num_blocks = kv_blocks_for(base, config)
        self.runner = ModelRunner(
            base.model, config.block_size, num_blocks, max_prompt_tokens=config.max_num_batched_tokens
        )
        self.blocks = BlockManager(num_blocks, config.block_size)
        self.sampler = Sampler(base.config.vocab_size, self.runner.device)
        # A sequence ends ("length") at the context length, and before it would need more KV than the whole cache.
        self.max_model_len = min(
            config.max_model_len or base.config.max_position_embeddings,
            base.config.max_position_embeddings,
            num_blocks * config.block_size,
        )
        # Other threads' news (an adapter read, a new revision seen) is queued for the step loop in the inbox, and
        # wakes a waiting step loop through this pipe.
        self._inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        self.writer = SlotWriter(base.model)
        self.slots = AdapterSlots(layout, self.writer)
        self.adapters = self._adapter_cache(source)
        self.scheduler = Scheduler(
            self.blocks,
            self.slots,
            config.max_num_seqs,
            config.max_num_batched_tokens,
        )
        self.requests: dict[str, Request] = {}
        overlap = config.overlap_outputs
        self.overlap_outputs = self.runner.device.type == "cuda" if overlap is None else overlap
        self._outputs: list[EngineOutput] = []  # this step's, so far
        # steps that ran, by kind (`step_kind`): how many, their seconds (from scheduling to tokens sampled), and the
        # prompt tokens they computed
        self._steps = dict.fromkeys(STEP_KINDS, 0)
        self._step_seconds = dict.fromkeys(STEP_KINDS, 0.0)
        self._step_prompt_tokens = dict.fromkeys(STEP_KINDS, 0)
        self.stop_token_ids = base.stop_token_ids()
        log.info(
            "engine: %d KV blocks of %d tokens, %d adapter slots of rank %d in pages of rank %d",
            num_blocks,
            config.block_size,
            config.num_slots,
            config.max_lora_rank,
            layout.page_rank,
        )

    def _adapter_cache(self, source: AdapterSource | None) -> AdapterCache:
        """The CPU cache of adapters over `source`. Its memory is allocated here, once: page-locked on a GPU
        (page-locking while serving stalls the step loop); on the CPU a plain tensor whose pages the OS commits only
        as adapters fill them. Shared with the reader processes where there are any."""
        config, on_gpu = self.config, self.runner.device.type == "cuda"
        readers, arena = config.adapter_reader_processes or 0, None
        if config.num_slots and source is not None:
            try:
                arena = HostArena(config.adapter_cache_bytes, pin_memory=on_gpu, shared=readers > 0)
            except OSError as exc:  # no memory file here (memfd_create refused): the fetch threads read instead
                log.warning("the adapter cache cannot be shared with reader processes (%s); reading in-process", exc)
                arena, readers = HostArena(config.adapter_cache_bytes, pin_memory=on_gpu), 0
        # On a GPU the step loop is one host thread launching kernels: a fetch's CPU passes on every core would take
        # cores from it. On the CPU the step loop computes on those cores itself, so the default stays.
        cpu_threads = FETCH_CPU_THREADS_ON_GPU if on_gpu else None
        spec = ReadSpec(base=self.base.config, dtype=self.writer.dtype, b_rank_major=self.writer.b_rank_major,
                        cpu_threads=cpu_threads)  # fmt: skip
        return AdapterCache(
            source,
            spec,
            config.max_lora_rank,
            config.adapter_cache_bytes,
            arena=arena,
            reader_processes=readers,
            # a new revision's slots go stale on the step loop, in the order the fetch threads saw the revisions
            on_new_revision=lambda repo, commit: self._post(lambda: self.slots.retire(repo, commit)),
        )

    # -- requests in ---------------------------------------------------------------------------------------------

    def add(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        adapter: str | None = None,
        tenant: str | None = None,
    ) -> None:
        """Queue a request of token ids (`inputs.InputProcessor` makes them). Raises InvalidRequestError (an id in
        use, an adapter name that cannot be one, an adapter on an engine without slots), ContextLengthError and
        QueueFullError (as many requests held as `max_num_seqs + max_queue`). What needs the adapter source comes
        back as an output with `error` (`AdapterNotFoundError`, `AdapterConfigError`, ...)."""
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        if len(self.requests) >= self.config.max_num_seqs + self.config.max_queue:
            raise QueueFullError(f"the engine holds {len(self.requests)} requests; retry later")
        if not prompt_ids or len(prompt_ids) >= self.max_model_len:
            raise ContextLengthError(
                f"the prompt has {len(prompt_ids)} tokens; this engine takes 1 to {self.max_model_len - 1}"
            )
        if any(t >= self.sampler.vocab_size for t in params.logit_bias):
            vocab = self.sampler.vocab_size
            raise InvalidRequestError(f"logit_bias token ids must be below the vocabulary size, {vocab}")
        try:
            ref = AdapterRef.parse(adapter) if adapter is not None else None
        except ValueError as exc:
            raise InvalidRequestError(str(exc)) from None
        if ref is not None and not self.config.num_slots:
            raise InvalidRequestError("this engine has no adapter slots: it serves the base model only")
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.stop_token_ids)
        request = Request(request_id, prompt_ids, params, ref, tenant, stop_ids)
        self.requests[request_id] = request
        if ref is None:
            self.scheduler.add(request)
            return
        self._fetch(request, frozenset(self.slots.resident()))

    def _fetch(self, request: Request, in_slots: frozenset[str] = frozenset()) -> None:
        """Resolve and read the request's adapter off the step loop; what is in slot memory (`in_slots`) is not
        read, since the request runs from its slot."""
        future = self.adapters.fetch_async(request.adapter, request.tenant or None, in_slots)
        future.add_done_callback(lambda f: self._post(lambda: self._adapter_fetched(request, f)))

    def abort(self, request_id: str) -> None:
        """End a request now (its KV blocks and slot pin free); its last output says "abort". Unknown ids (ended
        already) are ignored."""
        request = self.requests.get(request_id)
        if request is not None:
            self._end(request)
            self._outputs.append(EngineOutput(request_id, [], "abort"))

    def _post(self, fn: Callable[[], None]) -> None:
        self._inbox.put(fn)
        self._wake()

    def _wake(self) -> None:
        # a full pipe means a wake-up is pending anyway; a closed one, that the engine is shut down
        with contextlib.suppress(OSError):
            os.write(self._wake_write, b"\0")

    @property
    def wake_fd(self) -> int:
        """Readable when another thread queued work for the step loop (poll it beside other sources of work)."""
        return self._wake_read

    def wait_for_work(self, timeout: float) -> None:
        """Block until another thread queues work, or `timeout` seconds."""
        select.select([self._wake_read], [], [], timeout)

    def _adapter_fetched(self, request: Request, future) -> None:
        if request.status is not RequestStatus.RESOLVING:
            return  # aborted meanwhile
        exc = future.exception()
        if exc is not None:
            del self.requests[request.request_id]
            request.status = RequestStatus.FINISHED
            self._outputs.append(EngineOutput(request.request_id, [], error=exc))
            return
        request.adapter_key, request.lora = future.result()
        self.scheduler.add(request)

    # -- the step ------------------------------------------------------------------------------------------------

    def has_unfinished(self) -> bool:
        return bool(self.requests) or bool(self._outputs) or not self._inbox.empty()

    def step(self, on_forward_queued: Callable[[], None] | None = None) -> list[EngineOutput] | None:
        """Schedule, run and sample one step -> its outputs (tokens sampled, and requests ended otherwise: aborts,
        errors), or None when there was nothing to do (the caller may `wait_for_work`).

        `on_forward_queued` is called once the step's forward is queued on the device and before its tokens are read
        back (the engine process sends the previous step's outputs there, so that the device computes meanwhile).
        The slot writes of the adapters claimed in scheduling are queued right after the forward (their copies run
        beside it), and their slots are ready for the first step that begins after the copies are done."""
        began = time.perf_counter()
        self._apply_inbox()
        self.slots.complete_writes()  # slots whose writes are done are ready for this step
        batch = self.scheduler.schedule()
        for request in self.scheduler.take_refetches():  # their adapters left slot memory before they got a slot
            self._fetch(request)
        logits = self.runner.run([self._chunk(request, n) for request, n in batch]) if batch else None
        self.slots.issue_writes()  # the slot writes of this step's claims: their copies run beside the step
        self._end_failed_writes()
        if on_forward_queued is not None:
            on_forward_queued()
        if logits is not None:
            self._sample(batch, logits)
            prompt_tokens = self.scheduler.prompt_tokens
            kind = step_kind(prompt_tokens, self.scheduler.decode_tokens)
            self._steps[kind] += 1
            self._step_seconds[kind] += time.perf_counter() - began
            self._step_prompt_tokens[kind] += prompt_tokens
        elif self.slots.writes_pending():  # nothing runs until they are done
            self.slots.complete_writes(wait=True)
        elif not self._outputs:
            return None
        outputs, self._outputs = self._outputs, []
        return outputs

    def _apply_inbox(self) -> None:
        try:
            while os.read(self._wake_read, 4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                self._inbox.get_nowait()()
            except queue.Empty:
                return

    @staticmethod
    def _chunk(request: Request, n: int) -> Chunk:
        start = request.num_computed
        return Chunk(request.token_ids(start, start + n), start, request.block_table, request.slot)

    def _sample(self, batch, logits: list[torch.Tensor]) -> None:
        ready: list[tuple[Request, torch.Tensor]] = []
        for (request, n), rows in zip(batch, logits, strict=True):
            request.num_computed += n
            if request.num_computed == request.num_tokens:  # the whole sequence is in the cache: sample
                ready.append((request, rows[-1]))
        if not ready:
            return
        rows = torch.stack([row for _, row in ready])  # (n, vocab)
        tokens, logprobs = self.sampler.sample(rows, [request for request, _ in ready])
        for (request, row), token, token_logprobs in zip(ready, tokens, logprobs, strict=True):
            request.output_ids.append(token)
            finish = None
            if token in request.stop_ids:
                finish = "stop"
            elif len(request.output_ids) >= request.params.max_tokens or request.num_tokens >= self.max_model_len:
                finish = "length"
            if finish is not None:
                self._end(request)  # out of the scheduler now: the next step does not run it
            logits_row = row.detach().float().cpu()[None] if request.params.capture_logits else None
            self._outputs.append(
                EngineOutput(request.request_id, [token], finish, logits=logits_row,
                             logprobs=None if token_logprobs is None else [token_logprobs])
            )  # fmt: skip

    def _end_failed_writes(self) -> None:
        """End the requests that wait for a slot whose write failed (`AdapterSlots` frees the slot), with
        AdapterLoadError; other requests for the adapter may load it again later."""
        for index, key, exc in self.slots.failed_writes():
            error = AdapterLoadError(f"adapter {key} could not be written into slot memory: {exc}")
            for request in [r for r in self.requests.values() if r.slot == index and r.status is RequestStatus.WAITING]:
                request.slot = -1  # its pin went with the slot
                self._end(request)
                self._outputs.append(EngineOutput(request.request_id, [], error=error))

    def _end(self, request: Request) -> None:
        """Take a request out of the engine: its KV blocks and slot pin free, its place in the queue limit given
        back. Its last output is the caller's to add."""
        self.scheduler.finish(request)
        self.requests.pop(request.request_id, None)

    # -- introspection and the synchronous driver ----------------------------------------------------------------

    def stats(self) -> dict[str, float]:
        """A snapshot: queue length, running requests, slot occupancy, adapter cache counters, KV blocks, the steps run
        so far by kind (count, seconds, prompt tokens); on CUDA the device memory torch's allocator holds for tensors
        (`allocated`) and has reserved from the device."""
        s = self.scheduler
        stats: dict[str, float] = {
            "requests_waiting": s.num_waiting,
            "requests_running": len(s.running),
            "requests_resolving": sum(1 for r in self.requests.values() if r.status is RequestStatus.RESOLVING),
            "kv_blocks_total": self.blocks.num_blocks,
            "kv_blocks_used": self.blocks.num_blocks - self.blocks.num_free,
            "slot_hits": s.slot_hits,
            "slot_misses": s.slot_misses,
            "preemptions": s.preemptions,
            "engine_pid": os.getpid(),
        }
        for kind in STEP_KINDS:
            stats[f"steps_{kind}"] = self._steps[kind]
            stats[f"step_seconds_{kind}"] = self._step_seconds[kind]
            stats[f"step_prompt_tokens_{kind}"] = self._step_prompt_tokens[kind]
        stats.update(self.slots.stats())
        stats.update(self.adapters.stats())
        stats["adapter_load_seconds"] = stats["adapter_read_seconds"] + stats["adapter_slot_write_seconds"]
        device = self.runner.device
        if device.type == "cuda":
            stats["device_memory_allocated_bytes"] = torch.cuda.memory_allocated(device)
            stats["device_memory_reserved_bytes"] = torch.cuda.memory_reserved(device)
        return stats

    def input_processor(self) -> InputProcessor:
        return InputProcessor(self.base.tokenizer, self.base.config.vocab_size, self.max_model_len)

    def output_processor(self) -> OutputProcessor:
        return OutputProcessor(self.base.tokenizer, self.stop_token_ids)

    def generate(
        self,
        prompts: list[str | list[int]],
        params: SamplingParams | None = None,
        adapters: list[str | None] | None = None,
        tenants: list[str | None] | None = None,
    ) -> list[RequestOutput]:
        """Run prompts (texts or token ids) to completion on the calling thread; one merged RequestOutput per prompt,
        in order. Raises the first request's error (after ending the others)."""
        params = params or SamplingParams()
        adapters = adapters or [None] * len(prompts)
        tenants = tenants or [None] * len(prompts)
        inputs, outputs = self.input_processor(), self.output_processor()
        run = uuid.uuid4().hex[:8]
        ids = [f"generate-{run}-{i}" for i in range(len(prompts))]
        results: dict[str, list[RequestOutput]] = {rid: [] for rid in ids}
        for rid, prompt, adapter, tenant in zip(ids, prompts, adapters, tenants, strict=True):
            prompt_ids = inputs.prompt_ids(**{"prompt" if isinstance(prompt, str) else "prompt_ids": prompt})
            outputs.add(rid, params, len(prompt_ids))
            self.add(rid, prompt_ids, params, adapter, tenant)
        error: BaseException | None = None
        while len(outputs) and error is None:
            step_outputs = self.step()
            if step_outputs is None:
                self.wait_for_work(0.05)
                continue
            for out in step_outputs:
                if out.error is not None:
                    error = error or out.error
                    outputs.drop(out.request_id)
                    continue
                item, stopped = outputs.process(out)
                if item is not None:
                    results[out.request_id].append(item)
                if stopped:
                    self.abort(out.request_id)
        for rid in ids:  # what a stop string or an error ended: the engine forgets it too
            self.abort(rid)
        self._outputs = [o for o in self._outputs if o.request_id not in results]
        if error is not None:
            raise error
        return [merge_outputs(results[rid]) for rid in ids]

    def warm_up(self) -> None:
        """Before serving: the runner's warm-up (on a GPU: kernels compiled, decode graphs captured), the adapter reader
        processes started (`AdapterCache.wait_ready`; a reader that cannot start fails the warm-up), then every object
        alive now (the model, its modules, the tokenizer, the engine's own state) moved out of the garbage collector's
        generations (`gc.freeze`): a full collection would otherwise walk all of them again and again while serving,
        with the GIL held, stalling the step loop and the adapter threads alike (0.6-1.1 s of a 13-18 s run before).
        `shutdown` gives them back."""
        self.runner.warm_up()
        self.adapters.wait_ready()
        gc.collect()
        gc.freeze()

    def shutdown(self) -> None:
        self.adapters.shutdown()
        if self.adapters.arena is not None:
            self.adapters.arena.close()
        for fd in (self._wake_read, self._wake_write):
            os.close(fd)
        gc.unfreeze()  # what this engine held may be collected again once it is dropped


def merge_outputs(items: list[RequestOutput]) -> RequestOutput:
    """The stream of one request as one output: all text, all token ids, the final counts and finish reason."""
    last = items[-1]
    logits = [o.logits for o in items if o.logits is not None]
    logprobs = [o.logprobs for o in items if o.logprobs is not None]
    return RequestOutput(
        last.request_id,
        "".join(o.text for o in items),
        [t for o in items for t in o.token_ids],
        last.finish_reason,
        last.prompt_tokens,
        last.completion_tokens,
        torch.cat(logits) if logits else None,
        [lp for part in logprobs for lp in part] if logprobs else None,
    )
