"""The next token of every request in a step, sampled in one pass over the step's logits on their device.

What a row gets (one request, its `SamplingParams`; `l` its logits row, fp32):

1. Penalties and bias on the raw logits, in this order: `repetition_penalty` r (vLLM's and transformers' meaning)
   on every token of the prompt and the output so far, `l / r` where `l > 0` and `l * r` elsewhere; then OpenAI's
   `frequency_penalty` f and `presence_penalty` p on the output so far, `l - f * count - p * (count > 0)`; then
   `logit_bias`, added as given (the caller's last word: -100 bans a token, +100 all but forces it).
2. Greedy (temperature 0, or top_k 1): the argmax of the penalised logits.
3. Otherwise `e = exp((l - max l) / temperature)`: the distribution at that temperature, unnormalised, largest
   entry 1. Truncations then zero entries of `e`: top-k keeps the k largest (ties with the k-th stay too); min-p
   keeps `e >= min_p` (probability at least min_p times the most likely one's); top-p keeps the nucleus of what
   those left: a token stays when the tokens strictly more likely than it hold less than top_p of the mass, which
   is the smallest set of most likely tokens whose mass reaches top_p (tied tokens at its edge stay together). The
   token is drawn from what is left, renormalised.
4. Logprobs (`SamplingParams.logprobs`): `log_softmax(l)` of the raw logits, the model's own distribution before
   penalties, bias, temperature and truncation (what vLLM returns by default): the chosen token's and the k largest.

How, without sorting the vocabulary and without random numbers per entry:

- One uniform per row draws from `e` by inverse CDF, searched on two levels: the sums of fixed blocks of the row
  (a few hundred entries each), the block whose cumulative sum passes `u * total`, then a cumulative sum inside that
  block only.
- Top-k needs the k-th largest logit of its rows (`topk` up to the largest k in the step), min-p none.
- Top-p by rejection around a pivot (FlashInfer's sampler does the same): a token s drawn from `e` is accepted when
  the tokens with `e > e_s` hold less than `top_p * total`; otherwise s and every token with `e <= e_s` are outside
  the nucleus, so they are dropped and a fresh uniform draws again from what remains. What remains always holds the
  nucleus, so an accepted draw follows the nucleus distribution exactly. `TOP_P_ROUNDS` rounds run on the device
  whatever happens (no transfer to learn which rows are done); a row still not accepted after them (rare) is
  finished exactly on the host's second look: its nucleus found by sorting that row, and a last uniform.
- Uniforms: one `torch.rand` on the device for the step's rows; a seeded request draws its own from a generator on
  the host (made at its first step), the same count every step, so that it samples the same tokens whatever its
  batch mates; the seeded rows' draws go up in one asynchronous copy.
- The chosen tokens come back to the host in one transfer a step, the requested logprobs in the same one.
- On a GPU, `e` and its block sums come from one Triton pass over the logits, and each top-p round's sums of the
  entries above its pivot from one pass over the top-p rows, read where they lie (`sampler_kernels.py`); the CPU
  runs the same steps as torch ops.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from loramux.server.engine.request import TokenLogprobs
from loramux.server.transfer import to_device

if TYPE_CHECKING:
    from loramux.server.engine.request import Request

TOP_P_ROUNDS = 3  # draws for top-p on the device before the exact fallback of the rows still not accepted
UNIFORMS = TOP_P_ROUNDS + 1  # uniforms a row draws per step: one per round, one for the fallback


def block_size(vocab_size: int) -> int:
    """Entries per block of the two-level search: the power of two nearest sqrt(vocab), so that both levels are
    short; one that divides the vocabulary where one near it does (no padding copy of the row)."""
    target = max(16, round(vocab_size**0.5))
    candidates = [1 << p for p in range(4, 12)]
    dividing = [b for b in candidates if vocab_size % b == 0 and target / 4 <= b <= target * 4]
    pool = dividing or candidates
    return min(pool, key=lambda b: abs(b - target))


class Sampler:
    """Built once per engine; `sample` is called once per step with the rows of the requests that sample in it."""

    def __init__(self, vocab_size: int, device: torch.device | str) -> None:
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.block = block_size(vocab_size)
        self.width = -(-vocab_size // self.block) * self.block  # the vocabulary padded to whole blocks
        self._aranges: dict[int, torch.Tensor] = {}
        self._buffers: dict[str, torch.Tensor] = {}
        self._zero = torch.zeros((), device=self.device)
        self._kernels = None  # the Triton passes where the rows live on a GPU (`sampler_kernels.py`)
        if self.device.type == "cuda":
            from loramux.server.layers import sampler_kernels

            self._kernels = sampler_kernels

    def sample(self, logits: torch.Tensor, requests: Sequence[Request]) -> tuple[list[int], list[TokenLogprobs | None]]:
        """logits (n, vocab) fp32 on the device, row i for requests[i] -> the n token ids, and per row its
        TokenLogprobs where its `params.logprobs` asked (None elsewhere)."""
        n = len(requests)
        if n == 0:
            return [], []
        if logits.shape != (n, self.vocab_size):
            raise ValueError(f"logits of shape {tuple(logits.shape)} for {n} rows of {self.vocab_size} entries")
        step = _Step(requests, self.vocab_size, self.device)
        raw = None
        if step.asked:  # the model's distribution, before anything below changes the logits
            raw = torch.log_softmax(logits if step.asked_idx is None else logits[step.asked_idx], dim=-1)
        logits = self.penalise(logits, requests)
        nucleus = None
        if all(step.greedy):
            tokens = logits.argmax(dim=-1)
        else:
            tokens, nucleus = self._draw(logits, step)

        # One transfer: the tokens (-1 for a row still outside its nucleus), then per asking row its token's logprob,
        # its top-k logprobs and their ids (exact in float64).
        m, k = len(step.asked), step.max_logprobs
        if raw is None:
            host = tokens.tolist()
        else:
            chosen, values, ids = self._logprobs(raw, tokens, step, k)
            host = torch.cat([tokens.double(), chosen.double(), values.double().flatten(), ids.double().flatten()])
            host = host.tolist()
        token_list = [int(t) for t in host[:n]]
        pending = [i for i, t in enumerate(token_list) if t < 0]
        if pending and nucleus is not None:  # rare: a second transfer, for those rows
            for i, token in zip(pending, nucleus.finish(self, pending), strict=True):
                token_list[i] = token
            if raw is not None:
                chosen, _, _ = self._logprobs(raw, torch.tensor(token_list, device=self.device), step, 0)
                host[n : n + m] = chosen.tolist()

        out: list[TokenLogprobs | None] = [None] * n
        if raw is not None:
            chosen_lp, values, ids = host[n : n + m], host[n + m : n + m + m * k], host[n + m + m * k :]
            for j, i in enumerate(step.asked):
                row = slice(j * k, j * k + step.params[i].logprobs)
                out[i] = TokenLogprobs(chosen_lp[j], [(int(t), v) for t, v in zip(ids[row], values[row], strict=True)])
        return token_list, out

    # -- the steps of `sample` -------------------------------------------------------------------------------

    def _logprobs(
        self, raw: torch.Tensor, tokens: torch.Tensor, step: _Step, k: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """raw (m, vocab) logprobs of the asking rows -> their chosen tokens' (m,), the k largest (m, k), their ids."""
        mine = tokens if step.asked_idx is None else tokens[step.asked_idx]
        chosen = raw.gather(1, mine.clamp(min=0)[:, None]).squeeze(1)  # a pending row's (-1) is mended after
        if k == 0:
            empty = raw.new_empty((raw.shape[0], 0))
            return chosen, empty, empty
        top = raw.topk(k, dim=-1)
        return chosen, top.values, top.indices

    def penalise(self, logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
        """The logits with the rows' repetition, frequency and presence penalties and logit bias applied (a copy
        where any applies; token counts built only for the rows that use them)."""
        rep = [i for i, r in enumerate(requests) if r.params.repetition_penalty != 1.0]
        occ = [i for i, r in enumerate(requests) if r.params.frequency_penalty or r.params.presence_penalty]
        bias = [i for i, r in enumerate(requests) if r.params.logit_bias]
        if not (rep or occ or bias):
            return logits
        logits = logits.clone()
        vocab = logits.shape[1]
        longs: list[torch.Tensor] = []
        floats: list[torch.Tensor] = []
        if rep:  # every token of the prompt and of the output so far, by row
            seqs = [(requests[i].prompt_ids, requests[i].output_ids) for i in rep]
            longs += [
                torch.tensor(rep),
                torch.repeat_interleave(torch.arange(len(rep)), torch.tensor([len(a) + len(b) for a, b in seqs])),
                torch.tensor(list(itertools.chain.from_iterable(a + b for a, b in seqs)), dtype=torch.long),
            ]
            floats.append(torch.tensor([requests[i].params.repetition_penalty for i in rep]))
        if occ:  # the output so far, by row
            outs = [requests[i].output_ids for i in occ]
            longs += [
                torch.tensor(occ),
                torch.repeat_interleave(torch.arange(len(occ)), torch.tensor([len(o) for o in outs])),
                torch.tensor(list(itertools.chain.from_iterable(outs)), dtype=torch.long),
            ]
            floats.append(torch.tensor([requests[i].params.frequency_penalty for i in occ]))
            floats.append(torch.tensor([requests[i].params.presence_penalty for i in occ]))
        if bias:
            pairs = [(i, t, b) for i in bias for t, b in requests[i].params.logit_bias.items() if t < vocab]
            longs.append(torch.tensor([i for i, _, _ in pairs], dtype=torch.long))
            longs.append(torch.tensor([t for _, t, _ in pairs], dtype=torch.long))
            floats.append(torch.tensor([b for _, _, b in pairs]))
        longs = to_device(longs, self.device)
        floats = to_device([f.float() for f in floats], self.device)
        if rep:
            (rows, seen_rows, seen_ids), longs = longs[:3], longs[3:]
            penalty = floats.pop(0)[:, None]
            sub = logits[rows]  # (m, vocab)
            seen = torch.zeros_like(sub, dtype=torch.bool)  # (a host scalar as the value below would synchronise)
            seen.index_put_((seen_rows, seen_ids), torch.ones_like(seen_ids, dtype=torch.bool))
            logits[rows] = torch.where(seen, torch.where(sub > 0, sub / penalty, sub * penalty), sub)
        if occ:
            (rows, count_rows, count_ids), longs = longs[:3], longs[3:]
            frequency, presence = floats.pop(0)[:, None], floats.pop(0)[:, None]
            counts = torch.zeros((len(occ), vocab), dtype=logits.dtype, device=logits.device)
            counts.index_put_((count_rows, count_ids), torch.ones_like(count_ids, dtype=logits.dtype), accumulate=True)
            logits[rows] = logits[rows] - frequency * counts - presence * (counts > 0)
        if bias:
            bias_rows, bias_ids = longs
            logits.index_put_((bias_rows, bias_ids), floats.pop(0), accumulate=True)
        return logits

    def _draw(self, logits: torch.Tensor, step: _Step) -> tuple[torch.Tensor, _Nucleus | None]:
        """Tokens (n,) for a step with some rows not greedy (the greedy ones take the argmax), -1 for a top-p row not
        accepted within TOP_P_ROUNDS, and what finishing those rows needs."""
        n = logits.shape[0]
        _, _, top_p, k, is_greedy = step.settings
        u = self._uniforms(step)  # (n, UNIFORMS)
        top = logits.amax(dim=-1)  # what e is relative to
        kth = None  # the k-th largest logit of each top-k row
        if step.top_k_rows:
            sub = logits if step.top_k_idx is None else logits[step.top_k_idx]
            ks = k if step.top_k_idx is None else k[step.top_k_idx]
            kth = sub.topk(step.max_top_k, dim=-1).values.gather(1, ks.long()[:, None] - 1).squeeze(1)

        # e: each row's distribution at its temperature, truncated, unnormalised, its largest entry 1: (n, vocab), in
        # a buffer whose columns past the vocabulary stay 0 (the search's blocks cover them).
        work = self._buffer("e", n)
        sums = self._tempered(logits, top, step, kth, work)  # (n, blocks)
        tokens = self._search(work, sums, u[:, 0])

        nucleus = None
        if step.top_p_rows:
            idx, m = step.top_p_idx, len(step.top_p_rows)
            # mass: what each row's nucleus must reach
            if idx is None:
                up, drawn, mass = u, tokens, top_p * sums.sum(dim=-1)
            else:
                up, drawn, mass = u[idx], tokens[idx], top_p[idx] * sums[idx].sum(dim=-1)
            # The top-p rows of `work`: read in place by the GPU's kernels (`rows`), copied together on the CPU.
            src, rows = work, None
            if self._kernels is not None:
                rows = self._arange(n) if idx is None else idx
            elif idx is not None:
                src = torch.index_select(work, 0, idx, out=self._buffer("top_p", m))
            for r in range(TOP_P_ROUNDS):
                # The tokens more likely than the draw: their mass decides, and a rejected row draws again from them.
                pivot = src.gather(1, drawn[:, None]).squeeze(1) if rows is None else src[rows, drawn]
                above_sums = self._sums_above(src, rows, pivot)
                outside = above_sums.sum(dim=-1) >= mass
                if r == TOP_P_ROUNDS - 1:
                    break
                drawn = torch.where(outside, self._search(src, above_sums, up[:, r + 1], rows, pivot), drawn)
            drawn = torch.where(outside, -1, drawn)
            tokens = drawn if idx is None else tokens.index_put((idx,), drawn)
            nucleus = _Nucleus(step.top_p_rows, src, rows, mass, up[:, TOP_P_ROUNDS])
        if any(step.greedy):
            tokens = torch.where(is_greedy > 0, logits.argmax(dim=-1), tokens)
        return tokens, nucleus

    def _tempered(
        self, logits: torch.Tensor, top: torch.Tensor, step: _Step, kth: torch.Tensor | None, work: torch.Tensor
    ) -> torch.Tensor:
        """Fill work[:, :vocab] with e = exp((logits - top) / temperature), 0 below a row's min-p floor and, in the
        top-k rows (`kth` their k-th largest logits), below that logit; return its block sums (n, blocks)."""
        temperature, min_p = step.settings[0], step.settings[1]
        idx = step.top_k_idx
        if self._kernels is not None:
            floor = torch.full_like(top, -torch.inf)
            if kth is not None:
                floor = kth if idx is None else floor.index_put((idx,), kth)
            return self._kernels.tempered(logits, top, 1.0 / temperature, min_p, floor, work, self.block)
        e = work[:, : logits.shape[1]]
        torch.sub(logits, top[:, None], out=e)
        if step.scaled:
            e.div_(temperature[:, None])
        e.exp_()
        if step.min_p:
            e.masked_fill_(e < min_p[:, None], 0.0)
        if kth is not None and idx is None:
            e.masked_fill_(logits < kth[:, None], 0.0)
        elif kth is not None:  # those rows only
            e[idx] = e[idx].masked_fill_(logits[idx] < kth[:, None], 0.0)
        return self._block_sums(work)

    def _sums_above(self, src: torch.Tensor, rows: torch.Tensor | None, pivot: torch.Tensor) -> torch.Tensor:
        """The block sums of the entries of src's rows (`rows` of it, or all) greater than each row's pivot."""
        if self._kernels is not None:
            return self._kernels.sums_above(src, rows, pivot, self.block)
        m = src.shape[0]
        mask = self._buffer("mask", m, torch.bool)
        above = self._buffer("above", m)
        torch.gt(src, pivot[:, None], out=mask)
        torch.where(mask, src, self._zero, out=above)
        return self._block_sums(above)

    def _uniforms(self, step: _Step) -> torch.Tensor:
        """(n, UNIFORMS) uniforms in [0, 1): the device's generator for most rows; a seeded request's own, on the
        host, for its row (the same count every step, so that its draws do not depend on its batch mates), uploaded
        together in one asynchronous copy: no generator objects and no launch per row on the device."""
        u = torch.rand((len(step.requests), UNIFORMS), device=self.device)
        if step.seeded:
            draws = torch.empty(len(step.seeded), UNIFORMS)
            for j, i in enumerate(step.seeded):
                request = step.requests[i]
                if request.generator is None:
                    request.generator = torch.Generator().manual_seed(request.params.seed)
                torch.rand(UNIFORMS, generator=request.generator, out=draws[j])
            (draws,) = to_device([draws], self.device)
            u = draws if step.seeded_idx is None else u.index_put((step.seeded_idx,), draws)
        return u

    def inverse_cdf(self, weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """weights (n, vocab) >= 0, each row with some positive entry, and u (n,) in [0, 1) -> per row the index i
        with cumsum[i - 1] <= u * total < cumsum[i]."""
        if weights.shape[1] != self.width:
            weights = F.pad(weights, (0, self.width - weights.shape[1]))
        return self._search(weights, self._block_sums(weights), u)

    def _block_sums(self, weights: torch.Tensor) -> torch.Tensor:
        """(n, width) -> (n, blocks): the sum of each block of `block` entries."""
        return weights.view(weights.shape[0], -1, self.block).sum(dim=-1)

    def _search(
        self,
        weights: torch.Tensor,
        sums: torch.Tensor,
        u: torch.Tensor,
        rows: torch.Tensor | None = None,
        pivot: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The inverse CDF on two levels: the block whose cumulative sum passes u * total (sums (n, blocks) are the
        block sums of weights (n, width), or of its `rows`), then the entry inside it, from a cumulative sum of that
        block only. With `pivot` (n,), only the entries above it count (sums must be theirs)."""
        n, bs = sums.shape[0], self.block
        cum = sums.cumsum(dim=-1)
        target = u * cum[:, -1]  # (n,)
        # The first block whose cumulative sum passes the target; rounding (u * total == total) may point past the
        # last block that holds any weight, which the clamp turns back. (A row of no weight at all, a top-p row whose
        # draw was the most likely token, gets index 0, and its caller drops it.)
        b = torch.searchsorted(cum, target[:, None], right=True).squeeze(1)
        b = torch.minimum(b, self._last_positive(sums)).clamp_(min=0)
        before = F.pad(cum, (1, 0)).gather(1, b[:, None]).squeeze(1)  # the mass of the blocks before b
        blocks = weights.view(weights.shape[0], -1, bs)
        inner = blocks.gather(1, b[:, None, None].expand(n, 1, bs)).squeeze(1) if rows is None else blocks[rows, b]
        if pivot is not None:
            inner = torch.where(inner > pivot[:, None], inner, self._zero)
        j = torch.searchsorted(inner.cumsum(dim=-1), (target - before)[:, None], right=True).squeeze(1)
        j = torch.minimum(j, self._last_positive(inner)).clamp_(min=0)
        return b * bs + j

    def _last_positive(self, x: torch.Tensor) -> torch.Tensor:
        """(n, w) -> per row the index of its last positive entry (-1 where none)."""
        return torch.where(x > 0, self._arange(x.shape[1]), -1).amax(dim=-1)

    def _arange(self, n: int) -> torch.Tensor:
        arange = self._aranges.get(n)
        if arange is None:
            arange = self._aranges[n] = torch.arange(n, device=self.device)
        return arange

    def _buffer(self, name: str, rows: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A (rows, width) scratch tensor kept from call to call, zero past the vocabulary: on the CPU a fresh tensor
        of this size costs more in page faults than the work done in it; on a GPU it is the memory the caching
        allocator would hold anyway."""
        buffer = self._buffers.get(name)
        if buffer is None or buffer.shape[0] < rows:
            buffer = self._buffers[name] = torch.zeros((rows, self.width), dtype=dtype, device=self.device)
        return buffer[:rows]


class _Step:
    """A step's rows as the sampler needs them: which rows do what (host lists), and the per-row settings and row
    indices on the device, uploaded together (a row index tensor is None where the rows are all rows)."""

    def __init__(self, requests: Sequence[Request], vocab: int, device: torch.device) -> None:
        self.requests = requests
        self.params = params = [r.params for r in requests]
        n = len(params)
        self.greedy = greedy = [p.greedy for p in params]
        self.asked = [i for i, p in enumerate(params) if p.logprobs is not None]
        self.max_logprobs = max((params[i].logprobs for i in self.asked), default=0)
        top_k = [p.top_k if not g and 0 < p.top_k < vocab else 0 for p, g in zip(params, greedy, strict=True)]
        self.top_k_rows = [i for i, k in enumerate(top_k) if k]
        self.max_top_k = max(top_k)
        self.top_p_rows = [i for i, (p, g) in enumerate(zip(params, greedy, strict=True)) if not g and p.top_p < 1.0]
        self.min_p = any(p.min_p > 0 for p, g in zip(params, greedy, strict=True) if not g)
        self.scaled = any(p.temperature != 1.0 for p, g in zip(params, greedy, strict=True) if not g)
        self.seeded = [i for i, (p, g) in enumerate(zip(params, greedy, strict=True)) if not g and p.seed is not None]
        groups = [self.asked, self.top_k_rows, self.top_p_rows, self.seeded]
        partial = [rows for rows in groups if rows and len(rows) < n]
        uploads = [torch.tensor(rows, dtype=torch.long) for rows in partial]
        self.settings = None
        if not all(greedy):
            self.settings = torch.tensor(
                [
                    [1.0 if g else p.temperature for p, g in zip(params, greedy, strict=True)],
                    [0.0 if g else p.min_p for p, g in zip(params, greedy, strict=True)],
                    [1.0 if g else p.top_p for p, g in zip(params, greedy, strict=True)],
                    [float(k) for k in top_k],
                    [float(g) for g in greedy],
                ],
                dtype=torch.float32,
            )
            (self.settings,) = to_device([self.settings], device)
        moved = iter(to_device(uploads, device))
        self.asked_idx, self.top_k_idx, self.top_p_idx, self.seeded_idx = (
            next(moved) if rows and len(rows) < n else None for rows in groups
        )


class _Nucleus:
    """The top-p rows of a step, for finishing the ones that TOP_P_ROUNDS did not accept."""

    def __init__(
        self,
        rows: list[int],
        src: torch.Tensor,
        src_rows: torch.Tensor | None,
        mass: torch.Tensor,
        u: torch.Tensor,
    ) -> None:
        # the step's top-p rows; their e (rows `src_rows` of src, else all of it); what their nucleus must reach, (m,);
        # their last uniforms, (m,)
        self.rows, self.src, self.src_rows, self.mass, self.u = rows, src, src_rows, mass, u

    def finish(self, sampler: Sampler, pending: list[int]) -> list[int]:
        """Tokens for the step's rows `pending` (all top-p rows): the nucleus found exactly by sorting each of those
        rows, then a draw from it with the row's last uniform."""
        at = {row: j for j, row in enumerate(self.rows)}
        local = torch.tensor([at[i] for i in pending], device=self.src.device)
        picked = local if self.src_rows is None else self.src_rows[local]
        weights, mass = self.src[picked, : sampler.vocab_size], self.mass[local]
        ordered = weights.sort(dim=-1, descending=True).values
        # A token is in the nucleus when the mass strictly before its tie group is below `mass`; in sorted order that
        # makes the nucleus every token at least as likely as the last one whose exclusive prefix is below it.
        kept = ((ordered.cumsum(dim=-1) - ordered) < mass[:, None]).sum(dim=-1)
        smallest = ordered.gather(1, (kept - 1)[:, None])
        nucleus = torch.where(weights >= smallest, weights, 0.0)
        return sampler.inverse_cdf(nucleus, self.u[local]).tolist()
