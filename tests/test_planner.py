"""planner.py: the context planner's Q-values by hand, against plain value iteration on the same learned model, the
latest-evidence rule, its place in packing (what the slice shows before each step), the TD loss on all four actions,
the train.py wiring, and its policy under evaluate.py's schedule against the paper-style baselines."""
import contextlib
import dataclasses
import random
from pathlib import Path

import pytest
import torch

import baselines
import data
import dqn
import evaluate
import frozenlake
import planner
import train
from dqn import Episode

G, U = 0.9, 0.9 ** 8
LEFT, DOWN, RIGHT, UP = 0, 1, 2, 3
ROOT = Path(__file__).resolve().parents[1]


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


@pytest.mark.parametrize("seed", range(6))
def test_breadth_first_values_equal_value_iteration(seed):
    """On the histories of random play on real training maps (holes, walls, goals, truncation), after every step."""
    rng = random.Random(seed)
    desc = frozenlake.train_maps()[seed * 7]
    env, lake = frozenlake.FrozenLake(desc, max_steps=30), planner.ContextModel()
    untried = [0.9 ** 8, 0.5, 1.0][seed % 3]
    for _ in range(12):
        s, _ = env.reset(seed=rng.randrange(2 ** 31))
        while True:
            a = rng.randrange(4)
            s2, r, terminated, truncated, _ = env.step(a)
            lake.learn(s, a, s2, terminated, float(r))
            reference = value_iteration(lake, G, untried)
            for state in reference:
                if state not in lake.ends:
                    assert lake.q(state, G, untried) == pytest.approx(reference[state], abs=1e-9)
            s = s2
            if terminated or truncated:
                break


def test_latest_evidence_wins():
    """A hole in an older map's episodes stops being one when a later episode walks on through that state."""
    lake = planner.ContextModel()
    lake.learn_episode(Episode([0, 1], [RIGHT], [0.0]))                # 0 → 1: a hole
    assert lake.q(0, G, U)[RIGHT] == 0.0
    lake.learn_episode(Episode([0, 1, 2], [RIGHT, RIGHT], [0.0, 1.0]))  # now 1 is ice and 2 a goal
    assert lake.q(0, G, U)[RIGHT] == pytest.approx(G)
    lake.learn(0, RIGHT, 4, False, 0.0)                                 # the same move now leads elsewhere
    assert lake.moves[0, RIGHT] == 4 and lake.q(0, G, U)[RIGHT] == pytest.approx(G * U)


def two_lake_sets():
    """Two training maps' sets of 12 short Q-learning episodes each (seeded): 300-token slices cross their boundary."""
    rng = random.Random(3)
    return [[e for e in data.q_learning_episodes(desc, 30, 0.5, 0.95, rng) if len(e.actions) < 25][:12]
            for desc in frozenlake.train_maps()[:2]]


def test_packing_plans_on_what_the_slice_shows(compact):
    """Each action slot's planner_q is the plan of a fresh ContextModel fed exactly the slice's earlier steps (across
    the boundary between two sets too); a new slice starts knowing nothing."""
    sets = two_lake_sets()
    slices = dqn.pack_slices(sets, compact, 300, random.Random(0), plan=(G, U))
    order, shuffle = [], random.Random(0)  # pack_slices' order: each set shuffled by the same rng, sets in turn
    for eps in sets:
        eps = list(eps)
        shuffle.shuffle(eps)
        order += eps
    assert len(slices) > 2 and sum(len(sl.actions) for sl in slices) == sum(len(e.actions) for e in order)
    for sl in slices:
        lake, t = planner.ContextModel(), 0
        while t < len(sl.actions):
            ep = order.pop(0)
            assert sl.actions[t:t + len(ep.actions)] == ep.actions
            for k, (s, a, s2, r) in enumerate(zip(ep.observations, ep.actions, ep.observations[1:], ep.rewards)):
                assert sl.planner_q[t + k] == pytest.approx(lake.q(s, G, U))
                lake.learn(s, a, s2, k == len(ep.actions) - 1 and not ep.truncated, r)
            t += len(ep.actions)
        assert sl.planner_q[0] == [U] * 4
    batch = dqn.collate(slices[:2], compact.eos[0])
    assert batch["planner_q"].shape == (2, batch["mask"].shape[1], 4)
    torch.testing.assert_close(batch["planner_q"][1, :len(slices[1].actions)], torch.tensor(slices[1].planner_q))
    assert dqn.pack_slices(sets, compact, 300, random.Random(0))[0].planner_q == []  # off unless asked


