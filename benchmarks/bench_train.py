"""Training throughput of train.py's step vs the same step written with transformers (+ PEFT for IA3).

One step = what train.py does per micro-batch and optimizer step: online Q-values at the action positions (with
grad), target Q-values (no grad), double-DQN targets, TD loss, backward, AdamW, Polyak. Same random slices, same
shapes, same process, runs interleaved (ours, theirs, ours, ...) so machine load hits both alike; median of the
repeats. Rows:
  full  - the cpu preset's model: all weights of the small random-init LLaMA trained; target = a deepcopy.
  ia3   - the IA3 presets' step on the same shape: frozen base, IA3 online + target adapter
          (ours: two IA3 objects on one model; PEFT: two named adapters, switched with set_adapter).
  default - ours only: the step `python train.py` runs (train.td_loss_on: the same double-DQN targets plus the cpu
          preset's next-token loss and facts target, gradient clipping, AdamW, the target's Polyak) on the model
          train.py builds (its composed embedding included), same batch.
          transformers has no such step to compare with; the row shows what the default's extras cost.
  gpu   - ours only: the llama3.1-8b preset's step on an 8B-shaped model (llama.ModelArgs() defaults, random bf16
          weights, fp32 IA3) at 4096 tokens, gradient checkpointing + bf16 autocast as train.py on CUDA, with MFU.
          Only on CUDA (skipped, and said so, without one).
Usage: python benchmarks/bench_train.py [--repeats 3] [--write] [--peak-tflops 989]
       (--write: the `## train.py` part of RESULTS.md; --peak-tflops: the GPU's dense bf16 peak, H100 SXM 989)
"""
import argparse
import contextlib
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import dqn  # noqa: E402
import ia3  # noqa: E402
import llama  # noqa: E402
import policy  # noqa: E402
import train  # noqa: E402
from benchmarks.results import write_section  # noqa: E402


def random_batch(cfg, vocab, n_slices, gen, every=10):
    """Slices like the real data: one Q position every `every` tokens (the paper's text: ~10; the compact format
    with its recap: ~3), episodes of ~8 actions, and the facts target's labels (B, P, 4). The values are random;
    the cost of a step depends only on the shapes."""
    T, slices = cfg.context_len, []
    for _ in range(n_slices):
        qp = list(range(8, T - 2, every))
        n = len(qp)
        last = [(i + 1) % 8 == 0 or i == n - 1 for i in range(n)]
        slices.append(dqn.Slice(tokens=torch.randint(0, vocab, (T,), generator=gen).tolist(), q_positions=qp,
                                actions=torch.randint(0, 4, (n,), generator=gen).tolist(),
                                rewards=[float(lst) for lst in last], is_last=last,
                                next_index=[-1 if lst else i + 1 for i, lst in enumerate(last)]))
    batch = dqn.collate(slices, 0)
    batch["facts"] = torch.randint(0, 3, batch["actions"].shape + (4,), generator=gen)
    return batch


def our_step(model, adapter, target, target_adapter, optimizer, batch, ids, cfg, autocast=contextlib.nullcontext):
    with autocast():  # as train.td_loss_on: forward passes and loss under autocast, backward outside
        q = dqn.q_values(model, batch["tokens"], batch["q_positions"], ids, adapter)
        with torch.no_grad():
            qt = dqn.q_values(target, batch["tokens"], batch["q_positions"], ids, target_adapter)
        loss = dqn.td_loss(q, dqn.bellman_targets(q, qt, batch, cfg.gamma, cfg.reward_scale), batch)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    dqn.polyak_update((target_adapter or target).parameters(), (adapter or model).parameters(), cfg.alpha)


