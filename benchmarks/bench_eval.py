"""Evaluation speed: environment steps per second of evaluate.py's model path, KV-cached + batched vs recompute.

The workload is the paper's protocol on the 50 held-out maps × 30 episodes (rollout.run_episodes, warm-up schedule)
with the cpu preset's model (policy.small_model: 4 layers, width 128, 1024-token context), with random weights (the
speed does not depend on them, but a random policy loops to the 100-step limit, so contexts are long and overflow
often: a heavy case) and, with --run RUN, also a trained checkpoint (policy.load_policy), each in one table.

1. The cached + batched path plays the whole 50 × 30 protocol; steps/s = environment steps / seconds.
2. The recompute path (whole context of every row at every step) is time-boxed on a subset of the maps (--slow-maps):
   it plays the protocol on them until --slow-seconds have passed; then the cached path replays exactly that many
   batched steps on the same maps, so both are timed on the same work (the same actions: tests/test_evaluate.py
   checks that the two paths agree).

    python benchmarks/bench_eval.py [--run runs/cpu] [--slow-maps 5] [--slow-seconds 120] [--threads 1] [--write]

--write replaces the `## evaluate.py` section of benchmarks/RESULTS.md (benchmarks/results.py).

On a shared machine use --threads 1: two torch threads on two busy cores spin against each other (10-50× slower).
"""
import argparse
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import frozenlake  # noqa: E402
import policy  # noqa: E402
import rollout  # noqa: E402
from benchmarks.results import write_section  # noqa: E402


class StopAfter(Exception):
    pass


class Budget:
    """Wraps a policy: counts environment steps and stops the run after `calls` batched steps or `seconds`."""

    def __init__(self, policy, calls=None, seconds=None):
        self.policy, self.calls, self.seconds = policy, calls, seconds
        self.name, self.n_calls, self.steps = policy.name, 0, 0

    def reset(self, n_rows):
        self.policy.reset(n_rows)
        self.start = time.perf_counter()

    def add_context(self, row, episode):
        self.policy.add_context(row, episode)

    def greedy_actions(self, rows, maps, episodes):
        if self.n_calls == self.calls or (self.seconds and time.perf_counter() - self.start > self.seconds):
            raise StopAfter
        self.n_calls += 1
        return self.policy.greedy_actions(rows, maps, episodes)

    def observe(self, row, episode, terminated, done):
        self.steps += 1
        self.policy.observe(row, episode, terminated, done)


def timed(policy, maps, probs, calls=None, seconds=None):
    budget = Budget(policy, calls, seconds)
    t0 = time.perf_counter()
    try:
        rollout.run_episodes(budget, maps, probs, seed=0)
    except StopAfter:
        pass
    return budget.steps, budget.n_calls, time.perf_counter() - t0


