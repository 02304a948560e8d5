"""frozenlake.py against gymnasium 1.4's FrozenLake-v1, the known optimal success numbers and hand-computed values."""
import collections
import hashlib
import json
import os
import struct
import subprocess
import sys

import gymnasium
import pytest
from gymnasium.envs.toy_text.frozen_lake import FrozenLakeEnv

import frozenlake as fl
from frozenlake import DOWN, LEFT, RIGHT, UP


def one_map_per_size(maps):
    by_size = {}
    for m in maps:
        by_size.setdefault((len(m), len(m[0])), m)
    return [by_size[size] for size in sorted(by_size)]


MULTI_START_GOAL = ["SFFG", "FHFF", "SFHS", "GFFF"]
GENERATED = one_map_per_size(fl.train_maps()) + one_map_per_size(fl.ood_maps())
ALL_SETS = {"train": fl.train_maps(), "test": fl.test_maps(), "ood": fl.ood_maps()}


# ---------------------------------------------------------------------------------------------------------------------
# Dynamics equal gymnasium's


@pytest.mark.parametrize("slippery", [False, True])
@pytest.mark.parametrize("desc", [fl.MAP_4X4, fl.MAP_8X8, fl.STITCHING_MAP, MULTI_START_GOAL] + GENERATED,
                         ids=lambda d: f"{len(d)}x{len(d[0])}:{''.join(d)}")
def test_transition_table_equals_gymnasium(desc, slippery):
    ours = fl.FrozenLake(desc, is_slippery=slippery)
    theirs = gymnasium.make("FrozenLake-v1", desc=desc, is_slippery=slippery).unwrapped
    assert ours.P == theirs.P
    assert ours.observation_space.n == theirs.observation_space.n
    assert ours.action_space.n == theirs.action_space.n == 4


def test_generated_maps_cover_every_size():
    sizes = {(len(m), len(m[0])) for m in GENERATED}
    assert sizes == {(r, c) for r in (3, 4, 5) for c in (3, 4, 5)} | {(r, c) for r in (6, 7) for c in (6, 7)}


@pytest.mark.parametrize("desc", [fl.MAP_4X4, fl.MAP_8X8, fl.STITCHING_MAP, MULTI_START_GOAL] + GENERATED[:4])
def test_episodes_equal_gymnasium_with_time_limit(desc):
    """Same non-slippery action sequences, step by step, against gymnasium.make's TimeLimit (here 7 steps, so some
    episodes are truncated and some end in holes or goals)."""
    import random
    rng = random.Random(len(desc) * 100 + len(desc[0]))
    ours = fl.FrozenLake(desc, max_steps=7)
    theirs = gymnasium.make("FrozenLake-v1", desc=desc, is_slippery=False, max_episode_steps=7)
    for episode in range(30):
        start, _ = ours.reset(seed=episode)
        theirs.reset(seed=episode)
        theirs.unwrapped.s = start  # the two generators draw different starts on maps with several
        while True:
            a = rng.randrange(4)
            mine, gym_step = ours.step(a), theirs.step(a)
            assert mine[:4] == gym_step[:4]
            assert mine[4]["prob"] == gym_step[4]["prob"]
            if mine[2] or mine[3]:
                break


def test_goal_on_the_last_allowed_step_is_terminated_and_truncated_like_gymnasium():
    path = [DOWN, DOWN, RIGHT, DOWN, RIGHT, RIGHT]  # 0 -> 4 -> 8 -> 9 -> 13 -> 14 -> 15 (goal)
    ours = fl.FrozenLake(fl.MAP_4X4, max_steps=len(path))
    theirs = gymnasium.make("FrozenLake-v1", desc=fl.MAP_4X4, is_slippery=False, max_episode_steps=len(path))
    ours.reset(seed=0), theirs.reset(seed=0)
    for a in path:
        mine, gym_step = ours.step(a), theirs.step(a)
    assert mine[:4] == gym_step[:4] == (15, 1.0, True, True)


# ---------------------------------------------------------------------------------------------------------------------
# Step and reset semantics, hand-checked