@pytest.fixture
def compact():
    return dqn.CompactFormat(train.small_tokenizer("compact").special_tokens)


def test_td_loss_on_all_four_actions_by_hand():
    q = torch.tensor([[[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]]])                       # (1, 2, 4)
    y = torch.tensor([[[1.0, 0.0, 3.0, 6.0], [9.0, 9.0, 9.0, 9.0]]])
    batch = {"mask": torch.tensor([[True, False]]), "actions": torch.tensor([[0, 0]])}
    assert dqn.td_loss(q, y, batch).item() == pytest.approx((0 + 4 + 0 + 4) / 4)  # the padded slot is masked
    norm = dqn.td_loss(q, y, batch, normalize_by_mean_target=True).item()
    assert norm == pytest.approx((0 + 4 + 0 + 4) / 4 / (10 / 4) ** 2)           # mean |y| of the real slot: 2.5


@pytest.mark.filterwarnings("ignore:pack_slices dropped")  # the tiny run's 160-token slices; not what is tested here
def test_train_regresses_on_the_planner_targets(tmp_path):
    from test_train import tiny
    cfg = tiny(tmp_path, targets="planner", untried_steps=4, canvas=False)  # ordinary states, as written below
    tok = train.small_tokenizer(cfg.format)
    fmt = train.trajectory_format(cfg, tok)
    model = train.small_model(cfg, tok.n_words, tok.special_tokens)
    eps = [Episode([0, 1, 2], [RIGHT, RIGHT], [0.0, 1.0]), Episode([0, 1, 2], [RIGHT, RIGHT], [0.0, 1.0])]
    batch = dqn.collate(dqn.pack_slices([eps], fmt, 160, random.Random(0), train.planner_arguments(cfg)), fmt.eos[0])
    ids = torch.tensor(fmt.action_ids)
    loss, _ = train.td_loss_on(batch, model, None, model, None, ids, cfg, contextlib.nullcontext)
    q = dqn.q_values(model, batch["tokens"], batch["q_positions"], ids)
    u = 0.9 ** 4
    # first episode: nothing known; second: right at 0 leads to 1, whose right enters the goal
    y = 30 * torch.tensor([[[u] * 4, [u] * 4, [u, u, 0.9, u], [u, u, 1.0, u]]])
    torch.testing.assert_close(loss, dqn.td_loss(q, y, batch))
    run = train.train(cfg)  # a whole tiny run with these targets trains and saves
    assert (run / "latest").read_text().startswith("checkpoints/step_")
    paper = train.train(tiny(tmp_path / "paper", format="paper", canvas=False, facts_tokens=False,
                             targets="optimistic", aux_lm=0.0, steps=2))
    assert (paper / "latest").read_text() == "checkpoints/step_000002"  # the planner does not care about the text
    with pytest.raises(ValueError, match="--untried-steps"):
        train.train(tiny(tmp_path, targets="planner", untried_steps=-1))


def test_planner_policy_solves_held_out_lakes_under_the_warmup_schedule():
    """The policy the targets describe, played by evaluate.py's harness on 20 held-out maps: it beats tabular
    Q-learning by a wide margin (README: 0.998 over all 50 maps and 10 seeds; Q-learning 0.487)."""
    maps = [[m] for m in frozenlake.test_maps()[:20]]
    probs = evaluate.schedule(30)
    mine = evaluate.run_episodes(baselines.PlannerPolicy(), maps, probs, seed=0)
    ql = evaluate.run_episodes(baselines.QLearningPolicy(), maps, probs, seed=0)
    last10 = [sum(row[20:]) / 10 for row in mine["success"]]
    assert sum(last10) / len(last10) >= 0.95
    assert sum(last10) > sum(sum(row[20:]) / 10 for row in ql["success"]) + 5


