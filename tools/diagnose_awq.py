"""Where AWQ wins or loses against round-to-nearest, layer by layer, on a real model (not a test).

Two steps, each its own process (a search edits the weights in place):

    python tools/diagnose_awq.py search MODEL VARIANT [--n-samples 32]     # -> bench/diag/MODEL/VARIANT.pt
    python tools/diagnose_awq.py eval MODEL VARIANT... [--windows 4] [--layers A B]

``search`` runs the compiler's own search (``awq_graph.search``) on the whole model and keeps what
it made: each linear's packed integers and every parameter a fold edited (norms, biases). Variants:
rtn, awq (today's default), awq-noclip, clip (no scaling group: round to nearest plus clipping); a
variant starting with "noscale" has no scaling group either (with `--options '{"clip": false, "rounding":
"gptq"}'`: GPTQ alone); `--options` sets any `SearchOptions` field.

``eval`` loads the float model once and scores any variant by running the exported program with its
integers (dequantized one weight at a time) and its folded parameters: perplexity on the first windows
of WikiText-2 test. ``--layers A B`` adds, per decoder layer, (1) the end-to-end perplexity of A
everywhere but B in that layer, and (2) the layer's local output error for A and B against the float
layer on held-aside calibration tokens (float inputs), in several weightings: plain MSE, MSE without
the first token of each window, and the error after the next RMS normalization (each token's error
divided by its float residual's RMS). Figures go to tools/results/diagnose-*.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _setup(model_path: Path, seqlen: int):
    from awq_graph.export import export_model
    from awq_graph.load import load_model

    model, tokenizer = load_model(model_path)
    gm = export_model(model, private=False, seqlen=seqlen)
    return model, tokenizer, gm


def _calib(data: Path, tokenizer, n: int, held: int, seqlen: int):
    from awq_graph import calib as calibration

    if os.environ.get("HELD_FROM_TEST") and held:  # held-aside windows from the test text, past the scored ones
        ids = calibration.from_file(data / "wikitext2-test.txt", tokenizer, 64 + held, seqlen)
        return None, ids[64:]
    ids = calibration.from_file(data / "wikitext2-valid-tokenized.txt", tokenizer, n + held, seqlen)
    return ids[:n], ids[n:]


def cmd_search(args) -> None:
    from awq_graph.core.analysis import quantizable_linears
    from awq_graph.match import match
    from awq_graph.search import SearchOptions, awq_search, rtn

    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    model, tokenizer, gm = _setup(args.model, args.seqlen)
    calib, _ = _calib(args.data, tokenizer, args.n_samples, 0, args.seqlen)
    print(f"loaded and exported in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    opts = SearchOptions(**{"clip": not args.variant.startswith("awq-noclip"), **json.loads(args.options or "{}")})
    if args.variant == "rtn":
        result = rtn(gm, opts.scheme)
    else:
        per_layer = match(gm, None, verify=False).per_layer
        if args.variant.startswith(("clip", "noscale")):  # no scaling groups: the linears as they are
            per_layer = [[] for _ in per_layer]
        result = awq_search(gm, per_layer, calib, opts, progress=_bar)
    quantized = set(quantizable_linears(gm))
    weights = {gm.linears[n].weight for n in quantized}
    edited = {name for f in result.folded for name in f.params} - weights
    out = _artifact(args.model, args.variant)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"quantized": result.quantized, "edited": {n: gm.params[n].detach().clone() for n in edited},
                "groups": [g.__dict__ for g in result.groups], "clips": [c.__dict__ for c in result.clips],
                "roundings": [r.__dict__ for r in result.roundings],
                "seconds": result.seconds, "options": repr(opts)}, out)
    print(f"{args.variant}: search {result.seconds:.0f} s -> {out}", file=sys.stderr)


def _artifact(model: Path, variant: str) -> Path:
    return REPO / "bench" / "diag" / model.stem / f"{variant}.pt"


def _bar(it, desc, total):
    from tqdm import tqdm

    return tqdm(it, desc=desc, total=total, file=sys.stderr)


class Variant:
    """A variant's integers and folded parameters, as replacements of the float model's."""

    def __init__(self, gm, saved: dict):
        self.gm = gm
        self.quantized = saved["quantized"]
        self.edited = saved["edited"]
        self.by_weight = {gm.linears[n].weight: n for n in self.quantized}

    def made(self, layers: set[int] | None = None, prefix: str = "") -> dict:
        """param name -> a function making its replacement, for the decoder layers in ``layers``
        (None: every one)."""
        out = {}
        for name, packed in self.quantized.items():
            if layers is None or _layer_of(name, prefix) in layers:
                site = self.gm.linears[name]
                out[site.weight] = (lambda p=packed, s=site: s.stored(p.dequantize()))
        for name, value in self.edited.items():
            if layers is None or _layer_of(name, prefix) in layers:
                out[name] = (lambda v=value: v)
        return out


def _variant(gm, model: Path, spec: str) -> Variant:
    """A saved variant, or a mixture "BASE+OTHER:sub1,sub2[@A-B]": BASE's integers but OTHER's for the
    linears whose names hold one of the substrings (in decoder layers A..B), with OTHER's folded
    parameters of those layers (exact only where OTHER folded nothing there: rtn, clip)."""
    if "+" not in spec:
        return Variant(gm, torch.load(_artifact(model, spec), weights_only=False))
    base, rest = spec.split("+", 1)
    other, subs = rest.split(":", 1)
    layers = None
    if "@" in subs:
        subs, span = subs.split("@")
        lo, hi = (int(x) for x in span.split("-"))
        layers = set(range(lo, hi + 1))
    subs = subs.split(",")
    b = torch.load(_artifact(model, other), weights_only=False)
    a = ({"quantized": {}, "edited": {}} if base == "float"  # the float model but for OTHER's chosen linears
         else torch.load(_artifact(model, base), weights_only=False))
    prefix = next(iter(b["quantized"])).split(".layers.")[0] + ".layers"
    taken = {n for n in b["quantized"] if any(x in n for x in subs) and (layers is None or _layer_of(n, prefix) in layers)}
    a["quantized"] = {**{n: q for n, q in a["quantized"].items() if n not in taken},
                      **{n: b["quantized"][n] for n in taken}}
    return Variant(gm, a)


def _layer_of(name: str, prefix: str) -> int | None:
    if not name.startswith(prefix + "."):
        return None
    head = name[len(prefix) + 1:].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def cmd_eval(args) -> None:
    from awq_graph import calib as calibration
    from awq_graph.core.ir import run_nodes
    from awq_graph.core.layer_cut import LayerCut
    from awq_graph.runtime import perplexity

    torch.set_grad_enabled(False)
    model, tokenizer, gm = _setup(args.model, args.seqlen)
    stages = LayerCut(gm)
    prefix = stages.prefix
    test = tokenizer(calibration.read_text(args.data / "wikitext2-test.txt"), add_special_tokens=False).input_ids
    variants = {v: _variant(gm, args.model, v) for v in args.variants}
    figures = {"model": args.model.name, "windows": args.windows, "loadavg": os.getloadavg()[0], "ppl": {}}

    def ppl(made):
        return perplexity(lambda ids: gm.run(torch.as_tensor(ids), made=made).float(), test, 2048, args.windows)[0]

    if not args.skip_whole:
        if not args.no_float:
            figures["ppl"]["float"] = ppl({})
            print(f"float: {figures['ppl']['float']:.4f}", flush=True)
        for v, var in variants.items():
            figures["ppl"][v] = ppl(var.made(None, prefix))
            print(f"{v}: {figures['ppl'][v]:.4f}", flush=True)
    if args.token_nll:  # per-token NLL of each variant over the scored windows, against the first variant's
        nlls = {}
        for tag, made in [("float", {})] + [(v, var.made(None, prefix)) for v, var in variants.items()]:
            rows, ent, temps = [], [], {t: [] for t in (0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.15)}
            for w in range(args.windows):
                window = torch.as_tensor(test[w * 2048:(w + 1) * 2048]).unsqueeze(0)
                logits = gm.run(window, made=made).float()[0, :-1]
                logp = torch.log_softmax(logits, -1)
                rows.append(-logp.gather(-1, window[0, 1:, None])[:, 0])
                ent.append(-(logp.exp() * logp).sum(-1))
                for t in temps:
                    lt = torch.log_softmax(logits / t, -1)
                    temps[t].append(-lt.gather(-1, window[0, 1:, None])[:, 0])
            nlls[tag] = torch.cat(rows)
            print(tag, "entropy", float(torch.cat(ent).mean()), "nll at T", {t: round(float(torch.cat(v).mean()), 5)
                                                                            for t, v in temps.items()}, flush=True)
        base = nlls[args.variants[0]]
        figures["token_nll"] = {}
        for tag, nll in nlls.items():
            d = nll - base
            q = torch.quantile(d, torch.tensor([0.001, 0.01, 0.1, 0.5, 0.9, 0.99, 0.999])).tolist()
            srt = d.sort(descending=True).values
            top = {f"top{k}": float(srt[:k].sum()) for k in (10, 100, 1000)}
            figures["token_nll"][tag] = {"mean_nll": float(nll.mean()), "mean_diff": float(d.mean()), "sum_diff": float(d.sum()),
                                        "quantiles": q, **top, "bottom1000": float(srt[-1000:].sum())}
            print(tag, json.dumps(figures["token_nll"][tag]), flush=True)
        torch.save(nlls, REPO / "bench" / "diag" / args.model.stem / "token_nll.pt")
    if args.trace:
        _, held = _calib(args.data, tokenizer, args.n_samples, args.held, args.seqlen)
        figures["trace"] = _trace(gm, stages, held, variants, prefix, run_nodes)
        for v, rows in figures["trace"].items():
            print(v, " ".join(f"{r['normed']:.2e}" for r in rows), flush=True)
    if args.layers:
        a, b = (variants[v] for v in args.layers)
        _, held = _calib(args.data, tokenizer, args.n_samples, args.held, args.seqlen)
        figures["layers"] = _local_errors(gm, stages, held, a, b, prefix, run_nodes)
        for row in figures["layers"]:
            print(json.dumps(row), flush=True)
        if args.swaps:  # end to end on the held-aside tokens: NLL and KL from the float model's logits
            float_logp = torch.log_softmax(gm.run(held).float(), -1)

            def held_scores(made):
                logp = torch.log_softmax(gm.run(held, made=made).float(), -1)
                nll = -logp[:, :-1].gather(-1, held[:, 1:, None]).mean()
                kl = (float_logp.exp() * (float_logp - logp)).sum(-1).mean()
                return float(nll), float(kl)

            every = set(range(stages.n))
            figures["held"] = {"float_nll": float(-float_logp[:, :-1].gather(-1, held[:, 1:, None]).mean())}
            for tag, made in (("a", a.made(every, prefix)), ("b", b.made(every, prefix))):
                figures["held"][f"nll_{tag}"], figures["held"][f"kl_{tag}"] = held_scores(made)
            print(json.dumps(figures["held"]), flush=True)
            for li in range(stages.n):
                made = {**a.made(every - {li}, prefix), **b.made({li}, prefix)}
                nll, kl = held_scores(made)
                figures["layers"][li]["nll_swap"], figures["layers"][li]["kl_swap"] = nll, kl
                print(f"layer {li}: {args.layers[0]} but {args.layers[1]} here: nll {nll:.5f} kl {kl:.5f}", flush=True)
    tag = "-".join(args.variants).replace(":", "_").replace(",", "_").replace("+", "_")[:120]
    out = REPO / "tools" / "results" / f"diagnose-{args.model.stem}-{tag}.json"
    out.write_text(json.dumps(figures, indent=1) + "\n")
    print(f"figures written to {out}")


def _local_errors(gm, stages, held, a, b, prefix, run_nodes):
    """Per decoder layer, with the float model's input to it: the output error of variant a's and
    b's layer against the float layer, over the held-aside tokens, in several weightings."""
    from awq_graph.core.layer_cut import params_read

    params_env = params_read(gm, stages.stages[0], "cpu")
    env = {**params_env, gm.input_node(): held}
    run_nodes(stages.stages[0], env)
    store = {n: env[n] for n in stages.keep_after[0]}
    # the float model to the end once: the final residual, and the logits an error injected there gives
    fstore = dict(store)
    for li in range(stages.n):
        fenv = {**params_read(gm, stages.stages[li + 1], "cpu"), **fstore, gm.input_node(): held}
        run_nodes(stages.stages[li + 1], fenv)
        fstore = {n: fenv[n] for n in stages.keep_after[li + 1]}
    final_node = next(n for n in stages.keep_after[stages.n] if stages.stage_of.get(n) == stages.n
                      and fenv[n].shape[-1] == fenv[n].shape[-1] and fenv[n].dim() == 3 and fenv[n].dtype.is_floating_point)
    post = stages.stages[stages.n + 1]
    post_params = params_read(gm, post, "cpu")
    out_node = next(n for n in gm.graph.nodes if n.op == "output").args[0][0]

    def logp_with(error):
        penv = {**post_params, **fstore, gm.input_node(): held}
        if error is not None:
            penv[final_node] = fstore[final_node] + error.to(fstore[final_node].dtype)
        run_nodes(post, penv)
        return torch.log_softmax(penv[out_node].float(), -1)

    float_logp = logp_with(None)
    rows = []
    for li in range(stages.n):
        nodes = stages.stages[li + 1]
        results = {}
        for tag, var in (("float", None), ("a", a), ("b", b)):
            penv = dict(params_read(gm, nodes, "cpu"))
            if var is not None:
                for name, make in var.made({li}, prefix).items():
                    penv[gm.param_node(name)] = make()
            env = {**penv, **store, gm.input_node(): held}
            run_nodes(nodes, env)
            results[tag] = _residual_of(stages, li, env).float()
            if tag == "float":
                next_store = {n: env[n] for n in stages.keep_after[li + 1]}
        ref = results["float"]
        inp = _residual_input(store, ref)
        rms = ref.pow(2).mean(-1, keepdim=True).sqrt()
        row = {"layer": li}
        for tag in ("a", "b"):
            err = results[tag] - ref
            row[f"mse_{tag}"] = float(err.pow(2).mean())
            row[f"mse_nofirst_{tag}"] = float(err[:, 1:].pow(2).mean())
            row[f"normed_{tag}"] = float((err / rms).pow(2).mean())
            row[f"normed_nofirst_{tag}"] = float((err / rms)[:, 1:].pow(2).mean())
            tail = err[:, 1:].reshape(-1, err.shape[-1])
            row[f"bias_share_{tag}"] = float(tail.mean(0).pow(2).sum() / tail.pow(2).sum(-1).mean())
            row[f"mean_err_cos_{tag}"] = float(torch.nn.functional.cosine_similarity(
                err[:, 1:].mean((0, 1)), (ref - inp)[:, 1:].mean((0, 1)), dim=0)) if inp is not None else None
            logp = logp_with(err)
            row[f"head_kl_{tag}"] = float((float_logp.exp() * (float_logp - logp)).sum(-1)[:, 1:].mean())
        row["first_token_rms"] = float(rms[:, 0].mean())
        row["other_rms"] = float(rms[:, 1:].mean())
        rows.append(row)
        store = next_store
    return rows


