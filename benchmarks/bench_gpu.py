"""bf16 training-step MFU and batch-1 decode time of the smollm2 preset against the GPU's limits.

Training step: what train.py runs per optimizer step of the smollm2 preset (the paper's recipe, arXiv
2501.14176, §3.3-3.4): `--slices` slices of up to `--context` tokens in micro-batches of `--micro-batch`, each
through train.td_loss_on (online Q with grad, target Q, double-DQN targets, TD loss) under bf16 autocast,
backward, then AdamW on the IA3 vectors and the target adapter's Polyak update; gradient checkpointing on
CUDA, as train.py. The slices are the real held-out episodes packed with the model's tokenizer
(data.load_episode_sets + dqn.pack_slices, cached in --data-dir), or random tokens with --random-init
(SmolLM2-135M's shapes, random weights: a step's cost depends on the shapes only). Collating and moving the
batch happen before the clock starts.

Model FLOPs of one slice of t real tokens (N = the transformer blocks' weights, L layers, d = hidden width):
    online forward          2·N·t +  4·L·d·t²   (matmuls; attention's QKᵀ and AV over the whole t×t square)
    backward, input grads   2·N·t +  8·L·d·t²   (IA3: the frozen weights get no weight-gradient matmuls;
                                                 attention's Q, K, V are activations: both products need two)
    target forward          2·N·t +  4·L·d·t²
    useful = 6·N·t + 16·L·d·t²
Left out: the gradient-checkpoint recompute (2·N·t + 4·L·d·t², executed but not useful), padding, the LM head
(4 action rows at the Q positions), embedding lookups, norms, RoPE and the IA3 scaling. MFU = useful FLOPs /
step time / peak; HFU also counts the recompute and the padding. The t×t square counts attention the PaLM
way; a causal kernel computes about half of it, which `mfu_causal` counts instead. Peak dense bf16: H100/H200
(SXM) 989e12, H100 PCIe 756e12, A100 312e12, else $PEAK_FLOPS; none known (a CPU): n/a.

Decode: batch 1, a KV cache holding `--decode-context` prefilled tokens, then `--decode-tokens` one-token
forwards (IA3 adapter on, full-vocabulary logits, next token = their argmax, kept on the device: no host sync
inside the loop), the weights in bf16 on CUDA and no autocast, as evaluate.py plays. HBM bound per token =
bytes read / bandwidth: the blocks' weights, the LM head (SmolLM2: the tied embedding), the final norm and the
IA3 vectors, plus the KV cache up to the token's position (mean over the decoded tokens). Bandwidth: H200
4.8e12, H100 3.35e12, A100 2.0e12 B/s, else $HBM_BW; none known: n/a.

    python benchmarks/bench_gpu.py --model-dir DIR [--device auto] [--steps 10] [--out runs/bench_gpu.json]
    python benchmarks/bench_gpu.py --random-init ...       # no checkpoint needed
Writes the JSON to --out and a markdown table beside it (same name, .md).
"""
import argparse
import contextlib
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import checkpoint  # noqa: E402
import data  # noqa: E402
import dqn  # noqa: E402
import ia3  # noqa: E402
import llama  # noqa: E402
import policy  # noqa: E402
import train  # noqa: E402

# SmolLM2-135M(-Instruct): the shapes --random-init builds (gguf_to_hf.py writes this config from the GGUF)
SMOLLM2_135M = dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152, ffn_dim=1536,
                    rope_theta=100000.0, rope_scaling=None, max_seq_len=8192, tie_word_embeddings=True)
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))  # first match
HBM_BW = (("H200", 4.8e12), ("H100", 3.35e12), ("A100", 2.0e12))


def lookup(table, name, env):
    """$env if set, else the first table row whose key is in the device name, else None (n/a)."""
    if os.environ.get(env):
        return float(os.environ[env])
    return next((v for k, v in table if name and k in name), None)


def pct(x):
    return f"{x:.1%}"