def test_settled_moves_by_hand():
    lake = planner.ContextModel()
    lake.learn_episode(Episode([0, 1, 5], [RIGHT, DOWN], [0.0, 0.0]))  # 0 → 1 → hole 5
    assert lake.settled(0) == [True, True, False, True]   # right is known to lead on (a path: not one lookup)
    assert lake.settled(1) == [True, True, True, True]    # down ends in a hole; the rest untried
    lake.learn(1, LEFT, 0, False, 0.0)
    assert lake.settled(1) == [False, True, True, True]


def test_settled_hops_by_hand():
    """settled(s, hops=H): also a known move to a state within H - 1 known moves of an exit (a goal-entering or an
    untried move). A 1 x 4 corridor 0 1 2 3 (goal 3) where every move at 0 and 1 has been tried: up and down bump
    into the edge, so 2 is the only state with an exit (its goal move; its other moves are untried)."""
    lake = planner.ContextModel()
    lake.learn_episode(Episode([0, 0, 0, 0, 1, 1, 1, 0, 1, 2, 3],
                               [UP, DOWN, LEFT, RIGHT, UP, DOWN, LEFT, RIGHT, RIGHT, RIGHT], [0.0] * 9 + [1.0]))
    assert lake.exits() == {2: 0, 1: 1, 0: 2}
    assert lake.settled(0) == lake.settled(0, hops=1) == [False] * 4  # right leads to 1, itself one move from 2
    assert lake.settled(0, hops=2) == [False, False, True, False]      # ... within 2 hops; the walls never
    assert lake.settled(1, hops=1) == [False, False, True, False]
    assert lake.settled(1, hops=3) == [True, False, True, False]       # left: back to 0, 2 hops from an exit
    assert lake.q(1, G, U)[LEFT] == pytest.approx(G * G * G)           # what such a move is regressed on: γ · V(0)
    assert lake.settled(2, hops=5) == [True, True, True, True]         # 2 itself: untried moves and the goal


def hop_targets(cfg, eps, shuffle_seed=0):
    """One slice of eps packed with cfg's plan and hops -> (fmt, model, action ids, batch, Q, train's TD loss)."""
    tok = train.small_tokenizer(cfg.format)
    fmt = train.trajectory_format(cfg, tok)
    model = train.small_model(cfg, tok.n_words, tok.special_tokens)
    batch = dqn.collate(dqn.pack_slices([eps], fmt, 160, random.Random(shuffle_seed), train.planner_arguments(cfg),
                                        hops=cfg.settled_hops), fmt.eos[0])
    ids = torch.tensor(fmt.action_ids)
    q = dqn.q_values(model, batch["tokens"], batch["q_positions"], ids)
    loss, _ = train.td_loss_on(batch, model, None, model, None, ids, cfg, contextlib.nullcontext)
    return fmt, model, ids, batch, q, loss