def _residual_of(stages, li, env, like=None):
    """The residual stream after decoder layer ``li``: the largest float tensor the layer hands on."""
    made_here = [n for n in stages.keep_after[li + 1] if stages.stage_of.get(n) == li + 1]
    vals = [env[n] for n in made_here if isinstance(env.get(n), torch.Tensor) and env[n].dtype.is_floating_point]
    return max(vals, key=lambda v: v.numel())


def _trace(gm, stages, held, variants, prefix, run_nodes):
    """Each variant's model run over the held-aside tokens next to the float model, layer by layer:
    the residual stream's error against the float one after each layer (errors compounding through
    the quantized layers), per token relative to the float residual's RMS (what the next RMS
    normalization sees), the first token of each window apart."""
    from awq_graph.core.layer_cut import params_read

    env0 = {**params_read(gm, stages.stages[0], "cpu"), gm.input_node(): held}
    run_nodes(stages.stages[0], env0)
    stores = {tag: {n: env0[n] for n in stages.keep_after[0]} for tag in ["float", *variants]}
    out = {v: [] for v in variants}
    for li in range(stages.n):
        nodes = stages.stages[li + 1]
        residual = {}
        for tag in stores:
            penv = dict(params_read(gm, nodes, "cpu"))
            if tag != "float":
                for name, make in variants[tag].made({li}, prefix).items():
                    penv[gm.param_node(name)] = make()
            env = {**penv, **stores[tag], gm.input_node(): held}
            run_nodes(nodes, env)
            residual[tag] = _residual_of(stages, li, env).float()
            stores[tag] = {n: env[n] for n in stages.keep_after[li + 1]}
        ref = residual["float"]
        rms = ref.pow(2).mean(-1, keepdim=True).sqrt()
        for v in variants:
            rel = ((residual[v] - ref) / rms).pow(2).mean(-1)  # (batch, seq)
            out[v].append({"layer": li, "normed": float(rel[:, 1:].mean()), "normed_first": float(rel[:, 0].mean())})
    return out


