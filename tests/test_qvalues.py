"""qvalues.py: the true optimal Q-values against hand-computed ones, its numbers on hand-made pairs, and the script
end to end on a toy model (every step recorded once, with the Q-values behind the action its row took)."""
import json
import struct

import pytest
import torch

import compact
import frozenlake
import llama
import policy
import qvalues
import rollout

LEFT, DOWN, RIGHT, UP = 0, 1, 2, 3


def test_true_q_is_30_gamma_to_the_steps_after_the_first_move():
    """S F F / F H G: distances to the goal 3 2 1 / 4 - 0 (3 only reaches it through 0). Q*(s, a) = 30·0.9^(d-1),
    d = 1 + the distance of where a leads; a bump into the edge stays (d = 1 + dist(s)), a hole is 0."""
    q = qvalues.true_q(["SFF", "FHG"])
    v = lambda d: 30 * 0.9 ** (d - 1)  # noqa: E731
    expected = {0: [v(4), v(5), v(3), v(4)],   # left: edge; down: 3 (dist 4); right: 1 (dist 2); up: edge
                1: [v(4), 0.0, v(2), v(3)],    # down: the hole
                2: [v(3), v(1), v(2), v(2)],   # down: the goal, 30
                3: [v(5), v(5), 0.0, v(4)]}    # left, down: edge; right: the hole; up: 0
    for s, row in expected.items():
        assert q[s] == pytest.approx(row, abs=1e-9), s
    assert q[2][DOWN] == 30.0 and q[0][RIGHT] == pytest.approx(24.3) and q[3][LEFT] == pytest.approx(19.683)
    # S G / H H / F F: the bottom row cannot reach the goal (its value is 0), the start bumps at distance 1
    q = qvalues.true_q(["SG", "HH", "FF"])
    assert q[0] == pytest.approx([27.0, 0.0, 30.0, 27.0]) and q[4] == q[5] == [0.0] * 4


def test_pair_stats_on_hand_made_pairs():
    steps = [{"q": [0, 0, q, 0], "action": RIGHT, "q_star": star} for q, star in ((32, 30), (29, 27), (2, 0))]
    assert qvalues.pair_stats(steps) == {"steps": 3, "pearson": pytest.approx(1.0), "mae": pytest.approx(2.0)}
    steps = [{"q": [q, 0, 0, 0], "action": LEFT, "q_star": 0.0} for q in (1.0, -2.0)]
    assert qvalues.pair_stats(steps) == {"steps": 2, "pearson": None, "mae": 1.5}  # Q* constant: no correlation


def png_size(path):
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n" and header[12:16] == b"IHDR"
    return struct.unpack(">II", header[16:24])


def test_qvalues_script_on_a_toy_model(tmp_path, monkeypatch):
    """`python qvalues.py --run RUN --maps 3` on a random-init model (load_policy stubbed: a run dir is
    evaluate.py's concern): every step of the played episodes is recorded once; from episode 21 on (always greedy)
    every step took the argmax of the Q-values recorded for its row, so those Q-values are the ones it acted on."""
    tok = policy.small_tokenizer("compact")
    args = llama.ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.n_words, ffn_dim=64,
                           rope_theta=10000.0, rope_scaling=None, max_seq_len=1024)
    torch.manual_seed(0)
    model, fmt = llama.Transformer(args).eval(), compact.CompactFormat(tok.special_tokens, canvas=True)
    monkeypatch.setattr(policy, "load_policy", lambda run, device: (model, None, tok, fmt))
    played = []
    run_episodes = rollout.run_episodes
    monkeypatch.setattr(rollout, "run_episodes", lambda *a, **k: played.append(run_episodes(*a, **k)) or played[-1])
    record = qvalues.main(["--run", str(tmp_path), "--maps", "3", "--max-steps", "12", "--lake", "1"])
    out = tmp_path / "eval" / "id"
    assert json.loads((out / "qvalues.json").read_text()) == record
    (steps_per_episode,) = [p["steps"] for p in played]
    assert record["maps"] == 3 and record["greedy"]["steps"] == sum(n for row in steps_per_episode for n in row[20:])
    assert record["warm_up"]["steps"] + record["greedy"]["steps"] == record["steps"]
    assert record["steps"] < sum(n for row in steps_per_episode for n in row)  # random steps left out
    assert record["pearson"] is None or -1 <= record["pearson"] <= 1
    for name, lake in (("qvalues.png", None), ("qvalues_map.png", frozenlake.test_maps()[1])):
        width, height = png_size(out / name)
        if lake:  # the lake's own shape: 1.1 in per tile at 120 dpi, plus margins
            assert width == round((1.1 * len(lake[0]) + 0.4) * 120) and height == round((1.1 * len(lake) + 0.8) * 120)