@pytest.mark.filterwarnings("ignore:pack_slices dropped")
def test_settled_hops_targets_by_hand(tmp_path):
    """--settled-hops 1: a success 0 →(right) 1 →(down) 3 (the goal) then a fall 0 →(down) 2 on a 2 x 2 lake. At the
    fall's start, right at 0 is a known move to 1, which has a goal-entering move: regressed on 30 · γ · V(1) = 27,
    where the one-hop optimistic targets leave it out."""
    from test_train import tiny
    cfg = tiny(tmp_path, targets="optimistic", settled_hops=1, settled_taken=False, untried_taken=False,
               wall_targets=False, untried_steps=2, canvas=False)
    eps = [Episode([0, 1, 3], [RIGHT, DOWN], [0.0, 1.0]), Episode([0, 2], [DOWN], [0.0])]
    fmt, model, ids, batch, q, loss = hop_targets(cfg, eps)
    assert batch["actions"][0, :3].tolist() == [RIGHT, DOWN, DOWN]  # the shuffle kept the success first
    u = 30 * 0.9 ** 2
    y = [[(RIGHT, 27.0), (LEFT, u), (DOWN, u), (UP, u)],
         [(DOWN, 30.0), (LEFT, u), (RIGHT, u), (UP, u)],
         [(DOWN, 0.0), (LEFT, u), (UP, u), (RIGHT, 27.0)]]  # the last: one hop from the goal's move
    expected = sum((q[0, p, a].item() - t) ** 2 for p, row in enumerate(y) for a, t in row) / sum(map(len, y))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    one_hop = dqn.collate(dqn.pack_slices([eps], fmt, 160, random.Random(0), train.planner_arguments(cfg)),
                          fmt.eos[0])
    assert one_hop["settled"][0, 2].tolist() == [True, True, False, True]  # without hops: right has no target
    mc = dataclasses.replace(cfg, targets="mc")  # the other targets ignore the hops
    mc_loss, _ = train.td_loss_on(batch, model, None, model, None, ids, mc, contextlib.nullcontext)
    torch.testing.assert_close(mc_loss, dqn.td_loss(q, dqn.monte_carlo_targets(batch, 0.9, 30.0), batch))
    with pytest.raises(ValueError, match="--settled-hops is a number of known moves"):
        train.train(tiny(tmp_path, targets="optimistic", settled_hops=-1))


@pytest.mark.filterwarnings("ignore:pack_slices dropped")
def test_settled_taken_regresses_a_known_path_on_its_value(tmp_path):
    """--settled-hops 1 --settled-taken: a success 0 → 1 → 3 then an episode that turns back and is truncated. Its
    first move (right, into 1, which has the goal's move) is known: regressed on 30·γ·V(1) = 27, not on its return 0;
    its turn back left is untried: its return (0) without --untried-taken; the success's own moves were untried
    too."""
    from test_train import tiny
    cfg = tiny(tmp_path, targets="optimistic", settled_hops=1, settled_taken=True, untried_taken=False,
               wall_targets=False, untried_steps=2, canvas=False)
    eps = [Episode([0, 1, 3], [RIGHT, DOWN], [0.0, 1.0]), Episode([0, 1, 0], [RIGHT, LEFT], [0.0, 0.0], truncated=True)]
    _, _, _, batch, q, loss = hop_targets(cfg, eps)
    assert batch["actions"][0, :4].tolist() == [RIGHT, DOWN, RIGHT, LEFT]  # the shuffle kept the success first
    assert batch["hopped"][0, :4].tolist() == [[False] * 4, [False] * 4, [False, False, True, False], [False] * 4]
    u = 30 * 0.9 ** 2
    y = [[(RIGHT, 27.0), (LEFT, u), (DOWN, u), (UP, u)],
         [(DOWN, 30.0), (LEFT, u), (RIGHT, u), (UP, u)],
         [(RIGHT, 27.0), (LEFT, u), (DOWN, u), (UP, u)],    # taken, return 0: the known path's value instead
         [(LEFT, 0.0), (DOWN, 30.0), (RIGHT, u), (UP, u)]]  # taken untried: its return
    expected = sum((q[0, p, a].item() - t) ** 2 for p, row in enumerate(y) for a, t in row) / sum(map(len, y))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert train.make_config().settled_taken and train.make_config().settled_hops == 1  # the cpu preset's default


