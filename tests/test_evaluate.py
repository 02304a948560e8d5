"""evaluate.py: the paper's warm-up schedule, the shared random stream, the baselines against exact values, the
KV-cached batched model path against recomputing the whole context, the stitching context, the context-overflow
policy, determinism, and the baselines against FINDINGS.md's numbers."""
import copy
import json
import math

import pytest
import torch

import dqn
import evaluate
import frozenlake
import llama
import train


# ---------------------------------------------------------------------------------------------------------------------
# helpers

def tiny_model(max_seq_len=4096, seed=0):
    """A 2-layer random LLaMA over the cpu preset's tokenizer. Weights N(0, 16/fan_in): large enough that attention
    moves the Q-values with the context (at a small init every state answers the same action) and the top two
    Q-values stay ≥ 1e-2 apart, far above float rounding, so cached and recomputed argmaxes must agree."""
    tokenizer = train.small_tokenizer()
    args = llama.ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tokenizer.n_words, ffn_dim=64,
                           rope_theta=10000.0, rope_scaling=None, max_seq_len=max_seq_len)
    torch.manual_seed(seed)
    model = llama.Transformer(args).eval()
    for name, p in model.named_parameters():
        if p.dim() == 2 and "tok_embeddings" not in name:
            torch.nn.init.normal_(p, std=4 / p.shape[1] ** 0.5)
    return model, dqn.TrajectoryFormat.for_tokenizer(tokenizer)


def exact_random_success(desc, max_steps=100):
    """P(reach a goal within max_steps) of uniform random actions from a uniform start: dynamic programming over the
    remaining steps, v_n(s) = Σ_a ¼ (r(s,a) + [not terminal] v_{n-1}(s'))."""
    env = frozenlake.FrozenLake(desc, max_steps=max_steps)
    v = [0.0] * env.observation_space.n
    for _ in range(max_steps):
        v = [sum(0.25 * (r + (0.0 if done else v[t])) for a in range(4) for _, t, r, done in env.P[s][a])
             for s in range(len(v))]
    return sum(v[s] for s in env.starts) / len(env.starts)


class FixedPolicy:
    """Greedy action is always RIGHT: shows which steps the harness gave to the policy."""
    name = "fixed"

    def reset(self, n_rows):
        pass

    def add_context(self, row, episode):
        pass

    def greedy_actions(self, rows, maps, episodes):
        return [frozenlake.RIGHT] * len(rows)

    def observe(self, row, episode, terminated, done):
        pass


class Recorder(FixedPolicy):
    """Wraps a policy and keeps every (row, greedy action) it returned, in order."""

    def __init__(self, policy):
        self.policy, self.log, self.episodes = policy, [], {}

    def reset(self, n_rows):
        self.policy.reset(n_rows)

    def add_context(self, row, episode):
        self.policy.add_context(row, episode)

    def greedy_actions(self, rows, maps, episodes):
        actions = self.policy.greedy_actions(rows, maps, episodes)
        self.log += list(zip(rows, actions))
        return actions

    def observe(self, row, episode, terminated, done):
        self.policy.observe(row, episode, terminated, done)
        if done:
            self.episodes.setdefault(row, []).append(copy.deepcopy(episode))


# ---------------------------------------------------------------------------------------------------------------------
# schedule and random stream

def test_schedule_is_the_papers():
    expected = [0, 0, .1, .1, .2, .2, .3, .3, .4, .4, .5, .5, .6, .6, .7, .7, .8, .8, .9, .9] + [1.0] * 10
    assert evaluate.schedule(30) == pytest.approx(expected, abs=1e-12)
    assert evaluate.schedule(3, warmup=0) == [1.0, 1.0, 1.0]


def test_random_or_greedy_choice_follows_the_schedule():
    maps = [[m] for m in frozenlake.test_maps()]
    probs = evaluate.schedule(20)  # 0, 0, 0.1, ..., 0.9, 0.9
    greedy, steps, right = [0] * 20, [0] * 20, [0] * 20
    for seed in range(4):
        out = evaluate.run_episodes(FixedPolicy(), maps, probs, seed=seed)
        for row in range(len(maps)):
            for k in range(20):
                greedy[k] += out["greedy_steps"][row][k]
                steps[k] += out["steps"][row][k]
                path, desc = out["paths"][row][k], maps[row][0]
                right[k] += sum(frozenlake._move(desc, s, frozenlake.RIGHT) == t for s, t in zip(path, path[1:]))
    for k in range(20):
        p, n = probs[k], steps[k]
        assert abs(greedy[k] - n * p) <= 4 * math.sqrt(n * p * (1 - p)) + 1e-9, (k, greedy[k], n, p)
        # moves consistent with RIGHT: every greedy step, plus about a quarter of the random ones (or more: a wall
        # makes several actions stay in place)
        assert right[k] >= greedy[k] + 0.25 * (n - greedy[k]) - 4 * math.sqrt(n * 0.25) - 1e-9


