"""The generation loop: a `Decoder` holds static buffers (latent cache, the sequences, end flags,
sampling noise) and runs a decode step that reads nothing back to the host, eager or compiled.

The step takes the token at the cache's slot, runs `decode`, samples on the device (greedy, or
temperature and top-p as an exponential race: argmax of probs / Exp(1) noise, which draws from probs),
masks finished rows with eos and writes the next token into `tokens`. It compiles with
fullgraph=True; on CUDA under CUDA graphs (inductor's cudagraph trees, with coordinate-descent tuning so
one-row matmuls become fused reductions). The host loop only queues steps: the noise is drawn (with
the caller's generator) before each, and whether every row has ended, or met NaN/Inf logits (a
NonFiniteError: argmax would emit token 0), is read after the prompt and every `eos_check_every`
tokens. One compiled step serves every Decoder of the process (its guards check
shapes and the sampling settings); a new Decoder's buffers are recorded into a new CUDA graph.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from moonlight.errors import ConfigError, NonFiniteError
from moonlight.generation.cache import LatentCache, decode, prefill
from moonlight.model import Moonlight


def sample_from(logits: torch.Tensor, temperature: float, top_p: float, noise: torch.Tensor) -> torch.Tensor:
    """logits [B, V] -> token ids [B] on the device: argmax when temperature is 0, else a draw from the
    smallest set of most likely tokens whose probability reaches top_p (nucleus sampling), given
    noise [B, V] ~ Exp(1)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = (logits.float() / temperature).softmax(-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)  # the first token always stays
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return (probs / noise).argmax(-1)