def test_scripted_path_reaches_the_goal():
    env = fl.FrozenLake(fl.MAP_4X4)
    assert env.reset(seed=0) == (0, {"prob": 1})
    visited, rewards = [], []
    for a in [DOWN, DOWN, RIGHT, DOWN, RIGHT, RIGHT]:
        obs, reward, terminated, truncated, info = env.step(a)
        visited.append(obs), rewards.append(reward)
        assert info == {"prob": 1.0} and not truncated
    assert visited == [4, 8, 9, 13, 14, 15]
    assert rewards == [0.0] * 5 + [1.0] and terminated


def test_hole_ends_the_episode_with_zero():
    env = fl.FrozenLake(fl.MAP_4X4)
    env.reset(seed=0)
    assert env.step(RIGHT) == (1, 0.0, False, False, {"prob": 1.0})
    assert env.step(DOWN) == (5, 0.0, True, False, {"prob": 1.0})  # tile 5 is a hole


def test_pressing_left_forever_is_truncated_at_max_steps():
    env = fl.FrozenLake(fl.MAP_4X4, max_steps=100)
    env.reset(seed=0)
    for step in range(1, 100):
        assert env.step(LEFT) == (0, 0.0, False, False, {"prob": 1.0}), step
    assert env.step(LEFT) == (0, 0.0, False, True, {"prob": 1.0})
    env.reset()
    assert not env.step(LEFT)[3]  # reset starts a new step count


@pytest.mark.parametrize("state, action, expected", [
    (0, LEFT, 0), (0, UP, 0), (0, RIGHT, 1), (7, RIGHT, 7), (7, UP, 7), (56, LEFT, 56), (56, DOWN, 56),
    (62, DOWN, 62), (62, RIGHT, 63), (15, RIGHT, 15), (31, RIGHT, 31), (8, LEFT, 8),
])
def test_moves_off_the_grid_stay_in_place(state, action, expected):
    env = fl.FrozenLake(fl.MAP_8X8)
    env.s = state
    assert env.step(action)[0] == expected


def test_reset_seed_reproduces_slippery_episodes():
    def trajectory(seed):
        env = fl.FrozenLake(fl.MAP_8X8, is_slippery=True, max_steps=200)
        states = [env.reset(seed=seed)[0]]
        for a in [RIGHT, DOWN] * 100:
            obs, _, terminated, truncated, _ = env.step(a)
            states.append(obs)
            if terminated or truncated:
                break
        return states
    assert trajectory(7) == trajectory(7)
    assert any(trajectory(7) != trajectory(seed) for seed in range(8, 12))


def test_start_is_uniform_among_all_start_tiles():
    env = fl.FrozenLake(["SFS", "FFF", "SFG"])
    env.reset(seed=0)
    counts = collections.Counter(env.reset()[0] for _ in range(3000))
    assert set(counts) == {0, 2, 6}
    # 1000 expected each; the standard deviation is sqrt(3000 * 1/3 * 2/3) ~ 26, so 150 is a ~6 sigma band
    assert all(abs(n - 1000) < 150 for n in counts.values()), counts


def test_slipping_goes_to_the_intended_and_both_perpendicular_tiles_equally():
    env = fl.FrozenLake(["FFF", "FSF", "FFG"], is_slippery=True)
    env.reset(seed=0)
    counts = collections.Counter()
    for _ in range(3000):
        env.reset()
        obs, _, _, _, info = env.step(DOWN)
        counts[obs] += 1
        assert info["prob"] == pytest.approx(1 / 3)
    assert set(counts) == {3, 7, 5}  # left, down, right of the centre
    assert all(abs(n - 1000) < 150 for n in counts.values()), counts


def finite_horizon_success(env, horizon):
    """Value iteration over `horizon` steps on env.P: the best probability of reaching a goal from each state."""
    value = [0.0] * env.observation_space.n
    for _ in range(horizon):
        value = [max(sum(p * (r + (0.0 if done else value[t])) for p, t, r, done in env.P[s][a]) for a in range(4))
                 for s in range(len(value))]
    return value