def measure(model, adapter, fmt, maps, probs, args) -> dict:
    """The three timings of one model: the full cached run, the time-boxed recompute run, the cached replay of it."""
    fast = rollout.ModelPolicy(model, fmt, adapter)
    steps, calls, seconds = timed(fast, maps, probs)
    print(f"cached+batched, {len(maps)} maps, full run: {steps} steps in {calls} batched steps, {seconds:.1f} s, "
          f"{steps / seconds:.0f} steps/s, {fast.overflows} context overflows")
    subset = maps[:args.slow_maps]
    s_steps, s_calls, s_seconds = timed(rollout.RecomputePolicy(model, fmt, adapter), subset, probs,
                                        seconds=args.slow_seconds)
    print(f"recompute, {len(subset)} maps, time-boxed: {s_steps} steps in {s_calls} batched steps, {s_seconds:.1f} s, "
          f"{s_steps / s_seconds:.1f} steps/s")
    p_steps, p_calls, p_seconds = timed(rollout.ModelPolicy(model, fmt, adapter), subset, probs, calls=s_calls)
    assert p_steps == s_steps, "the two paths did not play the same steps"
    print(f"cached+batched, the same steps: {p_steps} steps, {p_seconds:.2f} s, {p_steps / p_seconds:.0f} steps/s")
    return {"rows": [("cached + batched", f"{len(maps)} maps × {len(probs)} episodes (whole run; {fast.overflows} "
                      "re-prefills)", steps, seconds),
                     ("recompute every step (no cache, maps batched)", f"{len(subset)} maps, first {s_calls} batched "
                      f"steps (time box {args.slow_seconds:.0f} s)", s_steps, s_seconds),
                     ("cached + batched", f"{len(subset)} maps, the same {p_calls} batched steps", p_steps, p_seconds)],
            "headline": (steps / seconds) / (s_steps / s_seconds),   # the full run against the recompute rate
            "same_work": (p_steps / p_seconds) / (s_steps / s_seconds), "limit": fast.limit,
            "params": sum(q.numel() for q in model.parameters())}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", help="also time this train.py run's trained checkpoint (the cpu preset's model with "
                                 "random weights is always timed)")
    p.add_argument("--slow-seconds", type=float, default=120.0, help="time box of the recompute path")
    p.add_argument("--slow-maps", type=int, default=5, help="maps the recompute path (and its comparison) plays")
    p.add_argument("--maps", type=int, default=50)
    p.add_argument("--episodes", type=int, default=30)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--write", action="store_true", help="replace the `## evaluate.py` section of benchmarks/RESULTS.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import train
    models = []
    if args.run:
        model, adapter, _, fmt = policy.load_policy(args.run, device=args.device)
        models.append((f"trained (`--run {args.run}`)", "trained", model, adapter, fmt))
    cfg = train.make_config("cpu")  # its format (recap, canvas) and vocabulary, as `python train.py` builds them
    tokenizer = policy.small_tokenizer(cfg.format)
    model = policy.small_model(cfg, tokenizer.n_words, tokenizer.special_tokens).eval().to(args.device)
    models.append(("random weights", "random", model, None, policy.trajectory_format(cfg, tokenizer)))
    maps = [[m] for m in frozenlake.test_maps()[:args.maps]]
    probs = rollout.schedule(args.episodes)

    results = []
    for name, short, model, adapter, fmt in models:
        print(f"[{name}]")
        results.append((name, short, measure(model, adapter, fmt, maps, probs, args)))
    first = results[0][2]
    where = args.device if args.device != "cpu" else f"{args.threads} torch thread(s) on {platform.machine()}"
    table = ["## evaluate.py", "",
             f"Environment steps per second of the evaluation protocol (held-out maps, the paper's warm-up schedule, "
             f"non-slippery, 100-step limit), the cpu preset's model ({first['params'] / 1e6:.2f}M parameters, context "
             f"{first['limit']} tokens), {where}, torch {torch.__version__}.", "",
             "| model | path | steps measured | env steps | seconds | steps/s |", "|---|---|---|---|---|---|"]
    for name, _, r in results:
        table += [f"| {name if i == 0 else ''} | {path} | {what} | {n} | {t:.1f} | {n / t:.0f} |"
                  for i, (path, what, n, t) in enumerate(r["rows"])]
    table += ["", "Speed-up of the full cached run over the recompute rate (target ≥ 10×): "
              + ", ".join(f"**{r['headline']:.1f}×** {short}" for _, short, r in results)
              + f". On the same work (the {args.slow_maps} maps' first batched steps): "
              + ", ".join(f"{r['same_work']:.1f}× {short}" for _, short, r in results) + ". A random policy loops to the "
              "100-step limit, so its contexts are long and overflow often (the heavy case); a trained one finishes "
              "in few steps, where recomputing costs little and the per-step Python work is the same on both paths.",
              "", "Command: `python benchmarks/bench_eval.py " + " ".join(a for a in sys.argv[1:] if a != "--write")
              + "`. `--threads 1`: with 2 torch threads on two busy cores the same run was 6× slower (thread spinning).",
              ""]
    print("\n".join(table))
    if args.write:
        write_section("## evaluate.py", table)


if __name__ == "__main__":
    main()
