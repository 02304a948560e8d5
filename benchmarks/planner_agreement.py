"""How often a trained run's greedy move has the context planner's value, on the held-out slices (the training
distribution, no evaluation needed): a quick screen for a change to the data or targets before a full evaluate.py.
Positions are split by what the slice shows before them: no success yet, a success but no known path worth more than
an untried move (the planner still explores), a goal path known. Also the model's mean value of untried moves before
any success, against their target 30·u. An analysis, not a benchmark; the README's Results quote its output.

    python benchmarks/planner_agreement.py runs/cpu runs/other
"""
import argparse
import collections
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import dqn  # noqa: E402
import train  # noqa: E402

KINDS = ("before any success", "explore after a success", "goal path known")


def score(slices: list[dqn.Slice], q: list[torch.Tensor], u: float) -> tuple[dict, list[float]]:
    """slices with planner values, q[i] the model's (actions, 4) Q of slice i ->
    ({kind: (positions, share whose greedy move has the planner's best value)}, untried Q before any success)."""
    counts, untried = collections.defaultdict(lambda: [0, 0]), []
    for sl, qs in zip(slices, q):
        won = False
        for p, values in enumerate(sl.planner_q):
            kind = KINDS[0] if not won else KINDS[1] if max(values) <= u + 1e-9 else KINDS[2]
            counts[kind][0] += 1
            counts[kind][1] += values[int(qs[p].argmax())] >= max(values) - 1e-9
            if not won:
                untried += [qs[p, a].item() for a in range(4)
                            if sl.settled[p][a] and not sl.hopped[p][a] and abs(values[a] - u) < 1e-9]
            won |= sl.is_last[p] and sl.rewards[p] > 0
    return {k: (n, hit / n) for k, (n, hit) in counts.items()}, untried


def agreement(run: str) -> tuple[dict, list[float], float]:
    """score() of a trained run on its held-out slices, and its untried value u."""
    cfg = train.saved_config(train.checkpoint_dir(run))
    if cfg.targets not in ("optimistic", "planner"):
        raise SystemExit(f"{run}: --targets {cfg.targets} has no planner values; this needs optimistic or planner")
    model, adapter, _, fmt = train.load_policy(run)
    slices = train.heldout_slices(cfg, fmt)
    q, action_ids = [], torch.tensor(fmt.action_ids)
    with torch.no_grad():
        for i in range(0, len(slices), 4):
            batch = dqn.collate(slices[i:i + 4], fmt.eos[0])
            qs = dqn.q_values(model, batch["tokens"], batch["q_positions"], action_ids, adapter)  # (B, P, 4)
            q += [qs[b, :len(sl.actions)] for b, sl in enumerate(slices[i:i + 4])]
    u = cfg.gamma ** cfg.untried_steps
    return (*score(slices, q, u), u)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="train.py run dirs (or checkpoint dirs)")
    args = ap.parse_args(argv)
    print("| run | " + " | ".join(KINDS) + " | untried Q before any success (target) |")
    print("|---|" + "---|" * (len(KINDS) + 1))
    for run in args.runs:
        shares, untried, u = agreement(run)
        cells = [f"{shares[k][1]:.3f} ({shares[k][0]})" if k in shares else "–" for k in KINDS]
        mean = sum(untried) / max(len(untried), 1)
        print(f"| {run} | " + " | ".join(cells) + f" | {mean:.2f} ({30 * u:.2f}) |")


if __name__ == "__main__":
    main()
