"""onnxruntime side: a compiled folder as a model you can score text with and generate from.

    model = CompiledModel("out")                      # the folder `awq-graph compile` wrote
    for piece in model.stream("The capital of France is", max_new_tokens=32):
        print(piece, end="", flush=True)
    result = model.generate("Once upon a time", max_new_tokens=64, temperature=0.7)
    ppl, tokens = model.score(open("test.txt").read(), seqlen=2048)

A KV-cache folder decodes one token per step against a cache that lives in onnxruntime
(bound in place with IOBinding: the past and present of each layer share one buffer, so a step
copies nothing); the generic KV-cache decoder (architectures outside the fused families) returns
each layer's present, one step longer than its past, which the next step takes as its past. A
logits-only folder (architectures without the fused decoder) re-runs the
whole prefix per token.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from .core.cache_names import CONTEXT_KEY, KV_CACHE_KEY, PAST, present_of
from .core.errors import InputError, first_line
from .core.progress import no_progress



def session(model_path: str | Path, threads: int | None = None, provider: str = "cpu", spinning: bool = False,
            prepack: bool = True):
    """An onnxruntime session. ``spinning``: worker threads busy-wait between ops (decode ~25%
    faster on 2 cores; off by default, since spinning threads starve whatever else runs).
    ``prepack``: kernels keep their own re-arranged copy of the weights (faster; False keeps only
    the memory-mapped data file's, e.g. for a one-off check of a large model)."""
    import onnxruntime as ort

    model_path = Path(model_path)
    if model_path.is_dir():
        model_path = model_path / "model.onnx"
    if not model_path.is_file():
        raise InputError(f"{model_path} does not exist: not a compiled awq-graph folder")
    if provider == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise InputError("`provider=cuda`: this onnxruntime has no CUDA provider (pip install onnxruntime-gpu)")
    opts = ort.SessionOptions()
    # on the CPU errors only: onnxruntime warns at every load that logits_to_keep has a default (an
    # initializer of its name, for runtimes that do not feed it); with CUDA its placement warnings matter
    opts.log_severity_level = 3 if provider == "cpu" else 2
    if threads:
        opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if not prepack:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if provider == "cuda" else ["CPUExecutionProvider"]
    data = model_path.with_name(model_path.name + ".data")
    try:
        return ort.InferenceSession(str(model_path), opts, providers=providers)
    except Exception as exc:  # onnxruntime's own exception types: a damaged or partial folder
        text = str(exc)
        if "external" in text.lower():
            why = (f"its weights file {data.name} is missing" if not data.exists() else
                   f"its weights file {data.name} ({data.stat().st_size} bytes) is shorter than model.onnx says")
        elif "Protobuf parsing failed" in text or "INVALID_PROTOBUF" in text:
            why = f"{model_path.name} is not a whole ONNX model (cut short or damaged)"
        else:
            why = f"onnxruntime could not load it ({first_line(exc, 300)})"
        raise InputError(f"{model_path.parent}: {why}: copy the folder again or compile anew") from None


def _check_json(path: Path) -> None:
    """A compiled folder's JSON file, when present, must be JSON (transformers' error about it is
    four chained tracebacks)."""
    import json

    if not path.exists():
        return
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not valid JSON ({first_line(exc, 120)}): the compiled folder is damaged; copy "
                         "it again or compile anew") from None


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    prefill_s: float
    decode_s: float
    steps: list[float] = field(default_factory=list)  # seconds per decode step

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        return len(self.steps) / self.decode_s if self.decode_s else float("nan")




