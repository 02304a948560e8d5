"""data.py: the Q-learner's histories replay in the environment and improve, the quality weighting (arXiv 2501.14176,
§3.2), the on-disk cache (deterministic, read back, regenerated when corrupted), and where the sets sit on the
canvas."""
import json
import random

import pytest

import data
import dqn
import frozenlake
import train


@pytest.fixture(autouse=True)
def small_learner(monkeypatch):
    """One 24-episode Q-learning run per map, sets of 4-8 episodes."""
    for key, value in dict(qlearn_runs=1, qlearn_episodes=24, set_min=4, set_max=8).items():
        monkeypatch.setitem(data.LEARNER, key, value)


def data_config(tmp_path, **kw):
    """The data fields of a train.py config, small: 4 maps, 2 sets each."""
    return train.make_config("cpu", **{**dict(n_maps=4, sets_per_map=2, data_dir=str(tmp_path / "data")), **kw})


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


def test_sample_set_weights_counts():
    # 5x weight on the first half: single draws pick it 5/6 of the time (binomial sd ≈ 0.006 at 4000 draws)
    rng, weights = random.Random(0), [5.0] * 10 + [1.0] * 10
    picks = [data.sample_set(weights, 1, rng)[0] < 10 for _ in range(4000)]
    assert abs(sum(picks) / 4000 - 5 / 6) < 0.03
    chosen = data.sample_set(weights, 15, rng)
    assert len(set(chosen)) == 15  # without replacement


def test_data_deterministic_cached_and_quality(tmp_path, monkeypatch):
    cfg, generate = data_config(tmp_path), data.generate_data
    sets = data.load_episode_sets(cfg, "train")
    assert len(sets) == cfg.n_maps * cfg.sets_per_map and all(4 <= len(s) <= 8 for s in sets)
    (where,) = (tmp_path / "data").glob("train-*")
    manifest = json.loads((where / "manifest.json").read_text())
    assert manifest["config"]["quality"] == "low" and where.name.endswith(manifest["hash"][:12])
    # the same config elsewhere generates the same data (seeded), and a second call reads the cache
    other = data.load_episode_sets(data_config(tmp_path, data_dir=str(tmp_path / "d2")), "train")
    assert other == sets
    monkeypatch.setattr(data, "generate_data", lambda dc: pytest.fail("regenerated a cached data set"))
    assert data.load_episode_sets(cfg, "train") == sets
    monkeypatch.setattr(data, "generate_data", generate)
    # a corrupted data file does not match its manifest's checksum: regenerated, same content
    (where / "episodes.json").write_text((where / "episodes.json").read_text().replace("[", "[ ", 1))
    assert data.load_episode_sets(cfg, "train") == sets
    # quality: hi sets hold more successes than mid, low fewer (same Q-learning runs underneath)
    frac = {}
    monkeypatch.setitem(data.LEARNER, "set_min", 10)
    monkeypatch.setitem(data.LEARNER, "set_max", 10)
    for q in ("hi", "mid", "low"):
        s = data.load_episode_sets(data_config(tmp_path, quality=q, n_maps=30), "train")
        frac[q] = sum(sum(e.rewards) > 0 for st in s for e in st) / sum(map(len, s))
    assert frac["hi"] > frac["mid"] + 0.05 and frac["low"] < frac["mid"] - 0.05, frac
    assert len(list((tmp_path / "data").glob("train-*"))) == 4  # one dir per data config


def set_offsets(sets, stored, maps):
    """The canvas offset of each loaded set, found from its states against the stored (map-numbered) episodes: one
    (row, col) shift for every state of the set, else an AssertionError."""
    offsets = []
    for (m, r, chosen), loaded in zip(stored["sets"], sets):
        cols = len(maps[m][0])
        raw = [dqn.Episode(*stored["episodes"][m][r][i]) for i in chosen]  # the stored order: the packing's input
        assert [e.actions for e in loaded] == [e.actions for e in raw] and all(e.ncol == 8 for e in loaded)
        (offset,) = {(s_new // 8 - s // cols, s_new % 8 - s % cols)
                     for e, e_raw in zip(loaded, raw) for s, s_new in zip(e_raw.observations, e.observations)}
        assert 0 <= offset[0] <= 8 - len(maps[m]) and 0 <= offset[1] <= 8 - cols
        offsets.append(offset)
    return offsets


def test_sets_on_the_canvas(tmp_path):
    """Without the canvas the sets are the stored episodes in the stored order (with their map's width); on the canvas
    each training set sits at one random offset (the curriculum's first stage: all at the origin, canvas_origin), the
    held-out sets at the origin, where evaluate.py plays."""
    cfg = data_config(tmp_path, n_maps=12, canvas=False)
    plain = data.load_episode_sets(cfg, "train")
    (where,) = (tmp_path / "data").glob("train-*")
    stored, maps = json.loads((where / "episodes.json").read_text()), frozenlake.train_maps(12)
    for (m, r, chosen), loaded in zip(stored["sets"], plain):
        assert loaded == [dqn.Episode(*stored["episodes"][m][r][i], ncol=len(maps[m][0])) for i in chosen]
    canvas = data_config(tmp_path, n_maps=12)
    offsets = set_offsets(data.load_episode_sets(canvas, "train"), stored, maps)
    assert len(set(offsets)) > 3  # 24 sets of maps of at most 5 x 5: spread over the canvas
    assert offsets == set_offsets(data.load_episode_sets(canvas, "train"), stored, maps)  # seeded
    assert set(set_offsets(data.load_episode_sets(canvas, "train", canvas_origin=True), stored, maps)) == {(0, 0)}
    test = data.load_episode_sets(canvas, "test")
    (where,) = (tmp_path / "data").glob("test-*")
    stored = json.loads((where / "episodes.json").read_text())
    assert len(test) == 50 and set(set_offsets(test, stored, frozenlake.test_maps())) == {(0, 0)}
