"""Why greedy episodes fail: replays evaluate.py's schedule for a trained run and classifies every step of the greedy
episodes 20-29 by what the context before it (all earlier episodes of the lake and the current one so far) shows
about the move taken, with planner.ContextModel: untried, a known bump into the lake's edge (the state does not
change), a known move onto the ice, a known hole or a known goal. Also how each episode ends: the goal, a hole
(known or untried), or the step limit (a loop). Lakes are split by whether the warm-up (episodes 0-19) ever reached
the goal. Then, for the greedy episodes that loop on warm-up-solved lakes, how far each step's state is from a known
goal (in known moves) and whether the move is the context planner's. An analysis, not a benchmark; the README's
Results quote its output.

    python benchmarks/failure_modes.py --run runs/cpu --experiment ood
"""
import argparse
import collections
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import evaluate  # noqa: E402
import planner  # noqa: E402
import train  # noqa: E402


def classify(res):
    steps = {True: collections.Counter(), False: collections.Counter()}  # warm-up solved? -> kind -> greedy steps
    ends = {True: collections.Counter(), False: collections.Counter()}
    for r in range(len(res["success"])):
        lake, solved = planner.ContextModel(), any(res["success"][r][:20])
        for k, (path, actions) in enumerate(zip(res["paths"][r], res["actions"][r])):
            truncated, last_kind = res["truncated"][r][k], None
            for t, a in enumerate(actions):
                s, known = path[t], lake.moves.get((path[t], a))
                last_kind = ("untried" if known is None else "edge" if known == s else
                             ("goal" if lake.ends[known] > 0 else "hole") if known in lake.ends else "ice")
                if k >= 20:
                    steps[solved][last_kind] += 1
                end = t == len(actions) - 1
                lake.learn(s, a, path[t + 1], end and not truncated, res["success"][r][k] if end else 0.0)
            if k >= 20:
                outcome = "loop" if truncated else "goal" if res["success"][r][k] else "hole"
                how = "known" if last_kind in ("goal", "hole") else last_kind  # the last move, as the context knew it
                ends[solved][outcome if outcome == "loop" else f"{outcome} ({how})"] += 1
    return steps, ends


LOOP_BUCKETS = ("none", "0", "1", "2", "3-5", "6+")


def loop_steps(res, gamma=0.9, untried=0.9 ** 8):
    """The greedy episodes that hit the step limit on lakes the warm-up solved: their steps by how many known moves
    separate the state from a known goal-entering move (planner.ContextModel.goal_hops; "none": no known path), and
    whether the move taken has the context planner's best value (the default's --untried-steps 8).
    -> (looping episodes, Counter{(bucket, on the planner's best move): steps})."""
    steps, episodes = collections.Counter(), 0
    for r in range(len(res["success"])):
        lake, solved = planner.ContextModel(), any(res["success"][r][:20])
        for k, (path, actions) in enumerate(zip(res["paths"][r], res["actions"][r])):
            truncated = res["truncated"][r][k]
            looping = k >= 20 and solved and truncated
            episodes += looping
            for t, a in enumerate(actions):
                s = path[t]
                if looping:
                    d = lake.goal_hops().get(s)
                    bucket = "none" if d is None else str(d) if d <= 2 else "3-5" if d <= 5 else "6+"
                    q = lake.q(s, gamma, untried)
                    steps[bucket, q[a] >= max(q) - 1e-9] += 1
                end = t == len(actions) - 1
                lake.learn(s, a, path[t + 1], end and not truncated, res["success"][r][k] if end else 0.0)
    return episodes, steps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="train.py run dir")
    p.add_argument("--experiment", default="id", choices=("id", "ood"))
    args = p.parse_args(argv)
    cfg = evaluate.EvalConfig(run=args.run, experiment=args.experiment)
    model, adapter, _, fmt = train.load_policy(args.run)
    maps, probs, _ = evaluate.experiment_setup(args.experiment, cfg)
    res = evaluate.run_episodes(evaluate.ModelPolicy(model, fmt, adapter), maps, probs, seed=cfg.seed)
    steps, ends = classify(res)
    print(f"| {args.run}, {args.experiment} | lakes | greedy steps: untried / edge / ice / hole / goal | episodes end |")
    print("|---|---|---|---|")
    for solved in (True, False):
        n = sum(any(row[:20]) == solved for row in res["success"])
        kinds = " / ".join(str(steps[solved][k]) for k in ("untried", "edge", "ice", "hole", "goal"))
        endings = ", ".join(f"{k} {v}" for k, v in sorted(ends[solved].items()))
        print(f"| warm-up {'solved' if solved else 'unsolved'} | {n} | {kinds} | {endings} |")
    episodes, loops = loop_steps(res)
    print(f"\nLoops on warm-up-solved lakes: {episodes} greedy episodes at the step limit; their steps by known moves "
          "from the state to a known goal entry, and on / off the context planner's best move")
    print("| known moves to a goal entry | " + " | ".join(LOOP_BUCKETS) + " |")
    print("|---|" + "---|" * len(LOOP_BUCKETS))
    for on in (True, False):
        print(f"| {'on' if on else 'off'} the planner's best | " + " | ".join(str(loops[b, on]) for b in LOOP_BUCKETS)
              + " |")


if __name__ == "__main__":
    main()