def test_the_random_stream_is_shared_by_all_policies():
    """Episodes 0 and 1 are fully random: every policy walks the same paths there."""
    maps = [[m] for m in frozenlake.test_maps()[:10]]
    probs = evaluate.schedule(2)
    paths = [evaluate.run_episodes(p, maps, probs, seed=5)["paths"]
             for p in (evaluate.RandomPolicy(), evaluate.OraclePolicy(), evaluate.QLearningPolicy(), FixedPolicy())]
    assert all(p == paths[0] for p in paths[1:])


# ---------------------------------------------------------------------------------------------------------------------
# baselines against exact values

def test_oracle_succeeds_in_every_greedy_episode_along_a_shortest_path():
    maps = frozenlake.test_maps() + frozenlake.ood_maps()
    out = evaluate.run_episodes(evaluate.OraclePolicy(), [[m] for m in maps], [1.0] * 2, seed=0)
    for desc, steps, success, paths in zip(maps, out["steps"], out["success"], out["paths"]):
        assert success == [1.0, 1.0]
        assert steps == [frozenlake.goal_distances(desc)[path[0]] for path in paths]


def test_random_baseline_matches_its_exact_success_probability():
    desc = ["SFFF", "FHFH", "FFFH", "HFFG"]
    exact = exact_random_success(desc)  # ≈ 0.117 (non-slippery, 100 steps)
    out = evaluate.run_episodes(evaluate.RandomPolicy(), [[desc]] * 20, evaluate.schedule(100, warmup=200), seed=3)
    n = 20 * 100
    observed = sum(map(sum, out["success"])) / n
    assert abs(observed - exact) <= 4 * math.sqrt(exact * (1 - exact) / n), (observed, exact)


@pytest.mark.slow
def test_baselines_on_the_50_id_maps_land_near_findings():
    """FINDINGS.md (another implementation, other maps): random ≈ 0.17, Q-learning episodes 20-29 ≈ 0.52. Our held-out
    maps are a different draw: the random policy's exact expectation on them is computed too."""
    maps = frozenlake.test_maps()
    exact = sum(exact_random_success(m) for m in maps) / len(maps)
    probs = evaluate.schedule(30)
    random_success, q_last10 = [], []
    for seed in range(4):
        rand = evaluate.run_episodes(evaluate.RandomPolicy(seed), [[m] for m in maps], [0.0] * 30, seed=seed)
        random_success += [s for row in rand["success"] for s in row]
        q = evaluate.run_episodes(evaluate.QLearningPolicy(seed=seed), [[m] for m in maps], probs, seed=seed)
        q_last10 += [s for row in q["success"] for s in row[20:]]
    r = sum(random_success) / len(random_success)
    assert abs(r - exact) < 0.03, (r, exact)  # ~6000 episodes: sd ≈ 0.005 (plus map-to-map correlation)
    assert abs(r - 0.17) < 0.06, r
    assert abs(sum(q_last10) / len(q_last10) - 0.52) < 0.08, sum(q_last10) / len(q_last10)


# ---------------------------------------------------------------------------------------------------------------------
# the model path

def test_context_text_is_dqn_tokenize_episode():
    """The context built step by step is exactly the training text: tokenize_episode of each finished episode."""
    model, fmt = tiny_model()
    policy = Recorder(evaluate.ModelPolicy(model, fmt, context=100_000))
    maps = [[m] for m in frozenlake.test_maps()[:3]]
    evaluate.run_episodes(policy, maps, [0.0, 0.0, 0.5], seed=1, max_steps=20)
    assert policy.policy.mismatches == 0 and policy.policy.overflows == 0
    for row in range(3):
        expected = sum((dqn.tokenize_episode(ep, fmt)[0] for ep in policy.episodes[row]), [])
        assert policy.policy.rows[row].tokens == expected
    assert any(ep.truncated for eps in policy.episodes.values() for ep in eps)  # the edit block is covered


@pytest.mark.slow
def test_cached_batched_path_chooses_the_same_actions_as_recompute():
    """Maps of 3x3 to 7x7 in one batch, rows at different history lengths; a 300-token context forces overflows
    (whole-episode drops and in-episode cuts) in both paths."""
    model, fmt = tiny_model()
    maps = [[m] for m in frozenlake.test_maps()[:4] + frozenlake.ood_maps()[:2]]
    assert len({(len(m[0]), len(m[0][0])) for m in maps}) >= 4
    probs = evaluate.schedule(6, warmup=4)
    logs, paths, overflows = [], [], []
    for recompute in (False, True):
        policy = Recorder(evaluate.ModelPolicy(model, fmt, context=300, recompute=recompute))
        out = evaluate.run_episodes(policy, maps, probs, seed=2, max_steps=40)
        logs.append(policy.log)
        paths.append(out["paths"])
        overflows.append(policy.policy.overflows)
    assert logs[0] == logs[1] and paths[0] == paths[1]
    assert overflows[0] == overflows[1] > 0
    assert len({a for _, a in logs[0]}) > 1  # the model does not answer one constant action


