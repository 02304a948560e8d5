"""data.py: the Q-learners' histories replay in the environment and improve, R-max learns faster, the quality
weighting, the on-disk cache (deterministic, read back, regenerated when corrupted), chronological sets, and where the
online rounds' sets sit on the canvas."""
import json
import random

import pytest

import data
import dqn
import frozenlake
import train


def data_config(tmp_path, **kw):
    """The data fields of a train.py config, small: 4 maps, one 24-episode run each, sets of 4-8 episodes."""
    base = dict(n_maps=4, qlearn_runs=1, qlearn_episodes=24, sets_per_map=2, heldout_sets_per_map=1, set_min=4,
                set_max=8, data_dir=str(tmp_path / "data"))
    return train.make_config("cpu", **{**base, **kw})


def test_q_learning_episodes_replay_in_the_env_and_improve():
    maps = frozenlake.train_maps()[:20]
    early = late = 0
    for m, desc in enumerate(maps):
        eps = data.q_learning_episodes(desc, 60, 0.5, 0.95, random.Random(m))
        for ep in eps:
            assert_replays(desc, ep)
        early += sum(sum(e.rewards) > 0 for e in eps[:10])
        late += sum(sum(e.rewards) > 0 for e in eps[-10:])
    assert late > 2 * early  # early failures -> later successes, the learning history the paper trains on


def assert_replays(desc, ep):
    """The recorded episode is a real trajectory of the lake (independent replay)."""
    dqn.check_episode(ep)
    env = frozenlake.FrozenLake(desc)
    env.s, env.steps = ep.observations[0], 0
    for t, a in enumerate(ep.actions):
        s, r, terminated, truncated, _ = env.step(a)
        assert (s, r) == (ep.observations[t + 1], ep.rewards[t])
    assert terminated or truncated
    assert ep.truncated == (truncated and not terminated)


def test_rmax_episodes_replay_and_learn_faster_than_q_learning(tmp_path):
    maps = frozenlake.train_maps()[:20]
    late = {"rmax": 0, "qlearning": 0}
    for m, desc in enumerate(maps):
        rmax = data.rmax_episodes(desc, 60, 0.95, random.Random(m))
        for ep in rmax:
            assert_replays(desc, ep)
        late["rmax"] += sum(sum(e.rewards) > 0 for e in rmax[20:])
        late["qlearning"] += sum(sum(e.rewards) > 0 for e in data.q_learning_episodes(desc, 60, 0.5, 0.95,
                                                                                       random.Random(m))[20:])
        late["rmax, last 10"] = late.get("rmax, last 10", 0) + sum(sum(e.rewards) > 0 for e in rmax[-10:])
    # same ε schedule (still 0.68 at episode 20, 0.05 at the end): R-max's model turns the greedy steps into
    # successes sooner than Q-learning's table (measured 592 vs 543 of 800; the last 10: 185 of 200)
    assert late["rmax"] > late["qlearning"] + 25 and late["rmax, last 10"] >= 0.85 * 200, late
    # the learner is part of the data config: its own cache
    sets = data.load_episode_sets(data_config(tmp_path, learner="rmax"), "train")
    assert sets != data.load_episode_sets(data_config(tmp_path), "train")
    assert len(list((tmp_path / "data").glob("train-*"))) == 2


def test_sample_set_weights_counts():
    # 5x weight on the first half: single draws pick it 5/6 of the time (binomial sd ≈ 0.006 at 4000 draws)
    rng, weights = random.Random(0), [5.0] * 10 + [1.0] * 10
    picks = [data.sample_set(weights, 1, rng)[0] < 10 for _ in range(4000)]
    assert abs(sum(picks) / 4000 - 5 / 6) < 0.03
    chosen = data.sample_set(weights, 15, rng)
    assert len(set(chosen)) == 15  # without replacement