@pytest.mark.filterwarnings("ignore:pack_slices dropped")
def test_untried_taken_regresses_a_first_try_on_the_untried_value(tmp_path):
    """--untried-taken: the episodes of the test above. Every move the context had not tried when it was taken is
    regressed on u = 30·γ^2, like the untried moves not taken: the success's first right (return 27) and its step into
    the goal (return 30; the context could not know), and the turn back left (return 0); the known right keeps 27."""
    from test_train import tiny
    cfg = tiny(tmp_path, targets="optimistic", settled_hops=1, settled_taken=True, wall_targets=False,
               untried_steps=2, canvas=False)  # --untried-taken: the cpu preset's default
    eps = [Episode([0, 1, 3], [RIGHT, DOWN], [0.0, 1.0]), Episode([0, 1, 0], [RIGHT, LEFT], [0.0, 0.0], truncated=True)]
    _, _, _, batch, q, loss = hop_targets(cfg, eps)
    assert batch["actions"][0, :4].tolist() == [RIGHT, DOWN, RIGHT, LEFT]
    u = 30 * 0.9 ** 2
    y = [[(RIGHT, u), (LEFT, u), (DOWN, u), (UP, u)],
         [(DOWN, u), (LEFT, u), (RIGHT, u), (UP, u)],
         [(RIGHT, 27.0), (LEFT, u), (DOWN, u), (UP, u)],
         [(LEFT, u), (DOWN, 30.0), (RIGHT, u), (UP, u)]]
    expected = sum((q[0, p, a].item() - t) ** 2 for p, row in enumerate(y) for a, t in row) / sum(map(len, y))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert cfg.untried_taken and not train.make_config("smollm2").untried_taken  # the paper's presets: off


@pytest.mark.filterwarnings("ignore:pack_slices dropped")
def test_optimistic_targets_by_hand(tmp_path):
    """--targets optimistic: the taken action regresses on its Monte-Carlo return, each other action only where the
    planner's value is one lookup away (untried: 30·γ^K; known hole: 0), never on a multi-hop path value."""
    from test_train import tiny
    cfg = tiny(tmp_path, targets="optimistic", settled_hops=0, untried_taken=False, wall_targets=False, untried_steps=2,
               canvas=False)  # ordinary states, as written below
    tok = train.small_tokenizer(cfg.format)
    fmt = train.trajectory_format(cfg, tok)
    model = train.small_model(cfg, tok.n_words, tok.special_tokens)
    # a 2 x 2 lake: one episode falls 0 →(down) 2 (a hole), the other goes 0 →(right) 1 →(down) 3 (the goal)
    eps = [Episode([0, 2], [DOWN], [0.0]), Episode([0, 1, 3], [RIGHT, DOWN], [0.0, 1.0])]
    batch = dqn.collate(dqn.pack_slices([eps], fmt, 160, random.Random(1), train.planner_arguments(cfg)), fmt.eos[0])
    assert batch["actions"][0, :3].tolist() in ([DOWN, RIGHT, DOWN], [RIGHT, DOWN, DOWN])
    ids = torch.tensor(fmt.action_ids)
    q = dqn.q_values(model, batch["tokens"], batch["q_positions"], ids)
    loss, _ = train.td_loss_on(batch, model, None, model, None, ids, cfg, contextlib.nullcontext)
    u = 30 * 0.9 ** 2
    if batch["actions"][0, 0] == DOWN:  # the fall first: at the second episode's start, down is a known hole
        y = [[(DOWN, 0.0), (LEFT, u), (RIGHT, u), (UP, u)],
             [(RIGHT, 30 * 0.9), (DOWN, 0.0), (LEFT, u), (UP, u)],
             [(DOWN, 30.0), (LEFT, u), (RIGHT, u), (UP, u)]]
    else:                               # the success first: at the fall's start, right is known (a path): no target
        y = [[(RIGHT, 30 * 0.9), (LEFT, u), (DOWN, u), (UP, u)],
             [(DOWN, 30.0), (LEFT, u), (RIGHT, u), (UP, u)],
             [(DOWN, 0.0), (LEFT, u), (UP, u)]]
    expected = sum((q[0, p, a].item() - t) ** 2 for p, row in enumerate(y) for a, t in row) / sum(map(len, y))
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def edge_then_goal_batch(cfg):
    """(format, fresh model, batch) of two copies of one success on a 2 x 2 lake, packed with cfg's planner:
    0 →(up, the edge) 0 →(right) 1 →(down) 3, the goal."""
    tok = train.small_tokenizer(cfg.format)
    fmt = train.trajectory_format(cfg, tok)
    model = train.small_model(cfg, tok.n_words, tok.special_tokens)
    ep = Episode([0, 0, 1, 3], [UP, RIGHT, DOWN], [0.0, 0.0, 1.0])
    batch = dqn.collate(dqn.pack_slices([[ep, ep]], fmt, 160, random.Random(0), train.planner_arguments(cfg)),
                        fmt.eos[0])
    return fmt, model, batch


