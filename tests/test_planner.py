"""planner.py: the context model's Q-values by hand and against plain value iteration on the same learned model, the
latest-evidence rule, its move facts against the true lake, and the planner baseline under the paper's warm-up
schedule (arXiv 2501.14176, §4.1) against tabular Q-learning."""
import random

import pytest

import baselines
import frozenlake
import planner
import rollout
from dqn import Episode

G, U = 0.9, 0.9 ** 8
LEFT, DOWN, RIGHT, UP = 0, 1, 2, 3


def test_q_by_hand():
    """A 1 x 4 corridor 0 1 2 3 with the goal at 3, a hole below 1 (state 5 of a 2-row map): one episode went
    0 → 1 (right) → 5 (down, hole), another 0 → 1 → 2 → 3 (goal)."""
    lake = planner.ContextModel()
    assert lake.q(0, G, U) == [U] * 4  # nothing known: every move untried
    lake.learn_episode(Episode([0, 1, 5], [RIGHT, DOWN], [0.0, 0.0]))
    # at 1: down is a hole (0); right, left, up untried (U); at 0: right leads to 1, whose best is U
    assert lake.q(1, G, U) == pytest.approx([U, 0.0, U, U])
    assert lake.q(0, G, U) == pytest.approx([U, U, G * U, U])
    lake.learn_episode(Episode([0, 1, 2, 3], [RIGHT, RIGHT, RIGHT], [0.0, 0.0, 1.0]))
    assert lake.q(2, G, U)[RIGHT] == pytest.approx(1.0)      # enters the goal
    assert lake.q(1, G, U) == pytest.approx([U, 0.0, G, U])  # right: γ · V(2) = γ · 1
    assert lake.q(0, G, U)[RIGHT] == pytest.approx(G * G)    # the known path beats exploring (U = 0.43 < 0.81)
    # a wall: "left" at 0 stays at 0, worth γ · V(0)
    lake.learn(0, LEFT, 0, False, 0.0)
    assert lake.q(0, G, U)[LEFT] == pytest.approx(G * max(G * G, U))
    # optimism wins when the known path is long: with U close to 1, untried moves beat a goal 2 steps away
    assert max(lake.q(0, G, 0.95)) == pytest.approx(0.95)
    assert lake.q(0, G, 0.95)[RIGHT] == pytest.approx(G * 0.95)  # replanned for the new optimism: V(1) = 0.95 now
    assert lake.q(0, G, U)[RIGHT] == pytest.approx(G * G)        # and back


def value_iteration(lake, gamma, untried, sweeps=200):
    """The reference: Q(s, a) = untried if unknown, r at a terminal, else γ max Q(s', ·), iterated to convergence."""
    states = {s for s, _ in lake.moves} | set(lake.moves.values())
    v = {s: 0.0 for s in states}
    for _ in range(sweeps):
        q = {s: [untried if (s, a) not in lake.moves else lake.ends[lake.moves[s, a]]
                 if lake.moves[s, a] in lake.ends else gamma * v[lake.moves[s, a]] for a in range(4)] for s in states}
        v = {s: max(q[s]) for s in states}
    return q


def random_play(desc, episodes, seed, max_steps=30):
    """Uniformly random episodes on a real map: every step as (s, a, s', reward, terminated)."""
    rng, env = random.Random(seed), frozenlake.FrozenLake(desc, max_steps=max_steps)
    for _ in range(episodes):
        s, _ = env.reset(seed=rng.randrange(2 ** 31))
        while True:
            a = rng.randrange(4)
            s2, r, terminated, truncated, _ = env.step(a)
            yield s, a, s2, float(r), terminated
            s = s2
            if terminated or truncated:
                break


@pytest.mark.parametrize("seed", range(6))
def test_breadth_first_values_equal_value_iteration(seed):
    """On the histories of random play on real training maps (holes, walls, goals, truncation), after every step."""
    lake, untried = planner.ContextModel(), [0.9 ** 8, 0.5, 1.0][seed % 3]
    for s, a, s2, r, terminated in random_play(frozenlake.train_maps()[seed * 7], episodes=12, seed=seed):
        lake.learn(s, a, s2, terminated, r)
        reference = value_iteration(lake, G, untried)
        for state in reference:
            if state not in lake.ends:
                assert lake.q(state, G, untried) == pytest.approx(reference[state], abs=1e-9)