class CompiledModel:
    """A compiled folder (or one .onnx file) in onnxruntime."""

    def __init__(self, path: str | Path, threads: int | None = None, provider: str = "cpu", tokenizer=None,
                 spinning: bool = False, prepack: bool = True):
        import onnxruntime as ort

        self.path = Path(path)
        self.session = session(self.path, threads, provider, spinning, prepack)
        self.device = "cuda" if provider == "cuda" else "cpu"
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.input_names = list(inputs)
        self.past_names = [n for n in inputs if n.startswith(PAST)]
        self.present_names = [present_of(n) for n in self.past_names]
        self.has_kv_cache = bool(self.past_names)
        self.has_logits_to_keep = "logits_to_keep" in inputs
        metadata = self.session.get_modelmeta().custom_metadata_map
        self.growing_cache = metadata.get(KV_CACHE_KEY) == "concat"
        self.past_shapes = [inputs[n].shape for n in self.past_names]
        self.past_dtypes = [np.float16 if "float16" in inputs[n].type else np.float32 for n in self.past_names]
        # a generic decoder with linear-attention states takes one token per call
        self.one_token = self.growing_cache and inputs["input_ids"].shape[1] == 1
        context = metadata.get(CONTEXT_KEY)
        self.max_positions = int(context) if context else None  # None: a folder written before it was recorded
        # how this kind of graph runs: the fused decoder, the generic one, or logits only
        self.graph = (_GenericGraph(self) if self.growing_cache else _FusedGraph(self, inputs) if self.has_kv_cache
                      else _LogitsOnlyGraph(self, inputs))
        self._ort = ort
        self._tokenizer = tokenizer

    @property
    def fixed_len(self) -> int | None:
        """The tokens a logits-only graph of an export that fixed the length takes (None: any)."""
        return self.graph.fixed_len

    # -- tokens ---------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            folder = self.path if self.path.is_dir() else self.path.parent
            if not (folder / "tokenizer_config.json").exists() and not (folder / "tokenizer.json").exists():
                raise InputError(f"{folder} has no tokenizer (compile from a checkpoint with one, or pass tokenizer=)")
            from transformers import AutoTokenizer

            for name in ("config.json", "tokenizer_config.json", "tokenizer.json"):
                _check_json(folder / name)
            try:
                self._tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            except Exception as exc:  # a missing tokenizer.json shows as a request for sentencepiece
                why = "tokenizer.json is missing" if not (folder / "tokenizer.json").exists() else first_line(exc, 200)
                raise InputError(f"{folder}: its tokenizer cannot be loaded ({why}): copy the folder again or "
                                 "compile anew") from None
        return self._tokenizer

    def encode(self, prompt: str) -> list[int]:
        ids = self.tokenizer(prompt).input_ids
        if not ids:
            raise InputError("the prompt is empty after tokenization")
        return list(ids)

    # -- forward passes -------------------------------------------------------------------
    def logits(self, ids) -> torch.Tensor:
        """Logits (B, S, V) float32 of whole sequences, nothing cached."""
        return self.graph.logits(self, np.asarray(ids, dtype=np.int64))

    def score(self, text: str, seqlen: int = 2048, max_windows: int | None = None) -> tuple[float, int]:
        """Perplexity of ``text`` over non-overlapping windows of ``seqlen`` tokens: (ppl, tokens scored)."""
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        return perplexity(self.logits, ids, seqlen, max_windows)

    def logits_with_cache(self, ids, prefill: int) -> np.ndarray:
        """Logits of ``ids`` (1, S): the first ``prefill`` tokens in one call, then one token per
        call against the cache. Equal to ``logits(ids)`` when the cache works."""
        ids = np.asarray(ids, dtype=np.int64)
        cache = self._new_cache(ids.shape[1])
        out = [cache.step(ids[:, :prefill])]
        out += [cache.step(ids[:, t:t + 1]) for t in range(prefill, ids.shape[1])]
        return np.concatenate(out, axis=1).astype(np.float32)

    def _new_cache(self, max_len: int, batch: int = 1) -> "_KVCache | _GrowingCache":
        return self.graph.cache(self, max_len, batch)

    def sample_rows(self, starts: np.ndarray, length: int, rng: np.random.Generator, top_k: int = 50,
                    temperature: float = 1.0) -> np.ndarray:
        """``starts`` (batch, k) continued to ``length`` tokens, every row advancing one token per
        step against one KV cache, sampled among the ``top_k`` likeliest at ``temperature``."""
        batch = starts.shape[0]
        cache = self._new_cache(length, batch)
        rows = np.empty((batch, length), np.int64)
        rows[:, :starts.shape[1]] = starts
        logits = cache.step(starts, last_only=True)[:, -1]
        for t in range(starts.shape[1], length):
            rows[:, t] = _pick_rows(logits, temperature, top_k, rng)
            if t + 1 < length:
                logits = cache.step(rows[:, t:t + 1], last_only=True)[:, -1]
        return rows

    # -- generation -----------------------------------------------------------------------
    def stream(self, prompt: str | list[int], max_new_tokens: int = 64, temperature: float = 0.0,
               top_k: int = 0, seed: int = 0, stats: dict | None = None) -> Iterator[str]:
        """Yield the continuation's text piece by piece. ``temperature`` 0 is greedy. ``stats``,
        when given, receives the finished ``Generation`` under "generation"."""
        prompt_ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        rng = np.random.default_rng(seed)
        eos = self.tokenizer.eos_token_id
        new: list[int] = []
        shown = ""
        steps: list[float] = []
        t0 = time.perf_counter()
        logits, advance = self.decoding(prompt_ids, max_new_tokens)
        prefill_s = time.perf_counter() - t0
        for _ in range(max_new_tokens):
            token = _pick(np.asarray(logits, np.float32), temperature, top_k, rng)
            new.append(token)
            if eos is not None and token == eos:
                break
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            if not text.endswith("\ufffd") and len(text) > len(shown):  # whole characters only
                yield text[len(shown):]
                shown = text
            if len(new) == max_new_tokens:
                break
            t = time.perf_counter()
            logits = advance(token)
            steps.append(time.perf_counter() - t)
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        if len(text) > len(shown):
            yield text[len(shown):]
        if stats is not None:
            stats["generation"] = Generation(text, new, len(prompt_ids), prefill_s, sum(steps), steps)

    def generate(self, prompt: str | list[int], max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int = 0, seed: int = 0, on_text: Callable[[str], None] | None = None) -> Generation:
        stats: dict = {}
        for piece in self.stream(prompt, max_new_tokens, temperature, top_k, seed, stats):
            if on_text:
                on_text(piece)
        return stats["generation"]

    def greedy_ids(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation as token ids (no tokenizer needed, no end-of-text stop)."""
        out: list[int] = []
        logits, advance = self.decoding(prompt_ids, max_new_tokens)
        for k in range(max_new_tokens):
            out.append(int(np.argmax(logits)))
            if k + 1 < max_new_tokens:
                logits = advance(out[-1])
        return out

    def decoding(self, prompt_ids: list[int], max_new_tokens: int):
        """(the prompt's last logits, advance): advance(token) -> the next logits. Against the
        KV cache, or re-running the whole prefix on a logits-only model."""
        if self.max_positions and len(prompt_ids) + max_new_tokens > self.max_positions:
            raise InputError(f"the prompt's {len(prompt_ids)} tokens plus {max_new_tokens} new ones exceed the "
                             f"model's context of {self.max_positions} positions")
        return self.graph.decoding(self, list(prompt_ids), len(prompt_ids) + max_new_tokens)


class _Cached:
    """A graph with a cache: the prompt once, then a token per step against it. The graph
    strategies hold nothing of the model (no cycle keeps a session alive past its model)."""

    fixed_len = None  # any length: the cache takes the steps

    def decoding(self, model: "CompiledModel", prompt_ids: list[int], max_len: int):
        cache = self.cache(model, max_len)

        def step(token: int) -> np.ndarray:
            return cache.step(np.asarray([[token]], np.int64), last_only=True)[0, -1]

        return cache.step(np.asarray([prompt_ids], np.int64), last_only=True)[0, -1], step


class _FusedGraph(_Cached):
    """The fused KV-cache decoder: (batch, kv_heads, length, head_dim) buffers updated in place."""

    def __init__(self, model: "CompiledModel", inputs: dict):
        first = inputs[model.past_names[0]]
        if not all(isinstance(first.shape[d], int) for d in (1, 3)) or "position_ids" not in inputs:
            raise InputError(f"{model.path} is not a KV-cache decoder awq-graph wrote: its {first.name} has "
                             f"shape {first.shape} (KV heads and head size not fixed) or it takes no "
                             f"position_ids; run it with the runtime it was written for (a folder with "
                             f"genai_config.json: onnxruntime-genai)")
        model.kv_heads, model.head_dim = first.shape[1], first.shape[3]
        model.vocab = int(model.session.get_outputs()[0].shape[-1])
        model.np_dtype = model.past_dtypes[0]

    def logits(self, m: "CompiledModel", ids: np.ndarray) -> torch.Tensor:
        """Whole sequences against an empty cache."""
        batch, seq = ids.shape
        empty = np.zeros((batch, m.kv_heads, 0, m.head_dim), m.np_dtype)
        feed = {"input_ids": ids, "attention_mask": np.ones((batch, seq), np.int64),
                "position_ids": np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq)).copy()}
        feed.update({n: empty for n in m.past_names})
        if m.has_logits_to_keep:
            feed["logits_to_keep"] = np.array(0, np.int64)
        return torch.from_numpy(m.session.run(["logits"], feed)[0].astype(np.float32))

    def cache(self, model: "CompiledModel", max_len: int, batch: int = 1) -> "_KVCache":
        return _KVCache(model, max_len, batch)


class _GenericGraph(_Cached):
    """The generic decoder: its presents (past + the step) fed back as the next past."""

    def __init__(self, model: "CompiledModel"):
        model.vocab = int(model.session.get_outputs()[0].shape[-1])
        model.np_dtype = model.past_dtypes[0]

    def logits(self, model: "CompiledModel", ids: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(_GrowingCache(model, ids.shape[0]).step(ids).astype(np.float32))

    def cache(self, model: "CompiledModel", max_len: int, batch: int = 1) -> "_GrowingCache":
        return _GrowingCache(model, batch)


class _LogitsOnlyGraph:
    """The logits-only graph: every step re-runs the whole prefix. An export that fixed the length
    takes that many tokens: shorter sequences are padded on the right (a causal LM's earlier
    logits never see later tokens)."""

    def __init__(self, model: "CompiledModel", inputs: dict):
        length = inputs[model.input_names[0]].shape[1]
        self.fixed_len = length if isinstance(length, int) else None
        if self.fixed_len:
            model.max_positions = min(model.max_positions or self.fixed_len, self.fixed_len)

    def logits(self, m: "CompiledModel", ids: np.ndarray) -> torch.Tensor:
        if not self.fixed_len:
            return torch.from_numpy(m.session.run(None, {m.input_names[0]: ids})[0]).float()
        if ids.shape[1] > self.fixed_len:
            raise InputError(f"{m.path} takes at most {self.fixed_len} tokens (torch.export fixed the length "
                             f"of this architecture's graph); got {ids.shape[1]}")
        padded = np.zeros((ids.shape[0], self.fixed_len), np.int64)
        padded[:, :ids.shape[1]] = ids
        return torch.from_numpy(m.session.run(None, {m.input_names[0]: padded})[0][:, :ids.shape[1]]).float()

    def cache(self, model: "CompiledModel", max_len: int, batch: int = 1):
        raise InputError(f"{model.path} is a logits-only model (no KV cache)")

    def decoding(self, model: "CompiledModel", prompt_ids: list[int], max_len: int):
        ids = list(prompt_ids)

        def rerun(token: int) -> np.ndarray:
            ids.append(token)
            return self.logits(model, np.asarray([ids], np.int64))[0, -1].numpy()

        return self.logits(model, np.asarray([ids], np.int64))[0, -1].numpy(), rerun


class _KVCache:
    """The keys and values of ``batch`` sequences of one length, kept in onnxruntime: each layer's
    past and present are bound to the same preallocated (batch, kv_heads, max_len, head_dim) buffer,
    which GroupQueryAttention then updates in place. Bound once; a step rebinds only the ids."""

    def __init__(self, model: CompiledModel, max_len: int, batch: int = 1):
        ort = model._ort
        self.model = model
        self.length = 0
        self.max_len = max_len
        self.batch = batch
        shape = (batch, model.kv_heads, max_len, model.head_dim)
        self.buffers = [ort.OrtValue.ortvalue_from_shape_and_type(shape, model.np_dtype, model.device)
                        for _ in model.past_names]
        self.binding = model.session.io_binding()
        self.binding.bind_output("logits", "cpu")  # first: get_outputs() follows the binding order
        for past, present, buf in zip(model.past_names, model.present_names, self.buffers):
            self.binding.bind_ortvalue_input(past, buf)
            self.binding.bind_ortvalue_output(present, buf)
        self.mask = np.ones((batch, max_len), np.int64)
        self.positions = np.ascontiguousarray(np.broadcast_to(np.arange(max_len, dtype=np.int64), (batch, max_len)))
        # one-token steps reuse their input and output buffers: nothing is allocated per token
        self.token = np.zeros((batch, 1), np.int64)
        self.position = np.zeros((batch, 1), np.int64)
        self.last_logits = np.zeros((batch, 1, model.vocab), model.np_dtype)
        self.keep_one = np.array(1, np.int64)
        ort_value = ort.OrtValue.ortvalue_from_numpy
        self.step_inputs = {"input_ids": ort_value(self.token), "position_ids": ort_value(self.position)}
        self.step_logits = ort_value(self.last_logits)
        self.step_bound = False

    def step(self, ids: np.ndarray, last_only: bool = False) -> np.ndarray:
        """Run ``ids`` (batch, S) after what is cached; returns their logits (batch, S, V), or the
        last position's (batch, 1, V) with ``last_only``."""
        seq = ids.shape[1]
        end = self.length + seq
        if end > self.max_len:
            raise InputError(f"the KV cache holds {self.max_len} tokens; {end} requested")
        b = self.binding
        one_token = seq == 1 and last_only and self.model.has_logits_to_keep
        if one_token:
            self.token[:, 0] = ids[:, 0]
            self.position[:, 0] = self.length
            if not self.step_bound:  # bound once; the arrays behind them change in place
                for name, value in self.step_inputs.items():
                    b.bind_ortvalue_input(name, value)
                b.bind_cpu_input("logits_to_keep", self.keep_one)
                b.bind_ortvalue_output("logits", self.step_logits)
                self.step_bound = True
        else:
            b.bind_cpu_input("input_ids", np.ascontiguousarray(ids, dtype=np.int64))
            b.bind_cpu_input("position_ids", np.ascontiguousarray(self.positions[:, self.length:end]))
            if self.model.has_logits_to_keep:
                b.bind_cpu_input("logits_to_keep", np.array(1 if last_only else 0, np.int64))
            b.bind_output("logits", "cpu")  # unallocated: its shape is the step's
            self.step_bound = False
        b.bind_cpu_input("attention_mask", np.ascontiguousarray(self.mask[:, :end]))
        self.model.session.run_with_iobinding(b)
        self.length = end
        return self.last_logits.copy() if one_token else b.get_outputs()[0].numpy()


class _GrowingCache:
    """The generic decoder's cache: each step feeds every layer's past and keeps the presents it
    returns (past + the step's tokens) as the next past."""

    def __init__(self, model: CompiledModel, batch: int = 1):
        self.model = model
        self.length = 0
        # keys and values start empty (their one named dimension past the batch is the length);
        # linear-attention states start as zeros of their fixed shape
        self.past = [np.zeros([batch] + [d if isinstance(d, int) else 0 for d in shape[1:]], dtype)
                     for shape, dtype in zip(model.past_shapes, model.past_dtypes)]
        self.positions = "position_ids" in model.input_names
        self.mask = "attention_mask" in model.input_names

    def step(self, ids: np.ndarray, last_only: bool = False) -> np.ndarray:
        """Run ``ids`` (B, S) after what is cached; their logits (B, S, V), or the last (B, 1, V)."""
        batch, seq = ids.shape
        if self.model.one_token and seq > 1:
            logits = [self.step(ids[:, t:t + 1]) for t in range(seq)]
            return logits[-1] if last_only else np.concatenate(logits, axis=1)
        end = self.length + seq
        if self.model.max_positions and end > self.model.max_positions:
            raise InputError(f"the model's context is {self.model.max_positions} positions; {end} requested")
        feed = {"input_ids": np.ascontiguousarray(ids, dtype=np.int64)}
        if self.mask:
            feed["attention_mask"] = np.ones((batch, end), np.int64)
        if self.positions:
            feed["position_ids"] = np.broadcast_to(np.arange(self.length, end, dtype=np.int64), (batch, seq)).copy()
        feed.update(zip(self.model.past_names, self.past))
        logits, *self.past = self.model.session.run(["logits", *self.model.present_names], feed)
        self.length = end
        return logits[:, -1:] if last_only else logits


def _pick(logits: np.ndarray, temperature: float, top_k: int, rng) -> int:
    if temperature <= 0:
        return int(np.argmax(logits))
    logits = logits.astype(np.float64).reshape(-1)
    # the largest logit subtracted before the division: at a temperature of 1e-320 the rest go to
    # -inf and the largest stays 0 (greedy in effect), where logits / t would be inf - inf = NaN
    z = (logits - logits.max()) / temperature
    if top_k and top_k < z.size:
        cut = np.partition(z, -top_k)[-top_k]
        z = np.where(z >= cut, z, -np.inf)
    p = np.exp(z)
    return int(rng.choice(z.size, p=p / p.sum()))


def _pick_rows(logits: np.ndarray, temperature: float, top_k: int, rng) -> np.ndarray:
    """One token per row of ``logits`` (batch, vocab), sampled among each row's ``top_k`` likeliest
    at ``temperature`` (> 0): one uniform draw per row against the rows' cumulative probabilities."""
    z = logits.astype(np.float64)
    if top_k and top_k < z.shape[1]:
        top = np.argpartition(z, -top_k, axis=1)[:, -top_k:]
        z = np.take_along_axis(z, top, 1)
    else:
        top = None
    z = (z - z.max(1, keepdims=True)) / temperature
    p = np.exp(z)
    cumulative = np.cumsum(p, 1)
    draw = rng.random(z.shape[0])[:, None] * cumulative[:, -1:]
    choice = np.minimum((cumulative < draw).sum(1), z.shape[1] - 1)
    return choice if top is None else top[np.arange(z.shape[0]), choice]


def torch_logits(model):
    @torch.no_grad()
    def run(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, use_cache=False).logits

    return run


def perplexity(logits_fn, ids, seqlen: int = 2048, max_windows: int | None = None, progress=None):
    """exp(mean NLL) over non-overlapping windows of ``seqlen`` tokens; each window predicts
    its tokens 1..seqlen-1. Returns (ppl, tokens scored)."""
    progress = progress or no_progress
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    n = ids.numel() // seqlen
    if max_windows:
        n = min(n, max_windows)
    if n == 0:
        raise InputError(f"the text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    nll, count = 0.0, 0
    for w in progress(range(n), "perplexity", n):
        window = ids[w * seqlen:(w + 1) * seqlen].unsqueeze(0)
        nll += window_nll(torch.as_tensor(logits_fn(window))[0, :-1], window[0, 1:])
        count += seqlen - 1
    return math.exp(nll / count), count


NLL_ROWS = 256  # positions scored at a time: a (rows x vocab) float32 temporary, not a second (seqlen x vocab)


def window_nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """The summed next-token NLL of one window: ``logits`` (positions x vocab, any float dtype)
    against ``targets`` (positions), scored a few rows at a time in float32 (at a 128k vocabulary a
    2048-token window's log-softmax would be another 1 GB beside the logits)."""
    total = 0.0
    for start in range(0, logits.shape[0], NLL_ROWS):
        rows = logits[start:start + NLL_ROWS].float()
        total += float(torch.nn.functional.cross_entropy(rows, targets[start:start + NLL_ROWS], reduction="sum"))
    return total
