"""ia3.py against PEFT's IA3 on transformers' LlamaForCausalLM (the independent reference), on tiny random
checkpoints written by transformers and read with llama.load."""
import json

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import ia3
import llama

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)


def make_checkpoint(path, seed=0, **overrides):
    """A random LlamaForCausalLM saved as an HF dir. Weights wider than HF's init (std 0.02) and random norm
    weights, so that attention is far from uniform and every IA3 vector visibly changes the logits."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{**TINY, **overrides}, initializer_range=0.15)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    return path


def hf_model(path, dtype=torch.float32):
    return transformers.LlamaForCausalLM.from_pretrained(path, dtype=dtype).eval()


def randomize_(params, seed):
    """Vectors in [0.5, 1.5], all entries distinct: l_k[j] != l_k[j + D/2], a scaling RoPE does not commute with."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)


def peft_model(path, dtype=torch.float32, seed=1):
    """PEFT's IA3 with its llama defaults (k_proj, v_proj, down_proj) on a fresh transformers model, random vectors."""
    model = peft.get_peft_model(hf_model(path, dtype), peft.IA3Config(task_type="CAUSAL_LM"))
    randomize_([p for name, p in model.named_parameters() if "ia3_l" in name], seed)
    return model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, TINY["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))


def test_fresh_adapter_is_the_identity(ckpt, tokens):
    model = llama.load(ckpt)
    adapter = ia3.IA3(model)
    assert all(torch.equal(p, torch.ones_like(p)) and p.requires_grad and p.dtype == torch.float32
               for p in adapter.parameters())
    with torch.no_grad():
        assert torch.equal(model(tokens, adapter=adapter), model(tokens))


def test_parameter_count_llama_3_1_8b():
    with torch.device("meta"):
        model = llama.Transformer(llama.ModelArgs())
    adapter = ia3.IA3(model)
    assert sum(p.numel() for p in adapter.parameters()) == 524_288  # Llama 3.1 8B's IA3 vectors, as PEFT counts them
    assert [t.shape[0] for t in adapter.layer_scales(0)] == [1024, 1024, 14336]


def test_we_load_what_peft_wrote(ckpt, tokens, tmp_path):
    reference = peft_model(ckpt)
    reference.save_pretrained(tmp_path)
    model = llama.load(ckpt)
    adapter = ia3.IA3.from_pretrained(tmp_path, model)
    for name, p in reference.named_parameters():  # the same values, in PEFT's (out, 1) / (1, in) shapes
        if "ia3_l" in name:
            i, target = int(name.split(".layers.")[1].split(".")[0]), name.split(".")[-3]
            assert torch.equal(adapter.peft_state_dict()[ia3.peft_key(i, target)], p)
    with torch.no_grad():
        expected = reference(input_ids=tokens).logits
        ours, base = model(tokens, adapter=adapter), model(tokens)
    assert (ours - expected).abs().max() < 1e-4
    assert (base - expected).abs().max() > 0.05  # the vectors matter: the check above could fail


def test_peft_loads_what_we_wrote(ckpt, tokens, tmp_path):
    model = llama.load(ckpt)
    adapter = ia3.IA3(model)
    randomize_(adapter.parameters(), seed=2)
    adapter.save_pretrained(tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json",
                                                                        "adapter_model.safetensors"]  # no temp files
    reference = peft.PeftModel.from_pretrained(hf_model(ckpt), tmp_path / "adapter")
    assert reference.peft_config["default"].peft_type == peft.PeftType.IA3
    assert reference.peft_config["default"].feedforward_modules == {"down_proj"}
    with torch.no_grad():
        expected = reference(input_ids=tokens).logits
        ours = model(tokens, adapter=adapter)
    assert (ours - expected).abs().max() < 1e-4
    reloaded = ia3.IA3.from_pretrained(tmp_path / "adapter", model)
    assert all(torch.equal(a, b) for a, b in zip(adapter.parameters(), reloaded.parameters()))


def test_merge_matches_adapter_and_leaves_base_untouched(ckpt, tokens):
    model = llama.load(ckpt)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = ia3.IA3(model)
    randomize_(adapter.parameters(), seed=3)
    merged = ia3.merge(model, adapter)
    with torch.no_grad():
        assert (merged(tokens) - model(tokens, adapter=adapter)).abs().max() < 1e-5
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert merged.tok_embeddings.weight is model.tok_embeddings.weight  # untouched tensors shared, not copied
    assert merged.layers[0].attention.wk.weight.data_ptr() != model.layers[0].attention.wk.weight.data_ptr()
    l_k, l_v, l_ff = adapter.layer_scales(1)  # rows of W_k, W_v and columns of W_2, by hand
    assert torch.allclose(merged.layers[1].attention.wk.weight, model.layers[1].attention.wk.weight * l_k[:, None])
    assert torch.allclose(merged.layers[1].attention.wv.weight, model.layers[1].attention.wv.weight * l_v[:, None])
    assert torch.allclose(merged.layers[1].feed_forward.w2.weight, model.layers[1].feed_forward.w2.weight * l_ff)


def test_k_is_scaled_before_rope(ckpt, tokens):
    """Scaling k before RoPE = scaling the rows of W_k. After RoPE it would differ: rotation mixes j and j + D/2,
    and l_k[j] != l_k[j + D/2] here."""
    model = llama.load(ckpt)
    adapter = ia3.IA3(model)
    randomize_(adapter.l_k, seed=4)  # l_v, l_ff stay ones
    half = model.args.head_dim // 2
    assert (adapter.l_k[0].view(-1, 2, half)[:, 0] != adapter.l_k[0].view(-1, 2, half)[:, 1]).all()
    with torch.no_grad():
        ours, merged, base = model(tokens, adapter=adapter), ia3.merge(model, adapter)(tokens), model(tokens)
    assert (ours - merged).abs().max() < 1e-5
    assert (ours - base).abs().max() > 0.01


def test_only_the_adapter_learns(ckpt, tokens):
    model = llama.load(ckpt)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = ia3.IA3(model)
    target = adapter.copy()
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-2, weight_decay=0.01)
    loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1], adapter=adapter).flatten(0, 1),
                                             tokens[:, 1:].flatten())
    loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in adapter.parameters())
    grads = [p.grad.clone() for p in adapter.parameters()]
    adapter.zero_grad()
    model.gradient_checkpointing = True  # the paper's setting: the adapter must still get the same gradients
    torch.nn.functional.cross_entropy(model(tokens[:, :-1], adapter=adapter).flatten(0, 1),
                                      tokens[:, 1:].flatten()).backward()
    assert all(torch.allclose(p.grad, g, atol=1e-7) for p, g in zip(adapter.parameters(), grads))
    optimizer.step()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(not torch.equal(p, torch.ones_like(p)) for p in adapter.parameters())
    assert all(torch.equal(p, torch.ones_like(p)) and not p.requires_grad for p in target.parameters())