def test_latest_evidence_wins():
    """A hole in an older map's episodes stops being one when a later episode walks on through that state."""
    lake = planner.ContextModel()
    lake.learn_episode(Episode([0, 1], [RIGHT], [0.0]))                # 0 → 1: a hole
    assert lake.q(0, G, U)[RIGHT] == 0.0
    lake.learn_episode(Episode([0, 1, 2], [RIGHT, RIGHT], [0.0, 1.0]))  # now 1 is ice and 2 a goal
    assert lake.q(0, G, U)[RIGHT] == pytest.approx(G)
    lake.learn(0, RIGHT, 4, False, 0.0)                                 # the same move now leads elsewhere
    assert lake.moves[0, RIGHT] == 4 and lake.q(0, G, U)[RIGHT] == pytest.approx(G * U)


def test_planner_policy_solves_held_out_lakes_under_the_warmup_schedule():
    """The planner baseline played by the evaluation harness (rollout.py) on 20 held-out maps under the paper's
    warm-up schedule: it solves nearly every greedy episode and beats tabular Q-learning (the same schedule, the same
    random stream) by a wide margin."""
    maps = [[m] for m in frozenlake.test_maps()[:20]]
    probs = rollout.schedule(30)
    mine = rollout.run_episodes(baselines.PlannerPolicy(), maps, probs, seed=0)
    ql = rollout.run_episodes(baselines.QLearningPolicy(), maps, probs, seed=0)
    last10 = [sum(row[20:]) / 10 for row in mine["success"]]
    assert sum(last10) / len(last10) >= 0.95
    assert sum(last10) > sum(sum(row[20:]) / 10 for row in ql["success"]) + 5


def test_move_facts_by_hand():
    """ContextModel.facts: 0 untried, 1 a dead end (a known hole or bump into the edge), 2 open (a tile or the goal)."""
    lake = planner.ContextModel()
    assert lake.facts(0) == [0, 0, 0, 0]
    lake.learn_episode(Episode([0, 0, 1, 5], [UP, RIGHT, DOWN], [0.0, 0.0, 0.0]))  # edge, then 0 → 1 → hole 5
    assert lake.facts(0) == [0, 0, 2, 1]
    assert lake.facts(1) == [0, 1, 0, 0]
    lake.learn_episode(Episode([1, 2], [RIGHT], [1.0]))  # 1 → 2, the goal: open
    assert lake.facts(1) == [0, 1, 2, 0]


@pytest.mark.parametrize("seed", range(3))
def test_move_facts_agree_with_the_true_lake(seed):
    """After random play on a real training map, every move the context has tried reads as the map says: a dead end
    (1) into a hole or the edge, open (2) onto ice or the goal; every other move untried (0)."""
    desc = frozenlake.train_maps()[seed * 11]
    nrow, ncol = len(desc), len(desc[0])
    lake, tried = planner.ContextModel(), set()
    for s, a, s2, r, terminated in random_play(desc, episodes=10, seed=seed):
        lake.learn(s, a, s2, terminated, r)
        tried.add((s, a))
    for s in range(nrow * ncol):
        row, col = divmod(s, ncol)
        for a, (dr, dc) in frozenlake.MOVES.items():
            r2, c2 = row + dr, col + dc
            dead = not (0 <= r2 < nrow and 0 <= c2 < ncol) or desc[r2][c2] == "H"
            assert lake.facts(s)[a] == (0 if (s, a) not in tried else 1 if dead else 2), (s, a)
    assert any(f == 1 for s in range(nrow * ncol) for f in lake.facts(s))  # the play met a dead end
    copy = lake.copy()  # a copy learns on its own (the rollout keeps one per unfinished episode)
    copy.learn(0, UP, 0, False, 0.0)
    assert copy.facts(0)[UP] == 1 and lake.facts(0)[UP] == (1 if (0, UP) in tried else 0)