@pytest.mark.parametrize("desc, horizon, expected", [(fl.MAP_4X4, 100, 0.744190), (fl.MAP_8X8, 200, 0.913220)])
def test_value_iteration_reproduces_gymnasium_optimal_success(desc, horizon, expected):
    env = fl.FrozenLake(desc, is_slippery=True, max_steps=horizon)
    assert finite_horizon_success(env, horizon)[0] == pytest.approx(expected, abs=5e-7)


def test_bad_calls_raise():
    env = fl.FrozenLake(fl.MAP_4X4)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(LEFT)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="action"):
        env.step(4)
    with pytest.raises(ValueError, match="max_steps"):
        fl.FrozenLake(fl.MAP_4X4, max_steps=0)


# ---------------------------------------------------------------------------------------------------------------------
# Shortest paths


def shortest_steps_by_relaxation(desc):
    """Steps to the nearest goal from gymnasium's own deterministic table, by repeated relaxation (no BFS)."""
    P = FrozenLakeEnv(desc=desc, is_slippery=False).P
    flat = "".join(desc)
    dist = [0 if tile == "G" else None for tile in flat]
    changed = True
    while changed:
        changed = False
        for s, tile in enumerate(flat):
            if tile in "GH":
                continue
            options = [dist[P[s][a][0][1]] for a in range(4) if dist[P[s][a][0][1]] is not None]
            if options and (dist[s] is None or min(options) + 1 < dist[s]):
                dist[s], changed = min(options) + 1, True
    return dist


def test_goal_distances_and_optimal_actions_by_hand():
    assert fl.goal_distances(fl.MAP_4X4) == [6, 5, 4, 5, 5, None, 3, None, 4, 3, 2, None, None, 2, 1, 0]
    best = fl.optimal_actions(fl.MAP_4X4)
    assert best[0] == [DOWN, RIGHT] and best[9] == [DOWN, RIGHT] and best[14] == [RIGHT]
    assert best[5] == best[15] == []  # hole, goal
    assert fl.goal_distances(["SHG"]) == [None, None, 0]


@pytest.mark.parametrize("name", ALL_SETS)
def test_goal_distances_and_optimal_actions_agree_with_gymnasium_table(name):
    for desc in ALL_SETS[name][::5] + [fl.MAP_8X8, fl.STITCHING_MAP]:
        dist = fl.goal_distances(desc)
        assert dist == shortest_steps_by_relaxation(desc)
        P = FrozenLakeEnv(desc=desc, is_slippery=False).P
        for s, actions in enumerate(fl.optimal_actions(desc)):
            closer = [a for a in range(4) if dist[s] and dist[P[s][a][0][1]] == dist[s] - 1]
            assert actions == closer


# ---------------------------------------------------------------------------------------------------------------------
# The paper's maps


@pytest.mark.parametrize("name, count, sizes", [("train", 250, (3, 5)), ("test", 50, (3, 5)), ("ood", 50, (6, 7))])
def test_every_map_of_every_set_meets_the_generator_constraints(name, count, sizes):
    maps = ALL_SETS[name]
    assert len(maps) == count
    assert len({tuple(m) for m in maps}) == count  # unique within the set
    low, high = sizes
    assert {len(m) for m in maps} == {len(m[0]) for m in maps} == set(range(low, high + 1))  # the whole range occurs
    for desc in maps:
        assert all(len(row) == len(desc[0]) for row in desc) and set("".join(desc)) <= set("SFHG")
        dist = shortest_steps_by_relaxation(desc)
        starts = [s for s, tile in enumerate("".join(desc)) if tile == "S"]
        assert starts and "G" in "".join(desc)
        assert all(dist[s] is not None and dist[s] >= 4 for s in starts), desc
        fl.FrozenLake(desc)  # valid for the environment too


def test_test_maps_are_held_out_from_training():
    assert not {tuple(m) for m in ALL_SETS["test"]} & {tuple(m) for m in ALL_SETS["train"]}