def test_wall_targets_value_a_known_bump_into_the_edge_at_0(tmp_path):
    """--wall-targets: a move the context shows to leave the state unchanged is regressed on 0, taken or not (its
    episode's return does not count), before it is known it is an untried move like any other. Two copies of one
    success on a 2 x 2 lake: 0 →(up, the edge) 0 →(right) 1 →(down) 3, the goal."""
    from test_train import tiny
    cfg = tiny(tmp_path, targets="optimistic", wall_targets=True, settled_hops=0, untried_taken=False, untried_steps=3,
               canvas=False)
    fmt, model, batch = edge_then_goal_batch(cfg)
    ids = torch.tensor(fmt.action_ids)
    q = dqn.q_values(model, batch["tokens"], batch["q_positions"], ids)
    loss, _ = train.td_loss_on(batch, model, None, model, None, ids, cfg, contextlib.nullcontext)
    u = 30 * 0.9 ** 3
    y = [[(UP, 30 * 0.81), (LEFT, u), (RIGHT, u), (DOWN, u)],   # first episode, nothing known
         [(RIGHT, 27.0), (UP, 0.0), (LEFT, u), (DOWN, u)],      # up at 0 now known to stay at 0
         [(DOWN, 30.0), (LEFT, u), (RIGHT, u), (UP, u)],
         [(UP, 0.0), (LEFT, u), (DOWN, u)],                     # taken, return 24.3, yet a known wall: 0
         [(RIGHT, 27.0), (UP, 0.0), (LEFT, u), (DOWN, u)],      # right at 0 is a known path: no target but its own
         [(DOWN, 30.0), (LEFT, u), (RIGHT, u), (UP, u)]]
    expected = sum((q[0, p, a].item() - t) ** 2 for p, row in enumerate(y) for a, t in row) / sum(map(len, y))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert batch["walls"][0, :6, UP].tolist() == [False, True, False, True, True, False]


SUCCESS_FIRST = 0  # a shuffle seed of pack_slices that keeps the two episodes below in their order


def test_proven_floor_raises_the_return_to_the_known_path(tmp_path):
    """--proven-floor: the taken action's target is max(G_t, 30·γ^(1 + d_goal)) with d_goal the known moves from where
    it leads to the goal. A success 0 → 1 → 3 then an episode that turns back and is truncated: its returns are 0, but
    its first move (right, into 1) is on the path the context shows, worth 30·0.9; its turn back left is not."""
    from test_train import tiny
    cfg = tiny(tmp_path, targets="optimistic", proven_floor=True, settled_hops=0, untried_taken=False,
               wall_targets=False, canvas=False)
    tok = train.small_tokenizer(cfg.format)
    fmt = train.trajectory_format(cfg, tok)
    model = train.small_model(cfg, tok.n_words, tok.special_tokens)
    eps = [Episode([0, 1, 3], [RIGHT, DOWN], [0.0, 1.0]), Episode([0, 1, 0], [RIGHT, LEFT], [0.0, 0.0], truncated=True)]
    batch = dqn.collate(dqn.pack_slices([eps], fmt, 160, random.Random(SUCCESS_FIRST), train.planner_arguments(cfg),
                                        proven=True), fmt.eos[0])
    assert batch["actions"][0, :4].tolist() == [RIGHT, DOWN, RIGHT, LEFT]  # the shuffle put the success first
    assert dqn.pack_slices([eps], fmt, 160, random.Random(0), train.planner_arguments(cfg))[0].proven == []  # if asked
    # before each step: nothing known, the goal entry not yet seen, the known path 1 → 3, back to 0 (no path known)
    assert batch["proven"][0, :4].tolist() == pytest.approx([0.0, 0.0, 0.9, 0.0])
    mc = dqn.monte_carlo_targets(batch, 0.9, 30.0)
    assert mc[0, :4].tolist() == pytest.approx([27.0, 30.0, 0.0, 0.0])
    ids = torch.tensor(fmt.action_ids)
    q = dqn.q_values(model, batch["tokens"], batch["q_positions"], ids)
    loss, _ = train.td_loss_on(batch, model, None, model, None, ids, cfg, contextlib.nullcontext)
    plain, _ = train.td_loss_on(batch, model, None, model, None, ids, dataclasses.replace(cfg, proven_floor=False),
                                contextlib.nullcontext)
    # the one target that moves: the truncated episode's right at 0, from 0 to 27; every other term is the same
    taken = [(p, a) for p, a in enumerate(batch["actions"][0, :4].tolist())]
    shift = ((q[0, 2, RIGHT] - 27.0) ** 2 - q[0, 2, RIGHT] ** 2).item()
    n = batch["settled"][0, :4].sum().item() + 4 - sum(batch["settled"][0, p, a].item() for p, a in taken)
    assert loss.item() == pytest.approx(plain.item() + shift / n, rel=1e-5)
    with pytest.raises(ValueError, match="--proven-floor raises the Monte-Carlo targets"):
        train.train(tiny(tmp_path, targets="dqn", proven_floor=True))