def default_step(nets, optimizer, batch, cfg):
    """The cpu preset's step as train.train runs it, on one micro-batch (nets: train.Networks)."""
    loss, aux = train.td_loss_on(batch, nets, cfg)
    optimizer.zero_grad()
    weights = {"next_token_loss": cfg.aux_lm, "facts_loss": cfg.aux_facts}
    (loss + sum(weights[k] * v for k, v in aux.items())).backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(nets.model.parameters(), cfg.grad_clip)
    optimizer.step()
    dqn.polyak_update(nets.target.parameters(), nets.model.parameters(), cfg.alpha)


def hf_twin(ours):
    """transformers' LlamaForCausalLM with our model's config and weights."""
    import transformers
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in ours.args.to_hf_config().items() if k != "architectures"})
    hf = transformers.LlamaForCausalLM(hf_cfg)
    hf.load_state_dict({llama.hf_names(ours.args)[k]: v for k, v in ours.state_dict().items()}, strict=False)
    return hf


def hf_q(model, batch, ids):
    """Q with transformers: the decoder's hidden states, gathered at the Q positions, times 4 LM-head rows."""
    inner = model.get_base_model().model if hasattr(model, "get_base_model") else model.model
    head = model.get_output_embeddings().weight
    h = inner(input_ids=batch["tokens"]).last_hidden_state  # (B, T, dim), final norm applied
    h = h.gather(1, batch["q_positions"][..., None].expand(-1, -1, h.shape[-1]))
    return (h @ head[ids].T).float()


def hf_step(model, target, optimizer, batch, ids, cfg, peft_params=None):
    q = hf_q(model, batch, ids)
    with torch.no_grad():
        if peft_params is None:
            qt = hf_q(target, batch, ids)
        else:  # PEFT: one model, the target is a second named adapter
            model.set_adapter("target")
            qt = hf_q(model, batch, ids)
            model.set_adapter("default")
    loss = dqn.td_loss(q, dqn.bellman_targets(q, qt, batch, cfg.gamma, cfg.reward_scale), batch)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if peft_params is None:
        dqn.polyak_update(target.parameters(), model.parameters(), cfg.alpha)
    else:
        dqn.polyak_update(*peft_params, cfg.alpha)