def model_flops(lengths, n_params, n_layers, dim, padded_to=None, recompute=False, causal=False):
    """The docstring's FLOPs of one optimizer step over slices of `lengths` real tokens. padded_to: the
    padded lengths, counted instead (executed work); recompute: add the checkpoint recompute; causal:
    attention at half the t×t square."""
    passes_mm, passes_attn = (4, 5) if recompute else (3, 4)  # forward-equivalents (+1: the recompute)
    attn = 0.5 if causal else 1.0
    return sum(passes_mm * 2 * n_params * t + passes_attn * attn * 4 * n_layers * dim * t * t
               for t in (padded_to or lengths))


def random_slices(n, context, vocab, gen, every=10):
    """Random tokens, a Q position every `every` tokens, episodes of 8 actions (only the shapes matter)."""
    out = []
    for _ in range(n):
        qp = list(range(8, context - 2, every))
        last = [(i + 1) % 8 == 0 or i == len(qp) - 1 for i in range(len(qp))]
        out.append(dqn.Slice(tokens=torch.randint(0, vocab, (context,), generator=gen).tolist(),
                             q_positions=qp, actions=torch.randint(0, 4, (len(qp),), generator=gen).tolist(),
                             rewards=[float(x) for x in last], is_last=last,
                             next_index=[-1 if x else i + 1 for i, x in enumerate(last)]))
    return out


def build(args, device):
    """-> (cfg, model, adapter, target adapter, action ids, pad id, slices, what the slices are)."""
    overrides = dict(context_len=args.context, slices_per_step=args.slices, data_dir=args.data_dir,
                     device=str(device))
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if args.random_init:
        cfg = train.make_config("smollm2", **overrides)
        with torch.device("meta"):
            model = llama.Transformer(llama.ModelArgs(**SMOLLM2_135M))
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = model.to(dtype).to_empty(device=device)
        with torch.no_grad():
            for p in model.parameters():  # norms one, matrices N(0, 0.02): finite through 30 layers
                if p.dim() == 1:
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02)
        model.eval().requires_grad_(False)
        adapter = ia3.IA3(model)  # fp32 vectors on the base, as policy.build_policy
        gen = torch.Generator().manual_seed(0)
        slices = random_slices(cfg.slices_per_step, cfg.context_len, model.args.vocab_size, gen)
        return cfg, model, adapter, adapter.copy(), [10, 20, 30, 40], 0, slices, "random tokens and weights"
    cfg = train.make_config("smollm2", model_dir=args.model_dir, **overrides)
    model, adapter, _, target_adapter, tokenizer = policy.build_policy(cfg, device)
    fmt = policy.trajectory_format(cfg, tokenizer)
    sets = data.load_episode_sets(cfg, "heldout")
    packed = dqn.pack_slices(sets, fmt, cfg.context_len, random.Random(0))
    packed.sort(key=lambda s: -len(s.tokens))  # the fullest slices, as most training slices are
    slices = [packed[i % len(packed)] for i in range(cfg.slices_per_step)]
    return cfg, model, adapter, target_adapter, fmt.action_ids, fmt.eos[0], slices, "packed held-out episodes"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_train(cfg, model, adapter, target_adapter, action_ids, pad_id, slices, micro_batch, device, steps,
                warmup):
    on_cuda = device.type == "cuda"
    model.gradient_checkpointing = on_cuda  # as train.py
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if on_cuda else contextlib.nullcontext
    ids = torch.tensor(action_ids, device=device)
    parts = []
    for i in range(0, len(slices), micro_batch):
        group = slices[i:i + micro_batch]
        batch = {k: v.to(device) for k, v in dqn.collate(group, pad_id).items()}
        parts.append((batch, len(group) / len(slices)))
    adapter = adapter.copy().requires_grad_(True)  # a fresh online copy: the caller's stays as it was
    target = target_adapter.copy()
    trainable = list(adapter.parameters())
    nets = train.Networks(model, adapter, model, target, ids, None, autocast)  # θ and φ share the frozen base
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    try:
        for r in range(warmup + steps):
            sync(device)
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=False)
            for batch, share in parts:
                loss, _ = train.td_loss_on(batch, nets, cfg)
                (loss * share).backward()
            optimizer.step()
            dqn.polyak_update(target.parameters(), trainable, cfg.alpha)
            sync(device)
            if r >= warmup:
                times.append(time.perf_counter() - t0)
    finally:
        model.gradient_checkpointing = False
    if not torch.isfinite(loss):
        raise FloatingPointError(f"the benchmark's TD loss is {loss.item()}")
    lengths = [len(s.tokens) for s in slices]
    padded = [int(b["tokens"].shape[1]) for b, _ in parts for _ in range(b["tokens"].shape[0])]
    n = sum(p.numel() for p in model.layers.parameters() if p.dim() == 2)
    L, d = model.args.n_layers, model.args.dim
    useful = model_flops(lengths, n, L, d)
    seconds = statistics.median(times)
    return {"micro_batch": micro_batch, "slices": len(slices), "tokens": sum(lengths),
            "padded_tokens": sum(padded), "mean_slice_tokens": sum(lengths) / len(lengths),
            "gradient_checkpointing": on_cuda, "steps_timed": steps, "step_seconds": seconds,
            "step_seconds_all": times, "tokens_per_s": sum(lengths) / seconds, "model_flops_per_step": useful,
            "executed_flops_per_step": model_flops(lengths, n, L, d, padded_to=padded, recompute=on_cuda),
            "model_flops_per_step_causal": model_flops(lengths, n, L, d, causal=True),
            "achieved_flops": useful / seconds, "final_loss": loss.item(),
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if on_cuda else None}


