"""The held-aside check: the search's integers against round-to-nearest's on calibration tokens
the search never saw, per decoder layer and end to end, so that a model worse than plain
rounding is never written silently.

The search's own objectives (a group's output error, a range's output error) measure the distance
to the float layer on the tokens they were fitted on. On Qwen2.5-1.5B that distance went down
while the perplexity went up: every per-layer error of the clipped model was below round-to-
nearest's and its end-to-end NLL above. So the check ends with the end-to-end figure, the
next-token NLL of whole candidate models on held-aside samples, and writes the lowest (the
searched model unless another is lower by more than the noise of those tokens).

Per decoder layer there are three candidates: ``awq`` (the chosen scales, then the clipped ranges),
``unclipped`` (the same scales, full ranges) and ``rtn`` (no scale, full ranges: the folds of the
layer undone). Each is run on the float model's input to the layer; its error is the output's
squared error relative to the float output's square, per token, averaged over the tokens (a token's
error as the next norm sees it, so a massive-activation token does not outweigh the rest).

Candidate models flow through the layers side by side, each with its own hidden states:
``searched`` keeps the candidate of least error per layer, ``unclipped`` the lesser of
``unclipped`` and ``rtn``, ``rtn`` is round-to-nearest everywhere, and per module of a layer whose
linears the clipping changed (``self_attn``, ``mlp``), a model clipping only that module's linears
(the ``unclipped`` model's choice elsewhere): on Qwen2.5-1.5B clipping the attention's linears
helped while clipping ``down_proj`` undid all of AWQ's gain (docs/quality-on-a-1.5b-model.md).
After the last layer each model is scored
by its NLL on the held-aside tokens (the float model's too, for reference); ``searched`` is
written unless another model's NLL is lower by more than twice the standard error of the
per-token difference (then the lowest of those).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .core.ir import GraphModel, run_nodes
from .core.numerics import QuantizedWeight, QuantScheme, quantize
from .core.layer_cut import LayerCut, params_read

CANDIDATES = ("awq", "unclipped", "rtn")
# each candidate model, and the layer candidates it may take (the first of equal errors wins)
MODELS = {"searched": CANDIDATES, "unclipped": ("unclipped", "rtn"), "rtn": ("rtn",)}
# and per module of a layer whose linears clipping changed ("self_attn", "mlp"), a model clipping
# that module's linears only (the unclipped model's choice elsewhere), named CLIP_ONLY + the module
CLIP_ONLY = "clipped only in "


@dataclass
class LayerVerdict:
    layer: int
    error: dict[str, float]  # per layer candidate: held-aside output error relative to the float layer's
    chosen: dict[str, str]  # per candidate model: the layer candidate it took


@dataclass
class GuardReport:
    held_samples: int
    held_tokens: int
    nll: dict[str, float]  # "float" and each candidate model: mean next-token NLL on the held-aside tokens
    written: str  # the candidate model written
    standard_error: dict[str, float]  # per other model: the standard error of its mean NLL difference to "searched"
    layers: list[LayerVerdict] = field(default_factory=list)
    seconds: float = 0.0  # the check's own time, within the search's

    def counts(self, model: str) -> dict[str, int]:
        taken = [v.chosen.get(model, v.chosen["unclipped"]) for v in self.layers]
        return {c: taken.count(c) for c in dict.fromkeys(taken)}

    @property
    def alarming(self) -> bool:
        """The search's model was not written: another scored lower beyond the noise. (One written
        above round-to-nearest within the noise is said in ``summary``, not warned of.)"""
        return self.written != "searched"

    def summary(self) -> str:
        nll = ", ".join(f"{k} {v:.4f}" for k, v in self.nll.items())
        layers = ", ".join(f"{n} {c}" for c, n in self.counts(self.written).items())
        line = (f"held-aside check ({self.held_samples} samples, {self.held_tokens} tokens the search did not use): "
                f"NLL {nll}; wrote {self.written} (decoder layers: {layers})")
        if self.nll[self.written] > self.nll["rtn"]:
            line += (f"; its NLL is above round-to-nearest's by {self.nll[self.written] - self.nll['rtn']:.4f}, "
                     f"within the noise of these tokens (twice the standard error of round-to-nearest's "
                     f"difference to the searched model: {2 * self.standard_error['rtn']:.4f})")
        return line


@dataclass
class LayerBefore:
    """What a decoder layer was before its folds: round-to-nearest's integers of each quantized
    linear, and every other parameter a fold of the layer edits (norms, biases)."""

    rtn: dict[str, QuantizedWeight]
    params: dict[str, torch.Tensor]


class HeldAsideGuard:
    """The candidate models' hidden states on the held-aside samples, advanced a decoder layer at a
    time by ``layer``; ``finish`` scores them and says which is written."""

    def __init__(self, gm: GraphModel, stages: LayerCut, held: torch.Tensor, scheme: QuantScheme, device="cpu"):
        self.gm, self.stages, self.scheme, self.device = gm, stages, scheme, device
        self.ids = [c.to(device) for c in held.split(1)]  # a sample at a time: its logits are (seqlen x vocab)
        self.input_node = gm.input_node()
        self.param_nodes = {gm.placeholder_param[n.name]: n for n in gm.graph.nodes
                            if n.op == "placeholder" and n.name in gm.placeholder_param}
        self.verdicts: list[LayerVerdict] = []
        t0 = time.perf_counter()
        self.before: dict[int, LayerBefore] = {}
        self.held: dict[str, dict] = {m: {} for m in MODELS}  # model -> linear -> the integers as held
        pre = stages.stages[0]
        params = params_read(self.gm, pre, self.device)
        stores = []
        with torch.no_grad():
            for ids in self.ids:
                env = {**params, self.input_node: ids}
                run_nodes(pre, env, device)
                stores.append({n: env[n] for n in stages.keep_after[0]})
        self.streams = {"float": stores, **{m: stores for m in MODELS}}
        self.seconds = time.perf_counter() - t0

    def snapshot(self, li: int, linears: list[str], edited: set[str]) -> None:
        """Before the folds of layer ``li``: round-to-nearest's integers and the parameters
        (``edited``, the quantized linears' weights left out) as they are."""
        t0 = time.perf_counter()
        rtn = {name: quantize(self.gm.linears[name].matrix(self.gm.params).detach().to(self.device, torch.float32),
                              self.scheme).to("cpu") for name in linears}
        weights = {self.gm.linears[n].weight for n in linears}
        params = {p: self.gm.params[p].detach().clone() for p in sorted(edited - weights)}
        self.before[li] = LayerBefore(rtn, params)
        self.seconds += time.perf_counter() - t0

    def layer(self, li: int, nodes: list, clipped: dict[str, QuantizedWeight], unclipped: dict[str, QuantizedWeight],
              keep) -> dict:
        """Layer ``li``'s verdict (after its folds and quantization): each candidate's error, each
        model's choice; every model's hidden states advanced; the integers each model took held
        (``keep``, as the search holds them). Returns the ``searched`` model's integers."""
        t0 = time.perf_counter()
        before = self.before[li]
        candidates = {"awq": clipped, "unclipped": unclipped, "rtn": before.rtn}
        base = f"{self.stages.prefix}.{li}."
        for name, qw in clipped.items():  # a module whose linears clipping changed: a model clipping it alone
            if qw is not unclipped[name]:
                module = name[len(base):].rsplit(".", 1)[0]
                candidates.setdefault(f"{CLIP_ONLY}{module}", {**unclipped})[name] = qw
        for label in candidates:
            if label.startswith(CLIP_ONLY) and label not in self.streams:  # so far it was the unclipped model
                self.streams[label] = self.streams["unclipped"]
                self.held[label] = dict(self.held["unclipped"])
        params = params_read(self.gm, nodes, self.device)
        outputs = [n for n in self.stages.keep_after[li + 1] if self.stages.stage_of.get(n) == li + 1
                   and isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].is_floating_point()]

        def replacements(candidate):
            made = {}
            for name, qw in candidates[candidate].items():
                site = self.gm.linears[name]
                node = site.weight_node
                made[node] = site.stored(qw.to(self.device).dequantize()).to(params[node].dtype)
            if candidate == "rtn":
                for p, value in before.params.items():
                    node = self.param_nodes[p]
                    if node in params:
                        made[node] = value.to(self.device)
            return made

        def run(stores, made):
            out = []
            for ids, store in zip(self.ids, stores):
                env = {**params, **made, **store, self.input_node: ids}
                run_nodes(nodes, env, self.device)
                out.append({n: env[n] for n in self.stages.keep_after[li + 1]})
            return out

        # the outputs of a candidate on a stream, run once: models that took the same candidates so far
        # share their stream, and on the float model's input (every model's at layer 0) the error's run
        ran = {}

        def run_once(stream, candidate):
            key = (id(stream), candidate)
            if key not in ran:
                ran[key] = (stream, run(stream, replacements(candidate) if candidate else {}))
            return ran[key][1]

        with torch.no_grad():  # one candidate's dequantized weights at a time
            reference = run_once(self.streams["float"], None)
            error = {c: _relative_error(run_once(self.streams["float"], c), reference, outputs) for c in CANDIDATES}
            chosen = {m: min(options, key=lambda c: error[c]) for m, options in MODELS.items()}
            for model in self.streams:  # a module's clipping model: clipped there, else the unclipped model's choice
                if model.startswith(CLIP_ONLY):
                    chosen[model] = model if model in candidates else chosen["unclipped"]
            self.streams = {"float": reference, **{m: run_once(self.streams[m], c) for m, c in chosen.items()}}
        self.verdicts.append(LayerVerdict(li, error, chosen))
        held = {}  # each linear's integers of each kind, held once
        for c in dict.fromkeys(chosen.values()):
            for name, qw in candidates[c].items():
                key = (name, "rtn" if c == "rtn" else "awq" if qw is clipped[name] else "unclipped")
                if key not in held:
                    held[key] = keep(name, qw)
        for m, c in chosen.items():
            self.held.setdefault(m, {}).update(
                {name: held[(name, "rtn" if c == "rtn" else "awq" if qw is clipped[name] else "unclipped")]
                 for name, qw in candidates[c].items()})
        self.before[li] = LayerBefore({}, before.params)  # the integers are held: only the parameters stay
        self.seconds += time.perf_counter() - t0
        return {name: self.held["searched"][name] for name in clipped}

    def finish(self) -> tuple[GuardReport, dict, set[int]]:
        """Each model's NLL on the held-aside tokens, the lowest chosen. Returns the report, the
        written model's integers, and the decoder layers whose folds it undoes (its layers taken
        as round-to-nearest); their parameters are put back as they were before the folds."""
        t0 = time.perf_counter()
        post = self.stages.stages[self.stages.n + 1]
        out_node = next(n for n in self.gm.graph.nodes if n.op == "output").args[0][0]
        params = params_read(self.gm, post, self.device)
        per_token, scored = {}, {}
        with torch.no_grad():
            for m in self.streams:
                stream = self.streams[m]
                if id(stream) not in scored:  # models whose every layer is the same share one score
                    rows = []
                    for ids, store in zip(self.ids, stream):
                        env = {**params, **store, self.input_node: ids}
                        run_nodes(post, env, self.device)
                        logp = torch.log_softmax(env[out_node][0, :-1].float(), -1)
                        rows.append(-logp.gather(-1, ids[0, 1:, None])[:, 0].cpu())
                        del env, logp
                    scored[id(stream)] = torch.cat(rows).double()
                per_token[m] = scored[id(stream)]
        nll = {m: float(v.mean()) for m, v in per_token.items()}
        written, standard_error = written_model(per_token)
        undone = {v.layer for v in self.verdicts if v.chosen.get(written, v.chosen["unclipped"]) == "rtn"}
        for li in undone:
            for p, value in self.before[li].params.items():
                self.gm.params[p].copy_(value)
        samples = sum(int(ids.shape[0]) for ids in self.ids)
        report = GuardReport(samples, samples * int(self.ids[0].shape[1]), nll, written, standard_error, self.verdicts,
                             round(self.seconds + time.perf_counter() - t0, 3))
        return report, dict(self.held[written]), undone


def written_model(per_token: dict) -> tuple[str, dict]:
    """The model to write: ``searched``, unless another's NLL is below it by more than twice the
    standard error of the per-token difference (then the lowest such); a difference within the
    noise of a few thousand tokens does not undo the search."""
    base = per_token["searched"]
    standard_error, better = {}, []
    for m in per_token:
        if m in ("float", "searched"):
            continue
        d = per_token[m] - base
        standard_error[m] = float(d.std() / len(d) ** 0.5) if len(d) > 1 else 0.0
        if float(d.mean()) < -2 * standard_error[m]:
            better.append(m)
    return (min(better, key=lambda m: float(per_token[m].mean())) if better else "searched"), standard_error


def _relative_error(outs: list[dict], reference: list[dict], nodes: list) -> float:
    """Mean over tokens of the squared error of ``nodes`` relative to the reference's square."""
    total, count = 0.0, 0
    for got, ref in zip(outs, reference):
        for n in nodes:
            r = ref[n].float()
            per_token = (got[n].float() - r).pow(2).sum(-1) / r.pow(2).sum(-1).clamp(min=1e-30)
            total += float(per_token.sum())
            count += per_token.numel()
    return total / max(count, 1)