def _residual_input(store, ref):
    for v in store.values():
        if isinstance(v, torch.Tensor) and v.shape == ref.shape and v.dtype.is_floating_point:
            return v.float()
    return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("search", "eval"):
        s = sub.add_parser(name)
        s.add_argument("model", type=Path)
        s.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
        s.add_argument("--n-samples", type=int, default=32)
        s.add_argument("--seqlen", type=int, default=512)
        if name == "search":
            s.add_argument("variant")
            s.add_argument("--options", default=None, help="SearchOptions fields as JSON")
        else:
            s.add_argument("variants", nargs="+")
            s.add_argument("--windows", type=int, default=4)
            s.add_argument("--layers", nargs=2, default=None, metavar=("A", "B"))
            s.add_argument("--held", type=int, default=4, help="held-aside calibration windows for --layers")
            s.add_argument("--swaps", action="store_true", help="per layer, A everywhere but B there, end to end")
            s.add_argument("--skip-whole", action="store_true")
            s.add_argument("--no-float", action="store_true")
            s.add_argument("--token-nll", action="store_true", help="per-token NLL of each variant against the first")
            s.add_argument("--trace", action="store_true", help="each variant's residual error layer by layer, compounded")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    (cmd_search if args.cmd == "search" else cmd_eval)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