def test_generator_is_reproducible_and_byte_identical_everywhere():
    assert fl.generate_maps(30, seed=11) == fl.generate_maps(30, seed=11)
    assert fl.generate_maps(30, seed=11) != fl.generate_maps(30, seed=12)
    assert fl.train_maps() == fl.generate_maps(250, seed=0)
    # Fingerprints of the named sets as first generated: a change here means the published sets changed.
    digests = {name: hashlib.sha256(json.dumps(maps).encode()).hexdigest() for name, maps in ALL_SETS.items()}
    assert digests == {
        "train": "5caf54bb725ecfa852f2b285503a9b6aa416258b0b8265d03db6943d4fe142cc",
        "test": "497e823fbf583dbca41abfb3f97734a204960f2f443fa335cb14cfd2d507dcb8",
        "ood": "ff1c5f79ffb5c9f78bbaee6ff34317d3f187fa03fc3fa4ebb661dccafb50d212",
    }
    assert ALL_SETS["train"][0] == ["HFFFF", "FFHFG", "FFFFF", "FSFFF", "FHSFF"]


def test_more_training_maps_extend_the_250_and_avoid_the_test_maps():
    more = fl.train_maps(600)
    assert more[:250] == fl.train_maps() and fl.train_maps(40) == fl.train_maps()[:40]
    assert len({tuple(m) for m in more}) == 600 and all(m not in ALL_SETS["test"] for m in more)
    assert {(len(m), len(m[0])) for m in more} == {(r, c) for r in (3, 4, 5) for c in (3, 4, 5)}
    # the 350 new ones are those the same generator draws next once the test maps are ruled out
    rest = fl.generate_maps(600, seed=0, exclude=ALL_SETS["test"])[250:]
    assert more[250:] == rest and all(fl.is_valid_map(m, 4) for m in rest)
    with pytest.raises(ValueError, match="at least one"):
        fl.train_maps(0)


def test_generator_honours_its_parameters():
    maps = fl.generate_maps(40, rows=(4, 4), cols=(6, 6), seed=3, min_hops=6, p_hole=0.0)
    assert all(len(m) == 4 and len(m[0]) == 6 and "H" not in "".join(m) for m in maps)
    assert all(fl.goal_distances(m)[s] >= 6 for m in maps for s, t in enumerate("".join(m)) if t == "S")
    exclude = maps[:20]
    again = fl.generate_maps(40, rows=(4, 4), cols=(6, 6), seed=3, min_hops=6, p_hole=0.0, exclude=exclude)
    assert not {tuple(m) for m in again} & {tuple(m) for m in exclude}


def test_raw_tile_frequencies_are_the_papers():
    """Each raw tile (before maps are filtered for validity): start 0.1; else goal 0.1; else hole 0.2; else frozen,
    i.e. S 0.1, G 0.09, H 0.162, F 0.648. Counted over 200,000 seeded draws, each within 5 binomial sigmas."""
    import inspect
    import math
    import random
    defaults = {k: v.default for k, v in inspect.signature(fl.generate_maps).parameters.items()}
    assert (defaults["p_start"], defaults["p_goal"], defaults["p_hole"]) == (0.1, 0.1, 0.2)
    n, rng = 200_000, random.Random(0)
    counts = collections.Counter(fl._random_tile(rng, 0.1, 0.1, 0.2) for _ in range(n))
    expected = {"S": 0.1, "G": 0.9 * 0.1, "H": 0.9 * 0.9 * 0.2, "F": 0.9 * 0.9 * 0.8}
    assert set(counts) == set(expected)
    for tile, p in expected.items():
        sigma = math.sqrt(n * p * (1 - p))  # 134 for S ... 214 for F
        assert abs(counts[tile] - n * p) < 5 * sigma, (tile, counts[tile], n * p)
    # the order of the draws matters: goal-first would give G 0.1 and S 0.09, which this band rejects (15+ sigmas)
    assert abs(counts["S"] - n * 0.09) > 5 * math.sqrt(n * 0.09 * 0.91)


def test_returned_sets_are_copies():
    fl.train_maps()[0][0] = "XXXXX"
    assert fl.train_maps()[0][0] == "HFFFF"