def test_planner_baseline_optimism_is_a_setting(tmp_path):
    """evaluate.py --planner-untried-steps: with 0 steps an untried move is worth as much as a goal next door, so on
    the large lakes the planner keeps exploring in its greedy episodes and scores lower than with 8 (README: 0.691
    vs 0.899 over 3 seeds)."""
    scores = {}
    for steps in (0, 8):
        cfg = evaluate.EvalConfig(experiment="ood", maps=20, baselines_only=True, baseline_seeds=1, progress=False,
                                  planner_untried_steps=steps, out=str(tmp_path / str(steps)))
        scores[steps] = evaluate.evaluate(cfg)["ood"]["planner"]["last10"]
    assert scores[8] > scores[0] + 0.1 and scores[8] > 0.8


def test_failure_modes_classifies_each_greedy_step_by_what_the_context_showed():
    """benchmarks/failure_modes.py on a hand-made history of one 2 x 2 lake: 20 warm-up falls 0 →(down) 2 (a hole),
    then a greedy episode that bumps up (untried: the first time) and falls down (a known hole), then one that bumps
    up three times (a known edge now) until the step limit."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("failure_modes", ROOT / "benchmarks" / "failure_modes.py")
    failure_modes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(failure_modes)
    res = {"paths": [[[0, 2]] * 20 + [[0, 0, 2], [0, 0, 0, 0]]], "actions": [[[DOWN]] * 20 + [[UP, DOWN], [UP] * 3]],
           "success": [[0.0] * 22], "truncated": [[False] * 21 + [True]]}
    steps, ends = failure_modes.classify(res)
    assert steps[False] == {"untried": 1, "hole": 1, "edge": 3} and not steps[True]
    assert ends[False] == {"hole (known)": 1, "loop": 1}


def test_failure_modes_places_loop_steps_by_their_known_distance_to_the_goal():
    """loop_steps on a 1 x 4 corridor 0-1-2-3(goal): 20 warm-up successes walk right, then a greedy episode loops
    0 -> 1 -> 0 -> 1 -> 0 to the step limit. From 0 (2 known moves from the goal's entry at 2) right is the planner's
    best move (γ² against an untried γ^8); from 1 (1 move away) left is not (γ³ or γ^8 against right's γ)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("failure_modes", ROOT / "benchmarks" / "failure_modes.py")
    failure_modes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(failure_modes)
    res = {"paths": [[[0, 1, 2, 3]] * 20 + [[0, 1, 0, 1, 0]]], "actions": [[[RIGHT] * 3] * 20 + [[RIGHT, LEFT] * 2]],
           "success": [[1.0] * 20 + [0.0]], "truncated": [[False] * 20 + [True]]}
    episodes, steps = failure_modes.loop_steps(res)
    assert episodes == 1 and steps == {("2", True): 2, ("1", False): 2}
    res["success"][0][:20] = [0.0] * 20  # an unsolved warm-up: not counted
    assert failure_modes.loop_steps(res)[0] == 0


def test_planner_agreement_scores_the_greedy_move_against_the_planner(compact):
    """benchmarks/planner_agreement.py's score: a Q equal to the planner's values agrees everywhere, its negation
    only where all moves tie; positions split at the slice's first success; untried values read before it."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("planner_agreement", ROOT / "benchmarks" / "planner_agreement.py")
    agreement = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(agreement)
    sets = two_lake_sets()
    slices = dqn.pack_slices(sets, compact, 300, random.Random(0), plan=(G, U))
    exact = [torch.tensor(sl.planner_q) for sl in slices]
    shares, untried = agreement.score(slices, exact, U)
    assert all(share == 1.0 for _, share in shares.values()) and set(shares) == set(agreement.KINDS)
    assert sum(n for n, _ in shares.values()) == sum(len(sl.actions) for sl in slices)
    assert untried and all(v == pytest.approx(U) for v in untried)
    ties = sum(max(v) == min(v) for sl in slices for v in sl.planner_q)
    negated, _ = agreement.score(slices, [-q for q in exact], U)
    assert sum(n * share for n, share in negated.values()) == pytest.approx(ties)


def test_move_facts_by_hand():
    """ContextModel.facts: 0 untried, 1 a dead end (a known hole or bump into the edge), 2 open (a tile or the goal)."""
    lake = planner.ContextModel()
    assert lake.facts(0) == [0, 0, 0, 0]
    lake.learn_episode(Episode([0, 0, 1, 5], [UP, RIGHT, DOWN], [0.0, 0.0, 0.0]))  # edge, then 0 → 1 → hole 5
    assert lake.facts(0) == [0, 0, 2, 1]
    assert lake.facts(1) == [0, 1, 0, 0]
    lake.learn_episode(Episode([1, 2], [RIGHT], [1.0]))  # 1 → 2, the goal: open
    assert lake.facts(1) == [0, 1, 2, 0]


def test_aux_facts_loss_by_hand(tmp_path):
    """--aux-facts: at each Q position, cross-entropy over each move's 3 probe logits against what the context showed
    before the step, averaged over moves and positions, added to the next-token loss at weight aux_facts / aux_lm
    (the wall test's lake: up at 0 is a dead end, right at 0 and down at 1 open)."""
    from test_train import tiny
    cfg = tiny(tmp_path, targets="optimistic", aux_lm=2.0, aux_facts=3.0, canvas=False)
    fmt, model, batch = edge_then_goal_batch(cfg)
    facts = [[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0], [0, 0, 2, 1], [0, 0, 2, 1], [0, 2, 0, 0]]
    assert batch["facts"][0, :6].tolist() == facts
    ids, probes = torch.tensor(fmt.action_ids), [fmt.ids[n] for n in dqn.FACT_PROBES]
    _, lm_only = train.td_loss_on(batch, model, None, model, None, ids, cfg, contextlib.nullcontext, cfg.aux_lm)
    _, both = train.td_loss_on(batch, model, None, model, None, ids, cfg, contextlib.nullcontext, cfg.aux_lm, probes)
    logits = model(batch["tokens"])[0, batch["q_positions"][0, :6]][:, probes].view(6, 4, 3)
    ce = -sum(logits[p, a].log_softmax(-1)[k] for p, row in enumerate(facts) for a, k in enumerate(row)) / 24
    assert both.item() == pytest.approx(lm_only.item() + 3.0 / 2.0 * ce.item(), rel=1e-5)
    with pytest.raises(ValueError, match="--aux-lm > 0"):
        train.check_config(dataclasses.replace(cfg, aux_lm=0.0))
