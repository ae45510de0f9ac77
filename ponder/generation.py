"""Generation, runtime-neutral: the sampling parameters, sampling on the last position's logits, stop strings, and
the decode loop over a KV cache with what happens past the model's context.

Torch-free (numpy only), so that PyTorch (``ponder.decode``) and ONNX Runtime (``ponder.serve.engine``) generate
through the very same loop: a model step is any function ``step(new_ids, past) -> Step``.

Past the context: the cache holds at most ``max_seq_len`` positions. When the next token would not fit, the last
:func:`kept_tokens` tokens (half the context) are prefilled again from an empty cache, at positions 0, 1, ...,
and decoding goes on from there. Every logit is therefore exactly the full forward of the tokens the cache holds
(``Token.context`` says how many), never a silent wrong answer; the cost is one prefill every half context.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ponder.errors import ConfigError

DEFAULT_MAX_TOKENS = 16
MAX_TOKENS_CAP = 1024  # the most tokens one request may ask for (a server may set a lower cap)
SAMPLING_KEYS = ("temperature", "top_k", "top_p", "seed", "stop", "max_tokens")


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. ``temperature`` 0 (the default) is greedy: the argmax, exactly."""

    temperature: float = 0.0  # 0: greedy; otherwise softmax(logits / temperature)
    top_k: int = 0  # keep the k most likely tokens (0: all); top_k = 1 is greedy
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p (1.0: all)
    seed: int | None = None  # the same seed gives the same text (None: fresh randomness)
    stop: tuple[str, ...] = ()  # generation ends before the first of these strings (which is not output)
    max_tokens: int = DEFAULT_MAX_TOKENS

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def check(self, cap: int = MAX_TOKENS_CAP) -> SamplingParams:
        """``self``, or a ConfigError naming the first bad field and what is allowed."""
        if not (isinstance(self.max_tokens, int) and 1 <= self.max_tokens <= cap):
            raise ConfigError(f"max_tokens = {self.max_tokens!r} is outside [1, {cap}]")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ConfigError(f"temperature = {self.temperature!r} must be a number >= 0 (0: greedy)")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise ConfigError(f"top_p = {self.top_p!r} is outside (0, 1]")
        if self.top_k < 0:
            raise ConfigError(f"top_k = {self.top_k!r} must be >= 0 (0: every token)")
        if self.seed is not None and self.seed < 0:
            raise ConfigError(f"seed = {self.seed!r} must be >= 0")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ConfigError(f"stop = {list(self.stop)!r} must be non-empty strings")
        return self

    def to_json(self) -> str:
        """The JSON object ``from_json`` reads (what a client sends as ``sampling_parameters``)."""
        data = {k: getattr(self, k) for k in SAMPLING_KEYS}
        data["stop"] = list(self.stop)
        return json.dumps({k: v for k, v in data.items() if v is not None})

    @classmethod
    def from_json(cls, data: Any, cap: int = MAX_TOKENS_CAP) -> SamplingParams:
        """Parameters from a JSON object (text, or the decoded dict). Numbers may come as strings, as Triton's
        LLM clients send them; unknown keys are refused by name."""
        if isinstance(data, (bytes, str)):
            try:
                data = json.loads(data)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ConfigError(f"sampling_parameters is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"sampling_parameters must be a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - set(SAMPLING_KEYS))
        if unknown:
            raise ConfigError(f"sampling_parameters: unknown key(s) {', '.join(map(repr, unknown))}; known: "
                              f"{', '.join(SAMPLING_KEYS)}")
        values: dict[str, Any] = {}
        for key in ("temperature", "top_p"):
            if key in data:
                values[key] = _number(data[key], key, float)
        for key in ("top_k", "seed", "max_tokens"):
            if key in data and data[key] is not None:
                values[key] = _number(data[key], key, int)
        if "stop" in data and data["stop"] is not None:
            stop = data["stop"]
            values["stop"] = (stop,) if isinstance(stop, str) else tuple(stop) if isinstance(stop, list) else stop
            if not isinstance(values["stop"], tuple):
                raise ConfigError(f"stop = {stop!r} must be a string or a list of strings")
        return cls(**values).check(cap)