def test_stitching_map_is_the_papers():
    assert fl.STITCHING_MAP == "HHFF FFFF SFFH HFFF HFFF HFGF".split()
    env = fl.FrozenLake(fl.STITCHING_MAP)
    assert (env.nrow, env.ncol) == (6, 4) and env.reset(seed=0)[0] == 8 and env.starts == [8]
    assert [s for s, tile in enumerate("".join(fl.STITCHING_MAP)) if tile == "G"] == [22]
    # the two context episodes of the paper: 2 -> 6 -> ... -> 22 succeeds, 8 -> 9 -> 10 -> 11 falls in a hole
    assert [env.P[s][DOWN][0][1] for s in (2, 6, 10, 14, 18)] == [6, 10, 14, 18, 22]
    assert env.P[18][DOWN] == [(1.0, 22, 1.0, True)]
    assert env.P[10][RIGHT] == [(1.0, 11, 0.0, True)]
    assert fl.goal_distances(fl.STITCHING_MAP)[8] == 5  # 8 -> 9 -> 10 -> 14 -> 18 -> 22


def test_classic_maps_are_gymnasiums():
    from gymnasium.envs.toy_text.frozen_lake import MAPS
    assert fl.MAP_4X4 == MAPS["4x4"] and fl.MAP_8X8 == MAPS["8x8"]


@pytest.mark.parametrize("desc, message", [
    (["SFF", "FG"], "not rectangular"),
    (["SFX", "FFG"], "unknown tile"),
    (["FFF", "FFG"], "no start"),
    (["SFF", "FFF"], "no goal"),
    (["SHF", "HFG"], "no reachable goal"),
    (["SFF", "FFF", "HHH", "GFS"], "no reachable goal from start state\\(s\\) \\[0\\]"),
    ("SFFG", "list of row strings"),
    ([], "empty"),
])
def test_invalid_maps_raise_clear_errors(desc, message):
    with pytest.raises(ValueError, match=message):
        fl.FrozenLake(desc)


def test_impossible_request_raises_instead_of_looping():
    with pytest.raises(ValueError, match="no new valid 2x2 map"):
        fl.generate_maps(3, rows=(2, 2), cols=(2, 2), max_tries=1000)  # on 2x2 no goal is 4 steps away
    with pytest.raises(ValueError, match="rows"):
        fl.generate_maps(3, rows=(5, 3))


# ---------------------------------------------------------------------------------------------------------------------
# Pictures and import hygiene


def test_render_text_shows_the_agent():
    text = fl.render_text(fl.MAP_4X4, state=5)
    lines = text.splitlines()
    assert len(lines) == 4 and text.count("[") == 1
    assert lines[1].startswith(" F [H]")
    assert "[" not in fl.render_text(fl.MAP_4X4)


def png_size(path):
    with open(path, "rb") as f:
        header = f.read(24)
    assert header[:8] == b"\x89PNG\r\n\x1a\n" and header[12:16] == b"IHDR"
    return struct.unpack(">II", header[16:24])


def test_render_png_draws_trajectories(tmp_path):
    plain, drawn = tmp_path / "plain.png", tmp_path / "stitching.png"
    fl.render_png(fl.STITCHING_MAP, [], plain)
    fl.render_png(fl.STITCHING_MAP, [[2, 6, 10, 14, 18, 22], [8, 9, 10, 11], [8, 8, 9]], drawn, title="stitching")
    width, height = png_size(drawn)
    assert width > 100 and height > width  # 6 rows x 4 columns: taller than wide
    assert os.path.getsize(drawn) > 2000 and drawn.read_bytes() != plain.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.png", "stitching.png"]  # no temp file left
    with pytest.raises(ValueError, match="outside this 6x4 map"):
        fl.render_png(fl.STITCHING_MAP, [[8, 24]], tmp_path / "bad.png")


def test_import_needs_only_the_standard_library():
    code = "import sys, frozenlake; assert not {'numpy', 'matplotlib', 'gymnasium'} & set(sys.modules), sys.modules"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