@torch.inference_mode()
def bench_decode(model, adapter, device, context, n_tokens, repeats=3):
    """As evaluate.py plays (rollout.ModelPolicy): the weights in their dtype (bf16 on CUDA), no autocast."""
    context = max(1, min(context, model.args.max_seq_len - n_tokens))
    prompt = torch.randint(0, model.args.vocab_size, (1, context), generator=torch.Generator().manual_seed(1))
    prompt = prompt.to(device)

    def run(n):  # -> seconds per decoded token
        cache = model.new_cache(1, context + n)
        at = torch.tensor([[context - 1]], device=device)
        tok = model(prompt, 0, cache, adapter=adapter, logits_at=at)[:, -1].argmax(-1, keepdim=True)  # (1, 1)
        sync(device)
        t0 = time.perf_counter()
        for i in range(n):
            tok = model(tok, context + i, cache, adapter=adapter)[:, -1].argmax(-1, keepdim=True)
        sync(device)
        return (time.perf_counter() - t0) / n
    run(min(n_tokens, 8))  # warm-up: kernels, allocator
    per_token = min(run(n_tokens) for _ in range(repeats))
    a = model.args
    nbytes = lambda params: sum(p.numel() * p.element_size() for p in params)  # noqa: E731
    head = model.tok_embeddings.weight if model.output is None else model.output.weight
    weights = nbytes(model.layers.parameters()) + nbytes([head]) + nbytes(model.norm.parameters())
    weights += nbytes(adapter.parameters()) if adapter is not None else 0
    kv_elem = model.new_cache(1, 1).k[0].element_size()
    mean_len = context + (n_tokens + 1) / 2  # keys and values read by a decoded token, on average
    kv = 2 * a.n_layers * a.n_kv_heads * a.head_dim * mean_len * kv_elem
    return {"context": context, "tokens": n_tokens, "repeats": repeats, "ms_per_token": per_token * 1e3,
            "tokens_per_s": 1 / per_token, "weight_bytes": weights, "kv_bytes_per_token": kv,
            "bytes_per_token": weights + kv, "achieved_bandwidth": (weights + kv) / per_token}