def test_cached_path_matches_recompute_without_overflow():
    model, fmt = tiny_model(seed=1)
    maps = [[m] for m in frozenlake.test_maps()[5:8] + frozenlake.ood_maps()[3:4]]
    logs = []
    for recompute in (False, True):
        policy = Recorder(evaluate.ModelPolicy(model, fmt, context=4096, recompute=recompute))
        evaluate.run_episodes(policy, maps, [0.0, 1.0, 1.0], seed=0, max_steps=12)
        logs.append(policy.log)
        assert policy.policy.overflows == 0
    assert logs[0] == logs[1]


def test_context_overflow_is_counted_and_bounded():
    model, fmt = tiny_model()
    policy = evaluate.ModelPolicy(model, fmt, context=96)
    maps = [[m] for m in frozenlake.test_maps()[:3]]
    evaluate.run_episodes(policy, maps, [0.0] * 4, seed=0, max_steps=30)
    assert policy.overflows > 0
    for st in policy.rows:
        assert len(st.tokens) <= 96 + 32  # at most one step's tokens past the limit between two actions
        assert st.tokens[:len(fmt.episode_start())] == fmt.episode_start()  # cuts land on episode/step boundaries


# ---------------------------------------------------------------------------------------------------------------------
# experiments and outputs

def test_stitching_context_is_the_papers():
    first, second = evaluate.stitching_context()
    assert (first.observations, first.actions, first.rewards, first.truncated) == \
        ([2, 6, 10, 14, 18, 22], [frozenlake.DOWN] * 5, [0.0, 0.0, 0.0, 0.0, 1.0], False)
    assert (second.observations, second.actions, second.rewards, second.truncated) == \
        ([8, 9, 10, 11], [frozenlake.RIGHT] * 3, [0.0, 0.0, 0.0], False)
    env = frozenlake.FrozenLake(frozenlake.STITCHING_MAP)
    assert env.starts == [8]
    for ep, tile in ((first, "G"), (second, "H")):  # each step is a real transition of the map
        for s, a, r, t in zip(ep.observations, ep.actions, ep.rewards, ep.observations[1:]):
            assert env.P[s][a][0][1:3] == (t, r)
        assert "".join(frozenlake.STITCHING_MAP)[ep.observations[-1]] == tile
    model, fmt = tiny_model()
    policy = evaluate.ModelPolicy(model, fmt)
    policy.reset(1)
    for ep in (first, second):
        policy.add_context(0, ep)
    assert policy.rows[0].tokens == dqn.tokenize_episode(first, fmt)[0] + dqn.tokenize_episode(second, fmt)[0]


@pytest.mark.slow
def test_evaluate_writes_outputs_and_is_deterministic(tmp_path):
    model, fmt = tiny_model()
    texts = []
    for out in ("a", "b"):
        cfg = evaluate.EvalConfig(experiment="nonstationary", maps=3, episodes=4, warmup=2, baseline_seeds=2,
                                  max_steps=25, context=256, out=str(tmp_path / out), progress=False)
        evaluate.evaluate(cfg, evaluate.ModelPolicy(model, fmt, context=256))
        record = json.loads((tmp_path / out / "nonstationary" / "results.json").read_text())
        record["config"].pop("out")
        texts.append(json.dumps(record, sort_keys=True))
    assert texts[0] == texts[1]
    record = json.loads(texts[0])
    assert set(record["policies"]) == {"model", "random", "q-learning", "oracle"}
    assert len(record["policies"]["model"]["success"][0]) == 3  # seed -> map -> episode
    assert len(record["policies"]["model"]["success"][0][0]) == 8  # 4 on each of the two maps
    assert len(record["policies"]["random"]["success"]) == 2
    assert record["model_stats"]["context_overflows"] > 0
    out_dir = tmp_path / "a" / "nonstationary"
    for name in ("success.csv", "summary.md", "success.png"):
        assert (out_dir / name).stat().st_size > 0
    assert "context overflows" in (out_dir / "summary.md").read_text()


def test_stitching_experiment_draws_its_pictures(tmp_path):
    model, fmt = tiny_model()
    cfg = evaluate.EvalConfig(experiment="stitching", baseline_seeds=1, max_steps=20, out=str(tmp_path),
                              progress=False)
    report = evaluate.evaluate(cfg, evaluate.ModelPolicy(model, fmt))
    assert report["stitching"]["oracle"]["last10"] == 1.0  # 5 greedy trials, all along a shortest path
    names = {p.name for p in (tmp_path / "stitching").iterdir()}
    assert {"context.png", "trial0_model.png", "trial4_model.png", "trial0_oracle.png", "results.json"} <= names
    record = json.loads((tmp_path / "stitching" / "results.json").read_text())
    assert all(path[0] == 8 for path in record["policies"]["model"]["paths"][0][0])  # trials start at the start


def test_cli_rejects_bad_input():
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--experiment", "id"])  # neither --run nor --baselines-only
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--baselines-only", "--episodes", "0"])
    cfg = evaluate.parse_args(["--baselines-only", "--experiment", "ood", "--maps", "5"])
    assert (cfg.experiment, cfg.maps, cfg.baselines_only) == ("ood", 5, True)