def test_data_deterministic_cached_and_quality(tmp_path, monkeypatch):
    cfg = data_config(tmp_path)
    sets = data.load_episode_sets(cfg, "train")
    assert len(sets) == cfg.n_maps * cfg.sets_per_map and all(cfg.set_min <= len(s) <= cfg.set_max for s in sets)
    (where,) = (tmp_path / "data").glob("train-*")
    manifest = json.loads((where / "manifest.json").read_text())
    assert manifest["config"]["quality"] == "low" and where.name.endswith(manifest["hash"][:12])
    # the same config elsewhere generates the same data (seeded), and a second call reads the cache
    other = data.load_episode_sets(data_config(tmp_path, data_dir=str(tmp_path / "d2")), "train")
    assert other == sets
    monkeypatch.setattr(data, "generate_data", lambda dc: pytest.fail("regenerated a cached data set"))
    assert data.load_episode_sets(cfg, "train") == sets
    monkeypatch.undo()
    # a corrupted data file does not match its manifest's checksum: regenerated, same content
    (where / "episodes.json").write_text((where / "episodes.json").read_text().replace("[", "[ ", 1))
    assert data.load_episode_sets(cfg, "train") == sets
    # quality: hi sets hold more successes than mid, low fewer (same Q-learning runs underneath)
    frac = {}
    for q in ("hi", "mid", "low"):
        s = data.load_episode_sets(data_config(tmp_path, quality=q, n_maps=30, set_min=10, set_max=10), "train")
        frac[q] = sum(sum(e.rewards) > 0 for st in s for e in st) / sum(map(len, s))
    assert frac["hi"] > frac["mid"] + 0.05 and frac["low"] < frac["mid"] - 0.05, frac
    assert len(list((tmp_path / "data").glob("train-*"))) == 4  # one dir per data config


def test_chronological_sets_keep_the_q_learners_order(tmp_path):
    """--set-order chronological: the same episodes as the (shuffled) default sets, in the order the Q-learner played
    them, so successes pile up towards the end of a set (a learning history, as in Algorithm Distillation)."""
    kw = dict(n_maps=30, set_min=20, set_max=20, canvas=False)  # ordinary states: the episodes as stored
    shuffled = data.load_episode_sets(data_config(tmp_path, **kw), "train")
    chrono = data.load_episode_sets(data_config(tmp_path, **kw, set_order="chronological"), "train")
    (where,) = (tmp_path / "data").glob("train-*")  # one data set on disk: the order is applied when loading
    stored = json.loads((where / "episodes.json").read_text())
    for (m, r, chosen), a, b in zip(stored["sets"], shuffled, chrono):
        ncol = len(frozenlake.train_maps(30)[m][0])  # loading also records each episode's map width
        assert a == [dqn.Episode(*stored["episodes"][m][r][i], ncol=ncol) for i in chosen]
        assert b == [dqn.Episode(*stored["episodes"][m][r][i], ncol=ncol) for i in sorted(chosen)]
        assert chosen != sorted(chosen)
    wins = lambda sets, half: sum(sum(e.rewards) > 0 for s in sets for e in (s[:10] if half == 0 else s[10:]))
    assert wins(chrono, 1) > 1.5 * wins(chrono, 0)
    assert abs(wins(shuffled, 1) - wins(shuffled, 0)) < 0.25 * wins(shuffled, 1)


def test_online_sets_move_on_the_canvas_in_the_canvas_stage(tmp_path):
    """The model plays each online map at the canvas origin, as evaluate.py; in the first stage its episodes stay
    there, in the canvas stage each map's set moves to one random offset that keeps the map on the 8x8 canvas."""
    cfg = data_config(tmp_path, online_maps=3)
    maps = data.online_round_maps(cfg, 250)
    assert maps == random.Random("0/online250").sample(frozenlake.train_maps(4), 3)
    sets = [data.q_learning_episodes(desc, 5, 0.5, 0.95, random.Random(i)) for i, desc in enumerate(maps)]
    for desc, eps in zip(maps, sets):
        for ep in eps:
            ep.ncol = len(desc[0])  # as play_maps writes them
    assert data.online_sets_placed(cfg, 250, sets, canvas_stage=False) is sets
    placed = data.online_sets_placed(cfg, 250, sets, canvas_stage=True)
    assert placed == data.online_sets_placed(cfg, 250, sets, canvas_stage=True)  # seeded by the round
    moved = 0
    for desc, eps, eps_placed in zip(maps, sets, placed):
        rows, cols = len(desc), len(desc[0])
        found = {(s_new // 8 - s // cols, s_new % 8 - s % cols)
                 for ep, ep_placed in zip(eps, eps_placed) for s, s_new in zip(ep.observations, ep_placed.observations)}
        (dr, dc), = found  # one offset for the whole set
        assert 0 <= dr <= 8 - rows and 0 <= dc <= 8 - cols
        assert all(ep.ncol == 8 and ep.actions == ep0.actions and ep.rewards == ep0.rewards
                   for ep, ep0 in zip(eps_placed, eps))
        moved += (dr, dc) != (0, 0)
    assert moved  # 3 maps of at most 5 x 5 on an 8 x 8 canvas: at least one leaves the origin