def test_two_adapters_share_one_model(ckpt, tokens):
    model = llama.load(ckpt)
    model_bytes = lambda: sum(p.numel() * p.element_size() for p in model.parameters())  # noqa: E731
    pointers = lambda: {k: v.data_ptr() for k, v in model.state_dict().items()}  # noqa: E731
    bytes_before, pointers_before = model_bytes(), pointers()
    online = ia3.IA3(model)
    randomize_(online.parameters(), seed=5)
    with torch.no_grad():
        online_alone = model(tokens, adapter=online)
    target = online.copy()
    randomize_(target.parameters(), seed=6)
    assert sum(p.numel() for p in target.parameters()) == sum(p.numel() for p in online.parameters())
    with torch.no_grad():
        out_online, out_target = model(tokens, adapter=online), model(tokens, adapter=target)
        out_target_merged = ia3.merge(model, target)(tokens)
    assert torch.equal(out_online, online_alone)  # the second adapter changed nothing for the first
    assert (out_target - out_target_merged).abs().max() < 1e-5
    assert (out_target - out_online).abs().max() > 0.05
    assert model_bytes() == bytes_before and pointers() == pointers_before  # nothing copied into or out of the model
    model_ptrs = set(pointers_before.values())
    assert not any(p.data_ptr() in model_ptrs for a in (online, target) for p in a.parameters())