def bench_cpu(repeats):
    cfg = train.make_config("cpu")
    tok = policy.small_tokenizer(cfg.format)  # the cpu preset's vocabulary (compact format: 1710 tokens)
    ours = policy.small_model(cfg, tok.n_words)
    rows, gen = [], torch.Generator().manual_seed(0)
    batch = random_batch(cfg, tok.n_words, cfg.micro_batch, gen, every=3 if cfg.format == "compact" else 10)
    fmt = policy.trajectory_format(cfg, tok)
    ids = torch.tensor(fmt.action_ids)
    tokens = batch["tokens"].numel()
    for kind in ("full", "ia3", "default"):
        if kind == "default":  # as train.py builds it: with --compose, the composed embedding
            model = policy.small_model(cfg, tok.n_words, tok.special_tokens)
            nets = train.Networks(model, None, copy.deepcopy(model).requires_grad_(False), None, ids, fmt.ids)
            opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
            times = []
            for r in range(repeats + 1):  # the first round warms up
                t0 = time.perf_counter()
                default_step(nets, opt, batch, cfg)
                if r:
                    times.append(time.perf_counter() - t0)
            ours_tps = tokens / statistics.median(times)
            rows.append((kind, f"{cfg.micro_batch}x{cfg.context_len}", ours_tps, None, None))
            print(f"{kind:5s} {cfg.micro_batch}x{cfg.context_len}: ours {ours_tps:7.0f} tok/s "
                  f"(double-DQN targets, next-token loss weight {cfg.aux_lm:g}, facts target weight "
                  f"{cfg.aux_facts:g}; no transformers counterpart)")
            continue
        model = copy.deepcopy(ours)
        hf = hf_twin(ours)
        if kind == "full":
            adapter = target_adapter = None
            target = copy.deepcopy(model).requires_grad_(False)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, foreach=True)
            hf_target = copy.deepcopy(hf).requires_grad_(False)
            hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-3, weight_decay=0.01, foreach=True)
            ours_fn = lambda: our_step(model, None, target, None, opt, batch, ids, cfg)  # noqa: E731
            theirs_fn = lambda: hf_step(hf, hf_target, hf_opt, batch, ids, cfg)  # noqa: E731
        else:
            import peft
            model.requires_grad_(False)
            adapter = ia3.IA3(model)
            target_adapter = adapter.copy()
            opt = torch.optim.AdamW(adapter.parameters(), lr=1e-2, weight_decay=0.01, foreach=True)
            pcfg = peft.IA3Config(task_type="CAUSAL_LM")
            pm = peft.get_peft_model(hf, pcfg)
            pm.add_adapter("target", pcfg)
            pm.set_adapter("default")
            named = dict(pm.named_parameters())
            online = [p for n, p in named.items() if "ia3_l.default" in n]
            tgt = [named[n.replace("ia3_l.default", "ia3_l.target")] for n, p in named.items() if "ia3_l.default" in n]
            hf_opt = torch.optim.AdamW(online, lr=1e-2, weight_decay=0.01, foreach=True)
            ours_fn = lambda: our_step(model, adapter, model, target_adapter, opt, batch, ids, cfg)  # noqa: E731
            theirs_fn = lambda: hf_step(pm, None, hf_opt, batch, ids, cfg, (tgt, online))  # noqa: E731
        times = {"ours": [], "theirs": []}
        for r in range(repeats + 1):  # the first round warms up
            for name, fn in (("ours", ours_fn), ("theirs", theirs_fn)):
                t0 = time.perf_counter()
                fn()
                if r:
                    times[name].append(time.perf_counter() - t0)
        ours_tps = tokens / statistics.median(times["ours"])
        theirs_tps = tokens / statistics.median(times["theirs"])
        # ratio of back-to-back pairs: load that drifts over seconds cancels out (this machine is shared)
        ratio = statistics.median(t / o for o, t in zip(times["ours"], times["theirs"]))
        rows.append((kind, f"{cfg.micro_batch}x{cfg.context_len}", ours_tps, theirs_tps, ratio))
        print(f"{kind:5s} {cfg.micro_batch}x{cfg.context_len}: ours {ours_tps:7.0f} tok/s, transformers"
              f"{' + PEFT' if kind == 'ia3' else ''} {theirs_tps:7.0f} tok/s, ratio {ratio:.2f} (ours / theirs)")
    return rows


