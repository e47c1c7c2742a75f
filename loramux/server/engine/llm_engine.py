"""The engine's synchronous core: requests in, one step at a time (schedule, forward, sample), outputs out.

`engine.py` wraps it for asyncio; `generate()` drives it on the calling thread (command line, benchmarks, tests).
"""

from __future__ import annotations

import gc
import logging
import queue
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import torch

from loramux.adapters.source import AdapterRef, AdapterSource
from loramux.server.engine import adapter_cache
from loramux.server.engine.adapter_cache import FETCH_CPU_THREADS_ON_GPU, AdapterCache
from loramux.server.engine.block_manager import BlockManager
from loramux.server.engine.errors import AdapterLoadError, ContextLengthError, InvalidRequestError, QueueFullError
from loramux.server.engine.host_arena import HostArena
from loramux.server.engine.model_runner import Chunk, ModelRunner
from loramux.server.engine.request import Request, RequestOutput, RequestStatus, SamplingParams, TokenLogprobs
from loramux.server.engine.scheduler import Scheduler
from loramux.server.layers.sampler import Sampler
from loramux.server.layers.slots import SlotLayout
from loramux.server.models.loader import BaseModel

log = logging.getLogger(__name__)

MiB = 1 << 20


@dataclass
class EngineConfig:
    num_slots: int = 4  # slot memory: this many adapters of max_lora_rank resident at once, more of lower rank
    max_lora_rank: int = 64  # r_max of the slots; adapters of higher rank are refused
    # Rows of one page of slot memory (None: 8 where max_lora_rank is a multiple of 8; max_lora_rank: no paging, one
    # adapter per slot whatever its rank). An adapter of rank r holds the power of two of pages that covers r.
    slot_page_rank: int | None = None
    block_size: int = 16  # tokens per KV block
    num_kv_blocks: int | None = None  # None: sized from free memory at start
    gpu_memory_fraction: float = 0.85  # of the free GPU memory, after weights and slots, given to the KV cache
    cpu_kv_cache_bytes: int = 256 * MiB  # KV cache size on the CPU
    max_num_seqs: int = 32  # requests in one batch
    max_num_batched_tokens: int = 512  # tokens in one step (the prefill chunk size)
    max_model_len: int | None = None  # context length; None: the base's max_position_embeddings
    max_queue: int = 1024  # requests accepted beyond max_num_seqs before QueueFullError
    adapter_cache_bytes: int = 2048 * MiB  # CPU cache of adapter weights, allocated when the engine starts
    # Processes that read adapters into the CPU cache (`adapter_reader`; 0: the fetch threads read them in this
    # process). None: as many as there are fetch threads on a GPU, where a read beside the step loop would keep its
    # kernel launches waiting for the GIL; 0 on the CPU.
    adapter_reader_processes: int | None = None
    # While requests decode, new ones are admitted in waves of at least `prefill_wave` (or whatever can be admitted
    # once they have waited `max_prefill_delay` steps): fewer steps carry a prefill beside the decode batch.
    prefill_wave: int = 1
    max_prefill_delay: int = 0
    # A step's outputs (text decoded, callbacks called) go out during the next step, while the device computes it,
    # instead of before it starts: 2.5-6 ms of host time a step that the device waited for (BENCHMARKS.md, twelfth
    # day), for one step more before each output is seen. None: on a GPU only (on the CPU the step computes on the
    # host: nothing to overlap).
    overlap_outputs: bool | None = None
    # Slot writes queued by the step loop itself once a step's forward is queued (their copies run beside that step;
    # slots marked ready when their copies are seen done), instead of on a loader thread that would keep the step
    # loop's kernel launches waiting for the GIL while it makes its calls.
    step_thread_slot_writes: bool = True

    def __post_init__(self) -> None:
        for name in ("num_slots", "max_lora_rank", "block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < (0 if name == "num_slots" else 1):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.adapter_cache_bytes < 0:
            raise ValueError(f"adapter_cache_bytes must not be negative, got {self.adapter_cache_bytes}")
        if self.adapter_reader_processes is not None and self.adapter_reader_processes < 0:
            raise ValueError(f"adapter_reader_processes must not be negative, got {self.adapter_reader_processes}")
        SlotLayout.of(self.num_slots, self.max_lora_rank, self.slot_page_rank)  # raises for a page rank unfit


def _kv_blocks_from_memory(base: BaseModel, config: EngineConfig) -> int:
    block_bytes = base.model.kv_block_bytes(config.block_size)
    if base.device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(base.device)
        budget = int(free * config.gpu_memory_fraction)
    else:
        budget = config.cpu_kv_cache_bytes
    return max(1, budget // block_bytes)


class LLMEngine:
    """The engine driven synchronously: `add`/`abort` from any thread, `step()` from one thread.

    It allocates the KV cache and adapter slots inside `base.model`: one engine per loaded base at a time.
    """

    def __init__(self, base: BaseModel, source: AdapterSource | None = None, config: EngineConfig | None = None):
        self.base = base
        self.config = config = config or EngineConfig()
        if config.num_slots:  # slots first, so that the KV cache is sized from the memory that remains
            base.model.allocate_lora_slots(config.num_slots, config.max_lora_rank, config.slot_page_rank)
        num_blocks = config.num_kv_blocks or _kv_blocks_from_memory(base, config)
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
        # The CPU cache's memory is allocated here, once: page-locked on a GPU (page-locking while serving stalls the
        # step loop); on the CPU a plain tensor whose pages the OS commits only as adapters fill them. Shared with
        # the reader processes where there are any.
        arena = None
        on_gpu = self.runner.device.type == "cuda"
        readers = config.adapter_reader_processes
        if readers is None:
            readers = adapter_cache.FETCH_THREADS if on_gpu else 0  # read here: a benchmark may change it
        if config.num_slots > 0 and source is not None:
            try:
                arena = HostArena(config.adapter_cache_bytes, pin_memory=on_gpu, shared=readers > 0)
            except OSError as exc:  # no memory file here (memfd_create refused): the fetch threads read instead
                log.warning("the adapter cache cannot be shared with reader processes (%s); reading in-process", exc)
                arena, readers = HostArena(config.adapter_cache_bytes, pin_memory=on_gpu), 0
        self.adapters = AdapterCache(
            source,
            base.config,
            self.runner.write_slot,
            config.num_slots,
            config.max_lora_rank,
            config.adapter_cache_bytes,
            on_change=self._wake,
            dtype=self.runner.adapter_dtype,
            arena=arena,
            page_rank=config.slot_page_rank,
            # On a GPU the step loop is one host thread launching kernels: a fetch's CPU passes on every core would
            # take cores from it. On the CPU the step loop computes on those cores itself, so the default stays.
            fetch_cpu_threads=FETCH_CPU_THREADS_ON_GPU if on_gpu else None,
            b_rank_major=self.runner.cache_b_rank_major,
            fence=self.runner.step_fence,
            reader_processes=readers,
            issue_write=self.runner.issue_write if config.step_thread_slot_writes else None,
        )
        self.scheduler = Scheduler(
            self.blocks,
            self.adapters,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            prefill_wave=config.prefill_wave,
            max_prefill_delay=config.max_prefill_delay,
        )
        self.requests: dict[str, Request] = {}
        overlap = config.overlap_outputs
        self.overlap_outputs = self.runner.device.type == "cuda" if overlap is None else overlap
        # tokens appended and not yet streamed: (request, finish reason decided when the token came, or None)
        self._unsent: list[tuple[Request, str | None]] = []
        self._inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._accepted = 0  # requests accepted and not finished (for the queue limit)
        self._accepted_lock = threading.Lock()
        self._base_stop_ids = base.stop_token_ids()
        log.info(
            "engine: %d KV blocks of %d tokens, %d adapter slots of rank %d in pages of rank %d",
            num_blocks,
            config.block_size,
            config.num_slots,
            config.max_lora_rank,
            self.adapters.layout.page_rank,
        )

    # -- requests in ---------------------------------------------------------------------------------------------

    def make_request(
        self,
        on_output: Callable[[RequestOutput | BaseException], None],
        *,
        prompt: str | None = None,
        prompt_ids: list[int] | None = None,
        messages: list[dict[str, str]] | None = None,
        adapter: str | None = None,
        params: SamplingParams | None = None,
        tenant: str | None = None,
        request_id: str | None = None,
    ) -> Request:
        """Check and tokenize a request (no I/O); raises InvalidRequestError, ContextLengthError."""
        params = params or SamplingParams()
        if sum(x is not None for x in (prompt, prompt_ids, messages)) != 1:
            raise InvalidRequestError("give exactly one of prompt, prompt_ids or messages")
        if messages is not None:
            if not isinstance(messages, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages
            ):
                raise InvalidRequestError("messages must be a list of {role, content} objects with string values")
            ids = self.base.chat_prompt_ids(messages)
        elif prompt is not None:
            ids = self.base.tokenizer(prompt)["input_ids"]
        else:
            ids = list(prompt_ids)
            vocab = self.base.config.vocab_size
            if not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
                raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab})")
        if not ids:
            raise InvalidRequestError("the prompt is empty")
        limit = self.max_model_len - 1
        if len(ids) > limit:
            raise ContextLengthError(
                f"the prompt has {len(ids)} tokens; this model's context allows at most {limit} prompt tokens"
            )
        if any(t >= self.sampler.vocab_size for t in params.logit_bias):
            vocab = self.sampler.vocab_size
            raise InvalidRequestError(f"logit_bias token ids must be below the vocabulary size, {vocab}")
        ref = AdapterRef.parse(adapter) if adapter is not None else None
        if ref is not None and not self.config.num_slots:
            raise InvalidRequestError("this engine has no adapter slots: it serves the base model only")
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self._base_stop_ids)
        return Request(request_id or uuid.uuid4().hex, ids, params, ref, tenant, stop_ids, on_output)

    def add(self, request: Request) -> None:
        """Queue a request made by `make_request` (any thread). Raises QueueFullError when overloaded."""
        with self._accepted_lock:
            if self._accepted >= self.config.max_num_seqs + self.config.max_queue:
                raise QueueFullError(f"the engine holds {self._accepted} requests; retry later")
            self._accepted += 1
        self._post(lambda: self._add(request))

    def abort(self, request_id: str) -> None:
        """Cancel a request (any thread); its stream ends with finish_reason "abort"."""
        self._post(lambda: self._abort(request_id))

    def _post(self, fn: Callable[[], None]) -> None:
        self._inbox.put(fn)
        self._wake()

    def _wake(self) -> None:
        self._wakeup.set()

    def _add(self, request: Request) -> None:
        if request.request_id in self.requests:
            self._fail(request, InvalidRequestError(f"request id {request.request_id!r} is already in use"))
            return
        self.requests[request.request_id] = request
        if request.adapter is None:
            self.scheduler.add(request)
            return
        future = self.adapters.fetch_async(request.adapter, request.tenant or None)
        future.add_done_callback(lambda f: self._post(lambda: self._adapter_fetched(request, f)))

    def _adapter_fetched(self, request: Request, future) -> None:
        if request.status is not RequestStatus.RESOLVING:
            return  # aborted meanwhile
        exc = future.exception()
        if exc is not None:
            del self.requests[request.request_id]
            request.status = RequestStatus.FINISHED
            self._fail(request, exc)
            return
        request.adapter_key, request.lora = future.result()
        self.scheduler.add(request)

    def _fail(self, request: Request, exc: BaseException) -> None:
        self._release()
        request.on_output(exc)

    def _release(self) -> None:
        with self._accepted_lock:
            self._accepted -= 1

    def _abort(self, request_id: str) -> None:
        request = self.requests.get(request_id)
        if request is not None:
            self._send(request)  # what it generated before goes out first (a stop string may end it there)
            if request.status is not RequestStatus.FINISHED:
                self._finish(request, "abort", [])

    # -- the step ------------------------------------------------------------------------------------------------

    def has_unfinished(self) -> bool:
        return bool(self.requests) or bool(self._unsent) or not self._inbox.empty()

    def wait_for_work(self, timeout: float) -> None:
        self._wakeup.wait(timeout)
        self._wakeup.clear()

    def step(self) -> bool:
        """Run one step: apply queued adds/aborts, schedule, forward, sample, stream. False if there was no work.

        With `overlap_outputs`, the tokens a step samples are appended at once (and a request that ends by a stop
        token or its length leaves the scheduler at once), but streamed during the next step, after its forward is
        queued on the device: text decoding and the callbacks run while the device computes. A request that a stop
        string ends then is already in that step; its token from it is dropped.

        With `step_thread_slot_writes`, the slot writes of the adapters claimed in scheduling are queued once the
        forward is (the copies run beside it), and their slots are ready for the first step that begins after the
        copies are done; a step that runs nothing while writes are under way waits for them."""
        while True:
            try:
                self._inbox.get_nowait()()
            except queue.Empty:
                break
        self.adapters.complete_writes()  # slots whose writes are done are ready for this step
        batch = self.scheduler.schedule()
        logits = None
        if batch:
            chunks = [
                Chunk(
                    request.token_ids(request.num_computed, request.num_computed + n),
                    request.num_computed,
                    request.block_table,
                    request.slot,
                )
                for request, n in batch
            ]
            logits = self.runner.run(chunks)
        self.adapters.issue_writes()  # the slot writes of this step's claims: their copies run beside the step
        self._end_failed_writes()  # these, or a loader thread's
        sent = self._send()  # the previous step's tokens, while the device computes this one
        if logits is None:
            if self.adapters.writes_pending():  # nothing runs until they are done
                self.adapters.complete_writes(wait=True)
                return True
            return sent
        ready: list[tuple[Request, torch.Tensor]] = []
        for (request, n), rows in zip(batch, logits, strict=True):
            if request.status is RequestStatus.FINISHED:  # a stop string ended it while this step was queued
                continue
            request.num_computed += n
            if request.num_computed == request.num_tokens:  # the whole sequence is in the cache: sample
                ready.append((request, rows[-1]))
        if ready:
            rows = torch.stack([row for _, row in ready])  # (n, vocab)
            tokens, logprobs = self.sampler.sample(rows, [request for request, _ in ready])
            for (request, row), token, token_logprobs in zip(ready, tokens, logprobs, strict=True):
                self._append_token(request, token, row, token_logprobs)
        if not self.overlap_outputs:
            self._send()
        return True

    def _end_failed_writes(self) -> None:
        """End the requests that wait for a slot whose write failed (the cache frees the slot), with AdapterLoadError;
        other requests for the adapter may load it again later."""
        for index, key, exc in self.adapters.failed_writes():
            error = AdapterLoadError(f"adapter {key} could not be written into slot memory: {exc}")
            for request in [r for r in self.requests.values() if r.slot == index and r.status is RequestStatus.WAITING]:
                request.slot = -1  # its pin went with the slot
                self.scheduler.finish(request)
                del self.requests[request.request_id]
                self._fail(request, error)

    def _append_token(
        self, request: Request, token: int, logits: torch.Tensor, logprobs: TokenLogprobs | None = None
    ) -> None:
        p = request.params
        request.output_ids.append(token)
        if p.capture_logits:
            request.pending_logits.append(logits.detach().float().cpu())
        if logprobs is not None:
            request.pending_logprobs.append(logprobs)
        finish = None
        if token in request.stop_ids:
            finish = "stop"
        elif len(request.output_ids) >= p.max_tokens or request.num_tokens >= self.max_model_len:
            finish = "length"
        if finish is not None:
            self._end(request)  # out of the scheduler now: the next step does not run it
        self._unsent.append((request, finish))

    def _send(self, only: Request | None = None) -> bool:
        """Stream the tokens appended since the last call (only `only`'s, where given). False if there were none."""
        if not self._unsent:
            return False
        if only is None:
            unsent, self._unsent = self._unsent, []
        else:
            unsent = [item for item in self._unsent if item[0] is only]
            self._unsent = [item for item in self._unsent if item[0] is not only]
        for request, finish in unsent:
            self._stream(request, finish)
        return bool(unsent)

    def flush(self) -> None:
        """Stream every token appended and not streamed yet (`overlap_outputs` holds a step's back until the next)."""
        self._send()

    def unsent_count(self) -> int:
        """Tokens appended and not streamed yet."""
        return len(self._unsent)

    def discard_unsent(self) -> list[Request]:
        """Drop the tokens appended and not streamed yet (after a failed step) -> their requests, some of them ended
        already, so that the caller can end their streams."""
        unsent, self._unsent = self._unsent, []
        return list(dict.fromkeys(request for request, _ in unsent))

    def _stream(self, request: Request, finish: str | None) -> None:
        ids = request.output_ids
        text_ids = ids[:-1] if finish == "stop" and ids and ids[-1] in request.stop_ids else ids
        request.text += self._detokenize(request, text_ids, final=finish is not None)
        text = request.text
        stops = request.params.stop
        if stops:
            # only text not yet streamed can hold a new match: what was streamed was checked (and held back) before
            found = [text.find(s, max(0, request.sent_chars - len(s) + 1)) for s in stops]
            hits = [i for i in found if i >= 0]
            if hits:
                text, finish = text[: min(hits)], "stop"
        if finish is None:
            # Hold back what may still change: a partial UTF-8 character, or the start of a stop string.
            end = len(text.rstrip("\ufffd"))
            if stops:
                end = min(end, len(text) - max(len(s) for s in stops) + 1)
            text = text[: max(end, request.sent_chars)]
        delta_text = text[request.sent_chars :]
        request.sent_chars = len(text)
        if finish is not None:
            if request.status is not RequestStatus.FINISHED:  # a stop string: it ends now
                self._end(request)
            self._emit(request, finish, ids[request.sent_tokens :], delta_text)
            return
        self._emit(request, None, ids[request.sent_tokens :], delta_text)

    def _detokenize(self, request: Request, ids: list[int], final: bool) -> str:
        text, request.prefix_offset, request.read_offset = decode_increment(
            self.base.tokenizer, ids, request.prefix_offset, request.read_offset, final
        )
        return text

    def _emit(self, request: Request, finish: str | None, token_ids: list[int], text: str) -> None:
        logits = torch.stack(request.pending_logits) if request.pending_logits else None
        request.pending_logits = []
        logprobs = request.pending_logprobs if request.params.logprobs is not None else None
        request.pending_logprobs = []
        request.sent_tokens += len(token_ids)
        request.on_output(
            RequestOutput(
                request.request_id,
                text,
                list(token_ids),
                finish,
                len(request.prompt_ids),
                len(request.output_ids),
                logits,
                logprobs,
            )
        )

    def _finish(self, request: Request, reason: str, token_ids: list[int], text: str = "") -> None:
        self._end(request)
        self._emit(request, reason, token_ids, text)

    def _end(self, request: Request) -> None:
        """Take a request out of the engine: its KV blocks and slot pin free, its place in the queue limit given
        back. Its last output is emitted by the caller."""
        self.scheduler.finish(request)
        self.requests.pop(request.request_id, None)
        self._release()

    # -- introspection and the synchronous driver ----------------------------------------------------------------

    def stats(self) -> dict[str, float]:
        """A snapshot: queue length, running requests, slot occupancy, adapter cache counters, KV blocks."""
        s = self.scheduler
        stats: dict[str, float] = {
            "requests_waiting": s.num_waiting,
            "requests_running": len(s.running),
            "requests_resolving": sum(1 for r in list(self.requests.values()) if r.status is RequestStatus.RESOLVING),
            "kv_blocks_total": self.blocks.num_blocks,
            "kv_blocks_used": self.blocks.num_blocks - self.blocks.num_free,
            "slot_hits": s.slot_hits,
            "slot_misses": s.slot_misses,
            "preemptions": s.preemptions,
        }
        stats.update(self.adapters.stats())
        return stats

    def generate(
        self,
        prompts: list[str | list[int]],
        params: SamplingParams | None = None,
        adapters: list[str | None] | None = None,
        tenants: list[str | None] | None = None,
    ) -> list[RequestOutput]:
        """Run prompts to completion on the calling thread; one merged RequestOutput per prompt, in order."""
        adapters = adapters or [None] * len(prompts)
        tenants = tenants or [None] * len(prompts)
        results: list[list[RequestOutput]] = [[] for _ in prompts]
        errors: list[BaseException] = []
        for i, (prompt, adapter, tenant) in enumerate(zip(prompts, adapters, tenants, strict=True)):

            def collect(item, i=i):
                (errors.append if isinstance(item, BaseException) else results[i].append)(item)

            kind = "prompt" if isinstance(prompt, str) else "prompt_ids"
            self.add(self.make_request(collect, **{kind: prompt}, adapter=adapter, params=params, tenant=tenant))
        while self.has_unfinished() and not errors:
            if not self.step():
                self.wait_for_work(0.05)
        if errors:  # end the others too, so that the engine is left as it was found
            for request_id in list(self.requests):
                self.abort(request_id)
            self.step()
            raise errors[0]
        return [merge_outputs(items) for items in results]

    def warm_up(self) -> None:
        """Before serving: the runner's warm-up (on a GPU: kernels compiled, decode graphs captured), the adapter reader
        processes started (`AdapterCache.wait_ready`; a reader that cannot start fails the warm-up), then every object
        alive now (the model, its modules, the tokenizer, the engine's own state) moved out of the garbage collector's
        generations (`gc.freeze`). A full collection otherwise walks all of them again and again while serving, with
        the GIL held, stalling the step loop and the adapter threads alike (W2 spent 0.6-1.1 s of its 13-18 s in the
        collector before, 0.2-0.3 s after: BENCHMARKS.md, seventh day). `shutdown` gives them back."""
        self.runner.warm_up()
        self.adapters.wait_ready()
        gc.collect()
        gc.freeze()

    def shutdown(self) -> None:
        self.adapters.shutdown()
        if self.adapters.arena is not None:
            self.adapters.arena.close()
        gc.unfreeze()  # what this engine held may be collected again once it is dropped


def decode_increment(
    tokenizer, ids: list[int], prefix_offset: int, read_offset: int, final: bool
) -> tuple[str, int, int]:
    """The text that output ids `ids` add since the last call, and the new (prefix_offset, read_offset).

    Decoding the whole output every step costs O(n) a step; instead the window `ids[prefix_offset:read_offset]`
    (already accounted for) is decoded with and without the new ids and the difference taken, which keeps the
    tokenizer's leading-space and byte-merging rules right. While the new text ends in a partial UTF-8 character
    nothing is taken, unless this is the final call.
    """
    prefix = tokenizer.decode(ids[prefix_offset:read_offset], skip_special_tokens=True)
    full = tokenizer.decode(ids[prefix_offset:], skip_special_tokens=True)
    if len(full) <= len(prefix) or (full.endswith("\ufffd") and not final):
        return "", prefix_offset, read_offset
    return full[len(prefix) :], read_offset, len(ids)


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