def _number(value: Any, key: str, kind: type) -> Any:
    if isinstance(value, bool):
        raise ConfigError(f"{key} = {value!r} is not a number")
    try:
        number = float(value) if kind is float else int(str(value), 10) if isinstance(value, str) else value
    except (TypeError, ValueError, OverflowError):  # null, a list, an object, text that is no number
        raise ConfigError(f"{key} = {value!r} is not a{'n integer' if kind is int else ' number'}") from None
    if kind is int and (isinstance(number, float) or not isinstance(number, int)):
        if isinstance(number, float) and number.is_integer():
            return int(number)
        raise ConfigError(f"{key} = {value!r} is not an integer")
    return number


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """The next token from one position's ``logits`` ([vocab]): the argmax when greedy, else a draw from the
    temperature-scaled distribution cut to ``top_k`` and then to ``top_p``."""
    if params.greedy:
        return int(np.argmax(logits))
    x = np.asarray(logits, dtype=np.float64)
    with np.errstate(over="ignore"):  # a tiny temperature sends the others to -inf: probability 0, as it should
        z = (x - x.max()) / params.temperature  # <= 0, so exp never overflows
    order = np.argsort(-z, kind="stable")  # most likely first; ties by token id
    if 0 < params.top_k < z.size:
        order = order[: params.top_k]
    probs = np.exp(z[order])
    probs /= probs.sum()
    if params.top_p < 1.0:  # the smallest head whose mass reaches top_p (at least one token)
        keep = int(np.searchsorted(np.cumsum(probs), params.top_p)) + 1
        order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
    return int(order[min(int(np.searchsorted(np.cumsum(probs), rng.random(), side="right")), len(order) - 1)])