def draw_noise_(noise: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Fill noise in place with Exp(1) draws (never 0: a zero-probability token would get 0/0)."""
    return noise.exponential_(generator=generator).clamp_(min=torch.finfo(noise.dtype).tiny)


def sample_next(
    logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """`sample_from` with fresh noise from generator."""
    noise = None
    if temperature > 0:
        noise = draw_noise_(torch.empty(logits.shape, dtype=torch.float32, device=logits.device), generator)
    return sample_from(logits, temperature, top_p, noise)


def pad_left(prompts: Sequence[Sequence[int]], pad_id: int = 0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths -> left-padded input_ids [B, S] and attention_mask [B, S]."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
        mask[row, width - len(p) :] = 1
    return ids, mask


def decode_step(decoder: Decoder) -> None:
    """One decode step: the token at the cache's slot in, the next token written at the slot after it."""
    cache = decoder.cache
    token = decoder.tokens.index_select(1, cache.slot).squeeze(1)
    logits = decode(decoder.model, token, cache)  # advances cache.slot
    decoder.tokens.index_copy_(1, cache.slot, decoder.finish(logits)[:, None])


_COMPILED: dict = {}


def compiled_decode_step(backend: str, cuda: bool):
    """`decode_step` compiled with fullgraph=True, once per process and kind; on CUDA with inductor,
    under CUDA graphs."""
    key = (backend, cuda)
    if key not in _COMPILED:
        cuda_graphs = cuda and backend == "inductor"
        options = {"triton.cudagraphs": True, "coordinate_descent_tuning": True} if cuda_graphs else None
        _COMPILED[key] = torch.compile(decode_step, fullgraph=True, dynamic=False, backend=backend, options=options)
    return _COMPILED[key]


class Decoder:
    """Generation state for `batch_size` rows of up to `max_len` tokens (prompt + new) on the model's
    device and dtype; reusable for any prompt that fits. compile: the decode step compiled (default:
    on CUDA), with `backend`."""

    def __init__(
        self, model: Moonlight, batch_size: int, max_len: int, compile: bool | None = None, backend: str = "inductor"
    ):
        if any(hasattr(m, "lora_a") for m in model.modules()):
            raise ConfigError(
                "generation reads kv_b_proj's weight directly: merge LoRA adapters first "
                "(moonlight.model.lora.merge_lora)"
            )
        p = next(model.parameters())
        self.model, self.batch_size, self.max_len = model, batch_size, max_len
        self.cache = LatentCache(model.args, batch_size, max_len, p.dtype, p.device)
        self.tokens = torch.zeros(batch_size, max_len, dtype=torch.long, device=p.device)  # prompt, then new
        self.done = torch.zeros(batch_size, dtype=torch.bool, device=p.device)
        self.nonfinite = torch.zeros(batch_size, dtype=torch.bool, device=p.device)  # a row met NaN/Inf logits
        self.noise = torch.ones(batch_size, model.args.vocab_size, dtype=torch.float32, device=p.device)
        for t in (self.tokens, self.done, self.nonfinite, self.noise):
            torch._dynamo.mark_static_address(t)
        self.temperature, self.top_p, self.eos_token_id = 0.0, 1.0, None
        self.compiled = p.is_cuda if compile is None else compile
        self._step = compiled_decode_step(backend, p.is_cuda) if self.compiled else decode_step

    def finish(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token of every row from its logits; rows that ended get eos."""
        self.nonfinite |= ~torch.isfinite(logits).all(-1)
        token = sample_from(logits, self.temperature, self.top_p, self.noise)
        if self.eos_token_id is not None:
            token = token.masked_fill(self.done, self.eos_token_id)
            self.done |= token == self.eos_token_id
        return token

    @torch.no_grad()
    def step(self, generator: torch.Generator | None = None) -> None:
        """One decode step, queued (fresh noise first when sampling)."""
        if self.temperature > 0:
            draw_noise_(self.noise, generator)
        self._step(self)

    @torch.no_grad()
    def stream(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        eos_token_id: int | None = None,
        attention_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        eos_check_every: int = 16,
    ) -> Iterator[torch.Tensor]:
        """Yield the next token of every row ([B], a view of `tokens`, final once yielded) each step, no
        host read between; rows that ended repeat eos. Stops after max_new_tokens, or once every row
        has produced eos (read every eos_check_every tokens)."""
        bsz, seqlen = input_ids.shape
        if bsz != self.batch_size or seqlen + max_new_tokens > self.max_len:
            raise ConfigError(
                f"this Decoder holds {self.batch_size} rows of {self.max_len} tokens: got {bsz} rows "
                f"of {seqlen} + {max_new_tokens}"
            )
        self.temperature, self.top_p, self.eos_token_id = float(temperature), float(top_p), eos_token_id
        self.cache.reset()
        self.done.zero_()
        self.nonfinite.zero_()
        self.tokens[:, :seqlen] = input_ids
        logits = prefill(self.model, input_ids, self.cache, attention_mask)
        if self.temperature > 0:
            draw_noise_(self.noise, generator)
        self.tokens[:, seqlen] = self.finish(logits)
        self._check_finite(0)
        yield self.tokens[:, seqlen]
        for n in range(1, max_new_tokens):
            if n % eos_check_every == 0:  # one host read for both flags
                nonfinite, done = torch.stack((self.nonfinite.any(), self.done.all())).tolist()
                self._raise_if(nonfinite, n)
                if eos_token_id is not None and done:
                    return
            self.step(generator)
            yield self.tokens[:, seqlen + n]
        self._check_finite(max_new_tokens)

    def _check_finite(self, generated: int) -> None:
        """One host read of the NaN/Inf flags."""
        self._raise_if(bool(self.nonfinite.any()), generated)

    @staticmethod
    def _raise_if(nonfinite: bool, generated: int) -> None:
        if nonfinite:
            raise NonFiniteError(
                f"the model's logits are NaN/Inf (within the first {generated + 1} generated tokens): "
                "its weights hold NaN/Inf, or --dtype float16 overflows (use bfloat16 or float32)"
            )


def check_request(max_new_tokens: int, temperature: float, top_p: float, attention_mask: torch.Tensor | None) -> None:
    """A generation request's arguments, checked before any work (ConfigError naming the problem)."""
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ConfigError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature} and {top_p}")
    if attention_mask is not None and not attention_mask[:, -1].all():
        raise ConfigError("prompts must be left-padded: attention_mask must be 1 in the last column")