def test_fp32_adapter_on_bf16_base_matches_peft(ckpt, tokens, tmp_path):
    """bf16 bound: each implementation rounds in its own op order, so ours and transformers' bf16 base models may
    disagree by some δ; the adapter must add no more than that: |ours + IA3 − PEFT| ≤ 2δ + 0.02 (logits std ≈ 1.2).
    Measured: δ = 0 and a difference of 0 (same op order as transformers); rounding the vectors to bf16 before the
    product (not PEFT's semantics) gives 0.09 and fails."""
    reference = peft_model(ckpt, dtype=torch.bfloat16)
    assert {p.dtype for n, p in reference.named_parameters() if "ia3_l" in n} == {torch.float32}  # PEFT's autocast
    reference.save_pretrained(tmp_path)
    model = llama.load(ckpt, dtype=torch.bfloat16)
    adapter = ia3.IA3.from_pretrained(tmp_path, model)
    assert adapter.l_ff[0].dtype == torch.float32 and model.layers[0].feed_forward.w2.weight.dtype == torch.bfloat16
    with torch.no_grad():
        expected = reference(input_ids=tokens).logits.float()
        ours = model(tokens, adapter=adapter)
        with reference.disable_adapter():
            delta = (model(tokens) - reference(input_ids=tokens).logits.float()).abs().max()
    assert ours.dtype == torch.float32
    assert (ours - expected).abs().max() <= 2 * delta + 0.02


def test_mismatched_adapters_fail_clearly(ckpt, tmp_path):
    model = llama.load(ckpt)
    ia3.IA3(model).save_pretrained(tmp_path / "ours")

    wider_ffn = llama.load(make_checkpoint(tmp_path / "ffn", intermediate_size=80))
    with pytest.raises(ValueError, match="down_proj.ia3_l has shape .*different model"):
        ia3.IA3.from_pretrained(tmp_path / "ours", wider_ffn)
    with pytest.raises(ValueError, match="different model"):
        ia3.merge(wider_ffn, ia3.IA3(model))
    deeper = llama.load(make_checkpoint(tmp_path / "deep", num_hidden_layers=3))
    with pytest.raises(ValueError, match="missing 3 of 9 vectors, e.g. .*layers.2"):
        ia3.IA3.from_pretrained(tmp_path / "ours", deeper)
    with pytest.raises(ValueError, match="adapter has 2 layers, the model has 3"):
        ia3.merge(deeper, ia3.IA3(model))

    peft_kv_only = peft.get_peft_model(hf_model(ckpt), peft.IA3Config(target_modules=["k_proj", "v_proj"],
                                                                      feedforward_modules=[]))
    peft_kv_only.save_pretrained(tmp_path / "kv_only")
    with pytest.raises(ValueError, match=r"target_modules is \['[kv]_proj', '[kv]_proj'\]; .*supports only"):
        ia3.IA3.from_pretrained(tmp_path / "kv_only", model)

    extra = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    extra["base_model.model.lm_head.weight"] = torch.zeros(TINY["vocab_size"], TINY["hidden_size"])
    (tmp_path / "extra").mkdir()
    save_file(extra, tmp_path / "extra" / "adapter_model.safetensors")
    (tmp_path / "extra" / "adapter_config.json").write_text((tmp_path / "ours" / "adapter_config.json").read_text())
    with pytest.raises(ValueError, match="1 tensors this model has no place for, e.g. base_model.model.lm_head"):
        ia3.IA3.from_pretrained(tmp_path / "extra", model)

    # same vectors, but the config says PEFT applied them elsewhere: refused by field name, not silently misread
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert ia3.IA3.from_pretrained(tmp_path / "ours", model) is not None
    for field, value, shown in (("target_modules", ["q_proj", "v_proj", "down_proj"], r"\['q_proj'"),
                                ("target_modules", "k_proj|v_proj|down_proj", "'k_proj|v_proj|down_proj'"),
                                ("feedforward_modules", [], r"\[\]"),
                                ("feedforward_modules", ["down_proj", "up_proj"], r"\['down_proj', 'up_proj'\]"),
                                ("feedforward_modules", None, "None")):
        (tmp_path / "ours" / "adapter_config.json").write_text(json.dumps({**config, field: value}))
        with pytest.raises(ValueError, match=f"{field} is {shown}.*; IA3.from_pretrained supports only"):
            ia3.IA3.from_pretrained(tmp_path / "ours", model)
    (tmp_path / "ours" / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "LORA"}))
    with pytest.raises(ValueError, match="peft_type is 'LORA'"):
        ia3.IA3.from_pretrained(tmp_path / "ours", model)
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        ia3.IA3.from_pretrained(tmp_path / "nowhere", model)