class StopText:
    """The bytes of a generation as they may be sent: held back while they could still become a stop string,
    cut before the first stop string once one appears."""

    def __init__(self, stop: Sequence[str]) -> None:
        self.stops = [s.encode() for s in stop]
        self.text = b""
        self.sent = 0
        self.stopped = False

    def add(self, full: bytes) -> bytes:
        """``full``: every byte generated so far. Returns what may be sent now (beyond what was sent)."""
        self.text = full
        cut = min((i for i in (full.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            end = cut
        else:
            hold = max((k for s in self.stops for k in range(min(len(s) - 1, len(full)), 0, -1)
                        if full.endswith(s[:k])), default=0)
            end = len(full) - hold
        out = full[self.sent: max(end, self.sent)]
        self.sent = max(end, self.sent)
        return out

    def flush(self) -> bytes:
        """At the end without a stop: whatever was held back."""
        out = b"" if self.stopped else self.text[self.sent:]
        self.sent = len(self.text)
        return out


@dataclass
class Step:
    """What one model step (a prefill or a decode step) returns to the loop."""

    logits: np.ndarray  # [vocab]: the last new position's logits
    past: Any  # the cache after this step (opaque to the loop)
    depth: int  # the last new token's depth
    layers_executed: int  # layers that ran a full step (the others only filled keys and values)
    compute_s: float


@dataclass
class Token:
    """One generated token and what it cost."""

    index: int  # 0 for the first generated token
    token_id: int
    text: bytes  # what may be sent now (stop strings held back, cut at a stop)
    depth: int  # layers this token ran
    layers_executed: int
    compute_s: float
    prefill: bool  # this step prefilled (the first token, or a re-prefill past the context)
    context: int  # tokens the cache held for this step (the logits are the full forward of these)
    final: bool = False
    finish_reason: str | None = None  # "length" or "stop" on the final token
    extra: dict[str, Any] = field(default_factory=dict)


def text_bytes(tokenizer: Any) -> Callable[[list[int]], bytes]:
    """``text_of`` for :func:`generate`: the bytes a tokenizer decodes generated ids to (a byte-level tokenizer's
    ids are the bytes themselves, so a character split over tokens stays whole)."""
    if tokenizer.to_json().get("kind") == "byte":
        return lambda ids: bytes(ids)
    return lambda ids: tokenizer.decode(ids).encode()


def kept_tokens(max_seq_len: int) -> int:
    """How many of the last tokens are prefilled again when the context is full: half of it."""
    return max(1, max_seq_len // 2)


def check_prompt(prompt: Sequence[int], max_seq_len: int, vocab_size: int) -> None:
    """A ConfigError unless ``prompt`` is 1..max_seq_len token ids of the vocabulary."""
    if not prompt:
        raise ConfigError("the prompt encodes to no tokens; give some text")
    if len(prompt) > max_seq_len:
        raise ConfigError(f"the prompt is {len(prompt)} tokens long; the model takes at most {max_seq_len}")
    low, high = min(prompt), max(prompt)
    if low < 0 or high >= vocab_size:
        raise ConfigError(f"prompt token ids must be in [0, {vocab_size}), got values in [{low}, {high}]")


class Generation:
    """The decode loop as a state machine, so that one loop serves a caller that runs each step itself
    (:func:`generate`) and a server that runs the steps of many generations in one batch.

    ``feed`` and ``past`` say what the model must run next (``past`` None: an empty cache); ``advance`` takes that
    step's result and returns the token it gives; ``done`` once the final token was returned."""

    def __init__(self, prompt: Sequence[int], params: SamplingParams, max_seq_len: int,
                 text_of: Callable[[list[int]], bytes]) -> None:
        self.params, self.max_seq_len, self.text_of = params, max_seq_len, text_of
        self.rng = np.random.default_rng(params.seed)
        self.context = list(prompt)
        self.feed: list[int] = list(prompt)
        self.past: Any = None
        self.held = 0  # positions in the cache
        self.generated: list[int] = []
        self.stop = StopText(params.stop)
        self.done = False

    def advance(self, out: Step) -> Token:
        """The token that ``out`` (the model's result for ``feed`` after ``past``) gives; readies the next step."""
        assert not self.done, "the generation is over"
        index = len(self.generated)
        prefill = self.past is None
        self.held += len(self.feed)
        token = sample(out.logits, self.params, self.rng)
        self.generated.append(token)
        self.context.append(token)
        text = self.stop.add(self.text_of(self.generated))
        last = self.stop.stopped or index == self.params.max_tokens - 1
        if last and not self.stop.stopped:
            text += self.stop.flush()
        result = Token(index, token, text, out.depth, out.layers_executed, out.compute_s, prefill, self.held,
                       final=last, finish_reason=("stop" if self.stop.stopped else "length") if last else None)
        self.done = last
        if self.held + 1 <= self.max_seq_len:
            self.feed, self.past = [token], out.past
        else:  # the context is full: prefill its last tokens again
            self.feed, self.past, self.held = self.context[-kept_tokens(self.max_seq_len):], None, 0
        return result


def generate(step: Callable[[list[int], Any], Step], prompt: Sequence[int], params: SamplingParams,
             max_seq_len: int, text_of: Callable[[list[int]], bytes]) -> Iterator[Token]:
    """Generate up to ``params.max_tokens`` tokens after ``prompt`` through ``step`` (``step(new_ids, past)``;
    past None: an empty cache). ``text_of(ids)`` is the bytes of the generated ids. The last token yielded has
    ``final`` set and its ``finish_reason``."""
    state = Generation(prompt, params, max_seq_len, text_of)
    while not state.done:
        yield state.advance(step(state.feed, state.past))


# -- the command line (ponder run, ponder client generate) --------------------------------------------------------

def add_sampling_arguments(parser: Any, *aliases: str, default_tokens: int = 32) -> None:
    """The sampling flags; ``aliases`` are older names of ``--max-tokens``."""
    parser.add_argument("--max-tokens", *aliases, dest="max_tokens", type=int, default=default_tokens, metavar="N",
                        help=f"tokens to generate, at most {MAX_TOKENS_CAP} (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="sampling temperature; 0 (the default) is greedy: the most likely token")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="sample among the most likely tokens whose probability reaches p (default: 1.0, all)")
    parser.add_argument("--seed", type=int, help="the same seed gives the same text")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="stop before this text (repeat for several)")


def sampling_from_args(args: Any) -> SamplingParams:
    """The flags of :func:`add_sampling_arguments` as checked SamplingParams (a ConfigError names a bad one)."""
    try:
        return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                              stop=tuple(args.stop), max_tokens=args.max_tokens).check()
    except ConfigError as exc:
        raise ConfigError(f"--{str(exc).replace('_', '-')}") from None