def markdown(r):
    na = lambda x, f: "n/a" if x is None else f(x)  # noqa: E731
    m = r["model"]
    lines = [f"## bench_gpu: {r['device_name']} ({r['dtype']}, torch {r['torch']})", "",
             f"Model: {m['source']}; {m['block_params'] / 1e6:.1f}M block weights (N), "
             f"{m['total_params'] / 1e6:.1f}M in all, {m['n_layers']} layers, d {m['dim']}. Peak "
             f"{na(r['peak_flops'], lambda x: f'{x / 1e12:g} TFLOP/s')}, HBM "
             f"{na(r['hbm_bandwidth'], lambda x: f'{x / 1e12:g} TB/s')}.", "",
             "| micro-batch | slices x mean tokens | s/step (median) | tokens/s | model TFLOP/step | TFLOP/s "
             "| MFU | HFU (recompute, padding) | MFU (causal attention) | peak memory |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for t in r["train"]:
        if "error" in t:
            lines.append(f"| {t['micro_batch']} | failed: {t['error']} |")
            continue
        lines.append(f"| {t['micro_batch']} | {t['slices']} x {t['mean_slice_tokens']:.0f} "
                     f"| {t['step_seconds']:.4f} | {t['tokens_per_s']:.0f} "
                     f"| {t['model_flops_per_step'] / 1e12:.3g} | {t['achieved_flops'] / 1e12:.3g} "
                     f"| {na(t['mfu'], pct)} | {na(t['hfu'], pct)} | {na(t['mfu_causal'], pct)} "
                     f"| {na(t['peak_memory_gib'], '{:.1f} GiB'.format)} |")
    d = r["decode"]
    lines += ["", "| decode (batch 1) | context | ms/token | tokens/s | MB read/token | HBM-bound ms/token "
              "| measured / bound | achieved GB/s |", "|---|---|---|---|---|---|---|---|"]
    if "error" in d:
        lines.append(f"| failed: {d['error']} |")
    else:
        lines.append(f"| {d['tokens']} tokens | {d['context']} | {d['ms_per_token']:.3f} "
                     f"| {d['tokens_per_s']:.0f} | {d['bytes_per_token'] / 1e6:.1f} "
                     f"| {na(d['bound_ms'], '{:.4f}'.format)} | {na(d['ratio_to_bound'], '{:.1f}x'.format)} "
                     f"| {d['achieved_bandwidth'] / 1e9:.3g} |")
    lines += ["", "MFU counts the useful work (online forward, input-gradient backward, target forward; "
              "attention over the whole t×t square), HFU adds the checkpoint recompute and padding "
              "(formulas: benchmarks/bench_gpu.py's docstring). The decode bound is one read of every weight "
              "and of the KV cache per token; eager PyTorch launches about 15 kernels a layer, each short at "
              "batch 1."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", help="HF LLaMA checkpoint dir (the converted SmolLM2-135M)")
    p.add_argument("--random-init", action="store_true", help="SmolLM2-135M's shapes with random weights")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--context", type=int, default=None, help="tokens per slice (default: the preset's 4096)")
    p.add_argument("--slices", type=int, default=None, help="slices per step (default: the preset's 10)")
    p.add_argument("--micro-batch", default=None,
                   help="slices per forward, or several comma-separated (default: all the step's slices)")
    p.add_argument("--decode-context", type=int, default=1024, help="tokens in the KV cache before decoding")
    p.add_argument("--decode-tokens", type=int, default=64, help="tokens decoded one at a time")
    p.add_argument("--data-dir", default="runs/data", help="cache of the generated episodes (as train.py)")
    p.add_argument("--out", default="runs/bench_gpu.json", help="JSON file; the markdown beside it (.md)")
    a = p.parse_args(argv)
    if bool(a.model_dir) == a.random_init:
        p.error("give --model-dir DIR or --random-init")
    if min(a.steps, a.decode_tokens, a.decode_context) < 1 or a.warmup < 0:
        p.error("--steps, --decode-tokens and --decode-context must be at least 1, --warmup at least 0")
    device = policy.resolve_device(a.device)
    torch.manual_seed(0)
    cfg, model, adapter, target_adapter, action_ids, pad_id, slices, source = build(a, device)
    on_cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if on_cuda else platform.processor() or "cpu"
    peak = lookup(PEAK_BF16, name if on_cuda else None, "PEAK_FLOPS")
    bw = lookup(HBM_BW, name if on_cuda else None, "HBM_BW")
    micro = [int(m) for m in (a.micro_batch or str(len(slices))).split(",")]
    if any(m < 1 or len(slices) % m for m in micro):
        p.error(f"--micro-batch {a.micro_batch}: each must divide the {len(slices)} slices")
    rows, failed = [], False
    for m in micro:
        try:
            row = bench_train(cfg, model, adapter, target_adapter, action_ids, pad_id, slices, m, device,
                              a.steps, a.warmup)
        except (RuntimeError, FloatingPointError) as e:  # e.g. out of memory: report it, measure the rest
            rows.append({"micro_batch": m, "error": str(e).splitlines()[0][:200]})
            print(f"[bench_gpu] train micro-batch {m}: failed: {e}", file=sys.stderr)
            failed = True
            continue
        s = row["step_seconds"]
        for key, flops in (("mfu", "model_flops_per_step"), ("hfu", "executed_flops_per_step"),
                           ("mfu_causal", "model_flops_per_step_causal")):
            row[key] = row[flops] / s / peak if peak else None
        rows.append(row)
        print(f"[bench_gpu] train micro-batch {m}: {s:.4f} s/step, {row['tokens_per_s']:.0f} tok/s, "
              f"{row['achieved_flops'] / 1e12:.3g} TFLOP/s, MFU {'n/a' if peak is None else pct(row['mfu'])}",
              file=sys.stderr)
    try:
        dec = bench_decode(model, adapter, device, a.decode_context, a.decode_tokens)
        dec["bound_ms"] = dec["bytes_per_token"] / bw * 1e3 if bw else None
        dec["ratio_to_bound"] = dec["ms_per_token"] / dec["bound_ms"] if bw else None
        print(f"[bench_gpu] decode: {dec['ms_per_token']:.3f} ms/token at context {dec['context']}, HBM "
              f"bound {'n/a' if bw is None else format(dec['bound_ms'], '.4f') + ' ms'}", file=sys.stderr)
    except RuntimeError as e:
        dec, failed = {"error": str(e).splitlines()[0][:200]}, True
        print(f"[bench_gpu] decode: failed: {e}", file=sys.stderr)
    args = model.args
    report = {"device": str(device), "device_name": name, "torch": torch.__version__,
              "dtype": "bfloat16" if on_cuda else "float32", "peak_flops": peak, "hbm_bandwidth": bw,
              "model": {"source": source, "model_dir": a.model_dir, "dim": args.dim,
                        "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
                        "ffn_dim": args.ffn_dim,
                        "vocab_size": args.vocab_size,
                        "block_params": sum(p.numel() for p in model.layers.parameters() if p.dim() == 2),
                        "total_params": sum(p.numel() for p in model.parameters())},
              "context": cfg.context_len, "train": rows, "decode": dec}
    out = Path(a.out)
    checkpoint.atomic_write_text(out, json.dumps(report, indent=1))
    checkpoint.atomic_write_text(out.with_suffix(".md"), markdown(report))
    print(markdown(report))
    best = min((t for t in rows if "error" not in t), key=lambda t: t["step_seconds"], default=None)
    if best is not None:
        print(f"[bench_gpu] {out}: fastest step {best['step_seconds']:.4f} s (micro-batch "
              f"{best['micro_batch']}), MFU {'n/a' if peak is None else pct(best['mfu'])}; decode "
              f"{dec.get('ms_per_token', float('nan')):.3f} ms/token, "
              f"{'n/a' if dec.get('ratio_to_bound') is None else format(dec['ratio_to_bound'], '.1f')}x the "
              f"HBM bound", file=sys.stderr)
    if failed:
        sys.exit("bench_gpu.py: a measurement failed (see the table)")
    return report


if __name__ == "__main__":
    main()