def bench_gpu(repeats, peak_tflops, n_tokens=4096):
    """The llama3.1-8b preset's IA3 step on an 8B-shaped model with random weights (no download needed: speed does
    not depend on the values). Returns a line of text for the report."""
    if not torch.cuda.is_available():
        return "GPU 8B-shaped IA3 step (4096 tokens, bf16, MFU): skipped, no CUDA device in this run"
    cfg = copy.copy(train.make_config("cpu"))  # gamma, reward_scale, alpha as in every preset
    cfg.context_len = n_tokens
    with torch.device("meta"):
        model = llama.Transformer(llama.ModelArgs())  # Llama 3.1 8B's shapes
    model = model.to(torch.bfloat16).to_empty(device="cuda")  # bf16 straight onto the GPU, no fp32 copy
    with torch.no_grad():
        for p in model.parameters():  # norms = ones, matrices N(0, 0.02): finite activations through 32 layers
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    model.eval().requires_grad_(False)
    model.gradient_checkpointing = True
    adapter = ia3.IA3(model)  # fp32 vectors on the bf16 base, as policy.build_policy
    target_adapter = adapter.copy()
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-2, weight_decay=0.01, foreach=True)
    batch = random_batch(cfg, model.args.vocab_size, 1, torch.Generator().manual_seed(0))
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    ids = torch.tensor([10, 20, 30, 40], device="cuda")  # 4 action words; which rows does not change the cost
    autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    times = []
    for r in range(repeats + 1):  # the first step warms up (kernels, allocator)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        our_step(model, adapter, model, target_adapter, opt, batch, ids, cfg, autocast)
        torch.cuda.synchronize()
        if r:
            times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    # N = the blocks' weights (6.98e9). Embedding lookup costs no FLOPs and the LM head multiplies only 4 rows, so
    # both are left out. Attention's QK^T and AV (sequence-length dependent) are not counted either.
    n = sum(p.numel() for p in model.layers.parameters())
    mfu = 6 * n * n_tokens / seconds / (peak_tflops * 1e12)
    hfu = 8 * n * n_tokens / seconds / (peak_tflops * 1e12)
    return (f"GPU 8B-shaped IA3 step on {torch.cuda.get_device_name()} (1x{n_tokens} tokens, bf16 base, fp32 IA3, "
            f"gradient checkpointing, median of {repeats}): {seconds:.3f} s/step, {n_tokens / seconds:.0f} tok/s, "
            f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB; MFU {mfu:.1%} by the 6·N·tokens "
            f"convention (N = {n / 1e9:.2f}e9 block weights, peak {peak_tflops:g} TFLOP/s). The frozen base computes "
            f"no weight gradients but does run the target forward and the checkpointed recompute, about 8·N·tokens "
            f"of matmuls executed: {hfu:.1%} of peak")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--write", action="store_true", help="write the `## train.py` section of benchmarks/RESULTS.md")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="the GPU's dense bf16 peak for MFU (H100 SXM: 989)")
    a = p.parse_args()
    torch.manual_seed(0)
    load_before = os.getloadavg()[0]
    rows = bench_cpu(a.repeats)
    cfg = train.make_config("cpu")
    ours_dim, ours_layers, vocab = cfg.dim, cfg.n_layers, policy.small_tokenizer(cfg.format).n_words
    load_after = os.getloadavg()[0]
    gpu_line = bench_gpu(a.repeats, a.peak_tflops)
    print(gpu_line)
    if a.write:
        lines = ["## train.py", "",
                 f"`python benchmarks/bench_train.py --repeats {a.repeats}`: one training step (online Q with grad, "
                 "target Q, double-DQN targets, TD loss, backward, AdamW, Polyak) of the cpu preset's shape "
                 "(d{}, {} layers, {}-token vocabulary), float32 on CPU ({} threads, {} cores), median of the repeats, "
                 "ours and transformers interleaved in one process; `default`: the step `python train.py` runs "
                 "(the same targets plus its next-token loss and facts target, clipping, on the model train.py builds: "
                 "the composed embedding included), ours only.".format(
                     ours_dim, ours_layers, vocab, torch.get_num_threads(), os.cpu_count()),
                 "", "| step | batch | ours tok/s | transformers (+ PEFT) tok/s | ratio (median of paired runs) |",
                 "|---|---|---|---|---|"]
        lines += [f"| {k} | {b} | {o:.0f} | {'–' if t is None else f'{t:.0f}'} | {'–' if r is None else f'{r:.2f}'} |"
                  for k, b, o, t, r in rows]
        ratios = [r for *_, r in rows if r is not None]
        lines += ["", f"Ratio = ours' speed / theirs, the median over back-to-back pairs of runs (load that drifts "
                  f"over seconds hits both alike); in this run {min(ratios):.2f} to {max(ratios):.2f} over the "
                  f"{len(ratios)} compared rows. 1-minute load average {load_before:.1f} before and {load_after:.1f} after the "
                  f"CPU rows (the absolute tok/s depend on it). `tests/test_train.py::"
                  "test_bench_train_times_the_same_step_on_both_sides` runs the script on a tiny model and checks "
                  "that both sides compute the same Q-values.", "", f"{gpu_line}.", ""]
        write_section("## train.py", lines)


if __name__ == "__main__":
    main()
