"""llama.py against transformers' LlamaForCausalLM, Llama 3.1's published numbers, and its own full forward (KV cache)."""
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import llama
import llama_tokenizer

ROPE3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 64}  # small original context so all three RoPE bands occur at D = 16


def hf_model(heads, kv_heads, tied, rope_scaling, dim=64, layers=2, vocab=300, seed=0):
    """A random transformers LLaMA with weights large enough that every block matters (HF init is std 0.02)."""
    torch.manual_seed(seed)
    rope = {"rope_theta": 10000.0, **(rope_scaling or {"rope_type": "default"})}
    cfg = LlamaConfig(hidden_size=dim, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, intermediate_size=96, vocab_size=vocab, rms_norm_eps=1e-5,
                      rope_parameters=rope, max_position_embeddings=256, tie_word_embeddings=tied)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model


def to_4x_config(path):
    """Rewrites a saved config.json in the transformers 4.x style (rope_theta + rope_scaling, torch_dtype)."""
    cfg = json.loads((path / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope if rope["rope_type"] != "default" else None
    cfg["torch_dtype"] = cfg.pop("dtype")
    (path / "config.json").write_text(json.dumps(cfg))


CONFIGS = [  # (heads, kv_heads, tied, rope_scaling, sharded, config style)
    (4, 4, False, ROPE3, False, "5.x"),  # MHA
    (4, 4, True, None, True, "4.x"),  # MHA, tied, plain RoPE
    (4, 2, False, None, True, "5.x"),  # GQA 2
    (8, 2, True, ROPE3, False, "4.x"),  # GQA 4
    (6, 3, False, ROPE3, True, "4.x"),  # GQA 2, head_dim not a power of two
    (4, 1, False, ROPE3, False, "5.x"),  # GQA 4 with one KV head
]


@pytest.mark.parametrize("heads,kv_heads,tied,rope_scaling,sharded,style", CONFIGS)
def test_logits_match_transformers(tmp_path, heads, kv_heads, tied, rope_scaling, sharded, style):
    ref = hf_model(heads, kv_heads, tied, rope_scaling, dim=48 if heads == 6 else 64)
    ref.save_pretrained(tmp_path, max_shard_size="40KB" if sharded else "1GB")
    assert (tmp_path / "model.safetensors.index.json").exists() == sharded
    if style == "4.x":
        to_4x_config(tmp_path)
    model = llama.load(tmp_path)
    assert model.args.tie_word_embeddings == tied and (model.output is None) == tied
    assert (model.args.rope_scaling is None) == (rope_scaling is None)
    tokens = torch.randint(0, 300, (2, 100))  # positions past the 64-token original context
    with torch.no_grad():
        expected = ref(tokens).logits
        assert expected.abs().max() > 1  # the comparison is not trivially about near-zero numbers
        assert (model(tokens) - expected).abs().max() < 1e-4
        model.use_sdpa = False
        assert (model(tokens) - expected).abs().max() < 1e-4


def test_bf16_close_to_transformers(tmp_path):
    """bf16 tolerance: our bf16 logits are as close to the fp32 logits as transformers' own bf16 logits are
    (error ≤ 1.5 × theirs + 0.02), and within 2% of the logit range of transformers' bf16 logits."""
    ref = hf_model(8, 2, False, ROPE3)
    ref.save_pretrained(tmp_path)
    tokens = torch.randint(0, 300, (2, 64))
    with torch.no_grad():
        exact = ref(tokens).logits
        ref_bf16 = ref.to(torch.bfloat16)(tokens).logits.float()
        model = llama.load(tmp_path, dtype=torch.bfloat16)
        assert model.layers[0].attention.wq.weight.dtype == torch.bfloat16
        ours = model(tokens)
    assert ours.dtype == torch.float32
    assert (ours - exact).abs().max() <= 1.5 * (ref_bf16 - exact).abs().max() + 0.02
    assert (ours - ref_bf16).abs().max() <= 0.02 * exact.abs().max()


def test_rope_frequencies_reference():
    omega = llama.rope_frequencies(128, 500000.0, llama.LLAMA3_ROPE_SCALING)
    plain = llama.rope_frequencies(128, 500000.0, None)
    expected = torch.tensor([2.1665706e-03, 1.3718937e-03, 8.5675146e-04, 5.2484602e-04, 3.1269365e-04, 1.7850779e-04])
    torch.testing.assert_close(omega[29:35], expected, rtol=1e-6, atol=0)
    assert torch.equal(omega[:29], plain[:29])  # 29 kept
    assert torch.allclose(omega[35:], plain[35:] / 8)  # 29 divided by the factor
    assert ((omega[29:35] < plain[29:35]) & (omega[29:35] > plain[29:35] / 8)).all()  # 6 smoothed


def test_ffn_width_rule():
    assert llama.ffn_hidden_dim(4096, 1.3, 1024) == 14336
    assert llama.ffn_hidden_dim(8192, 1.3, 4096) == 28672
    assert llama.ffn_hidden_dim(2048, 1.5, 256) == 8192


def test_8b_on_meta_device():
    cfg = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 128256, "intermediate_size": 14336, "rms_norm_eps": 1e-5,
           "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": False,
           "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
    assert llama.ModelArgs.from_hf_config(cfg) == llama.ModelArgs()
    with torch.device("meta"):
        model = llama.Transformer(llama.ModelArgs())
    assert sum(p.numel() for p in model.parameters()) == 8_030_261_248
    assert len(llama.hf_names(model.args)) == 291


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(1)
    model = llama.Transformer(llama.ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=300, ffn_dim=96,
                                              rope_scaling={**ROPE3}, max_seq_len=256)).eval().requires_grad_(False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model


@pytest.mark.parametrize("use_sdpa", [True, False])
@torch.no_grad()
def test_kv_cache_steps_equal_full_forward(small, use_sdpa):
    small.use_sdpa = use_sdpa
    tokens = torch.randint(0, 300, (3, 40))
    full = small(tokens)
    cache = small.new_cache(3, 48)
    steps, pos = [], 0
    for n in (17, 1, 1, 8, 1, 12):  # prefill, single tokens, multi-token chunks
        steps.append(small(tokens[:, pos:pos + n], pos, cache))
        pos += n
    small.use_sdpa = True
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-5


@pytest.mark.parametrize("use_sdpa", [True, False])
@torch.no_grad()
def test_kv_cache_per_row_start_pos_right_padded(small, use_sdpa):
    """Rows with different history lengths in one batch: right-padded chunks, per-row start positions."""
    small.use_sdpa = use_sdpa
    tokens = torch.randint(0, 300, (3, 40))
    full = small(tokens)
    lengths = torch.tensor([3, 11, 7])  # true tokens per row in each chunk
    cache, start = small.new_cache(3, 64), torch.zeros(3, dtype=torch.long)
    for _ in range(3):
        chunk = torch.full((3, int(lengths.max())), 299)  # padding junk
        for b in range(3):
            chunk[b, :lengths[b]] = tokens[b, start[b]:start[b] + lengths[b]]
        out = small(chunk, start, cache)
        for b in range(3):
            assert (out[b, :lengths[b]] - full[b, start[b]:start[b] + lengths[b]]).abs().max() < 1e-5
        start += lengths
        lengths = torch.tensor([5, 1, 6])
    small.use_sdpa = True
    # without a cache, per-row start positions only shift RoPE: a row at offset s equals that row alone at s
    shifted = small(tokens[:, :10], torch.tensor([0, 5, 9]))
    assert (shifted[1:2] - small(tokens[1:2, :10], 5)).abs().max() < 1e-5
    assert (shifted[0] - full[0, :10]).abs().max() < 1e-5


@torch.no_grad()
def test_cuda_attention_leaves_out_cudnn_and_cpu_attention_is_the_plain_call(small, monkeypatch):
    """On CUDA every SDPA call (causal prefill, GQA with a cache mask) runs with cuDNN's backend off and the others
    on, then cuDNN's flag is back; on the CPU the call sees the flags untouched. A tensor that reports is_cuda
    stands in for the GPU: the backend flags are global, so the CPU kernel runs under the same settings."""
    real, seen = torch.nn.functional.scaled_dot_product_attention, []
    flags = torch.backends.cuda
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", lambda *a, **kw: seen.append(
        (flags.cudnn_sdp_enabled(), flags.flash_sdp_enabled(), flags.mem_efficient_sdp_enabled(),
         flags.math_sdp_enabled(), "enable_gqa" in kw)) or real(*a, **kw))  # no enable_gqa: the folded GQA path
    tokens = torch.randint(0, 300, (2, 12))
    cpu = small(tokens)
    cached = small.new_cache(2, 16)
    small(tokens[:, :8], torch.tensor([0, 0]), cached)
    assert set(seen) == {(True, True, True, True, True), (True, True, True, True, False)}  # the CPU: untouched
    seen.clear()
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert (small(tokens) - cpu).abs().max() == 0  # same kernel, same numbers
    small(tokens[:, :8], torch.tensor([0, 0]), small.new_cache(2, 16))  # per-row starts: the masked GQA path
    monkeypatch.undo()
    assert len(seen) == 2 * small.args.n_layers  # both paths: cuDNN off, flash, efficient and math on
    assert set(seen) == {(False, True, True, True, True), (False, True, True, True, False)}
    assert flags.cudnn_sdp_enabled()  # switched back on after each call


@torch.no_grad()
def test_cache_too_small_raises(small):
    cache = small.new_cache(1, 8)
    with pytest.raises(ValueError, match="too small"):
        small(torch.zeros(1, 9, dtype=torch.long), 0, cache)


@torch.no_grad()
def test_logits_at_and_vocab_ids_are_slices(small):
    tokens = torch.randint(0, 300, (2, 30))
    full = small(tokens)
    at = torch.tensor([[0, 7, 29], [3, 3, 12]])
    ids = torch.tensor([5, 299, 0, 17])
    rows = torch.arange(2)[:, None]
    assert torch.allclose(small(tokens, logits_at=at), full[rows, at], atol=1e-5)
    assert torch.allclose(small(tokens, vocab_ids=ids), full[..., ids], atol=1e-5)
    assert torch.allclose(small(tokens, logits_at=at, vocab_ids=ids), full[rows, at][..., ids], atol=1e-5)


class Scales(torch.nn.Module):
    """A stand-in adapter with the contract's hook: layer_scales(i) -> (l_k, l_v, l_ff)."""

    def __init__(self, args, dtype=torch.float32):
        super().__init__()
        kv = args.n_kv_heads * args.head_dim
        self.l = torch.nn.ParameterList(torch.nn.Parameter(1 + 0.3 * torch.randn(n, dtype=dtype))
                                        for _ in range(args.n_layers) for n in (kv, kv, args.ffn_dim))

    def layer_scales(self, i):
        return self.l[3 * i], self.l[3 * i + 1], self.l[3 * i + 2]


@torch.no_grad()
def test_adapter_hook_equals_folded_weights(small, tmp_path):
    """IA3 semantics: l_k scales rows of wk (before RoPE), l_v rows of wv, l_ff columns of w2."""
    adapter = Scales(small.args)
    folded = llama.Transformer(small.args).eval()
    folded.load_state_dict(small.state_dict())
    for i, layer in enumerate(folded.layers):
        l_k, l_v, l_ff = adapter.layer_scales(i)
        layer.attention.wk.weight.mul_(l_k[:, None])
        layer.attention.wv.weight.mul_(l_v[:, None])
        layer.feed_forward.w2.weight.mul_(l_ff[None, :])
    tokens = torch.randint(0, 300, (2, 20))
    expected = folded(tokens)
    assert (small(tokens, adapter=adapter) - expected).abs().max() < 1e-4
    assert (small(tokens) - expected).abs().max() > 1e-2  # the adapter changed something
    cache = small.new_cache(2, 20)
    steps = [small(tokens[:, :12], 0, cache, adapter=adapter), small(tokens[:, 12:], 12, cache, adapter=adapter)]
    assert (torch.cat(steps, 1) - expected).abs().max() < 1e-4
    # fp32 adapter on a bf16 base: products are cast back to bf16, the forward stays bf16 inside
    bf16 = llama.Transformer(small.args).to(torch.bfloat16).eval()
    bf16.load_state_dict(small.state_dict())
    assert (bf16(tokens, adapter=adapter) - expected).abs().max() < 0.1 * expected.abs().max()


def test_gradient_checkpointing_same_gradients(small):
    tokens = torch.randint(0, 300, (2, 16))
    grads = []
    for flag in (False, True):
        torch.manual_seed(0)
        adapter = Scales(small.args)
        small.gradient_checkpointing = flag
        small(tokens, adapter=adapter, logits_at=torch.tensor([[3, 9], [15, 0]])).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in adapter.parameters()]))
    small.gradient_checkpointing = False
    assert grads[0].abs().max() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6)


def test_save_roundtrip_loads_in_transformers(small, tmp_path):
    llama.save(small, tmp_path)
    tokens = torch.randint(0, 300, (1, 24))
    with torch.no_grad():
        assert torch.equal(llama.load(tmp_path)(tokens), small(tokens))
        ref = LlamaForCausalLM.from_pretrained(tmp_path).eval()
        assert (ref(tokens).logits - small(tokens)).abs().max() < 1e-4
    small_bf16 = llama.Transformer(small.args).to(torch.bfloat16)
    llama.save(small_bf16, tmp_path)  # overwrite in place
    assert llama.load(tmp_path).tok_embeddings.weight.dtype == torch.bfloat16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


# ---------------------------------------------------------------- loader errors, one by one

@pytest.fixture
def sharded(tmp_path):
    hf_model(4, 2, False, None).save_pretrained(tmp_path, max_shard_size="40KB")
    return tmp_path


def test_error_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        llama.load(tmp_path)


def test_error_not_llama(sharded):
    cfg = json.loads((sharded / "config.json").read_text())
    (sharded / "config.json").write_text(json.dumps({**cfg, "model_type": "mistral"}))
    with pytest.raises(ValueError, match="model_type is 'mistral', expected 'llama'"):
        llama.load(sharded)


def test_error_missing_shard(sharded):
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"{shard.name}: shard listed in model.safetensors.index.json"):
        llama.load(sharded)


def test_error_missing_tensor(sharded):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(KeyError, match=r"missing tensor model\.layers\.1\.mlp\.up_proj\.weight .*shape \(96, 64\)"):
        llama.load(sharded)


def test_error_missing_tensor_in_shard_file(sharded):
    """The index lists a tensor the shard file does not hold."""
    from safetensors.torch import load_file, save_file
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    file = sharded / index["weight_map"]["model.norm.weight"]
    tensors = load_file(file)
    del tensors["model.norm.weight"]
    save_file(tensors, file)
    with pytest.raises(KeyError, match=f"{file.name}: missing tensor model.norm.weight"):
        llama.load(sharded)


def test_error_unexpected_tensor(tmp_path):
    hf_model(4, 2, False, None).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    with pytest.raises(KeyError, match="unexpected tensor lm_head.weight"):
        llama.load(tmp_path)


def test_error_wrong_shape(tmp_path):
    hf_model(4, 2, False, None).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
    with pytest.raises(ValueError, match=r"model.safetensors: tensor model.layers.0.mlp.down_proj.weight has shape "
                                         r"\(64, 96\), expected \(64, 128\)"):
        llama.load(tmp_path)


@pytest.mark.parametrize("text, message", [
    ("{", r"config.json: not valid JSON"),
    ("[1, 2]", r"config.json: expected a JSON object, got list"),
    ("drop hidden_size", r"config.json: no 'hidden_size'"),
    ("dtype float99", r"config.json: unknown dtype 'float99'"),
])
def test_error_bad_config_names_the_file(tmp_path, text, message):
    hf_model(4, 2, False, None).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    if text == "drop hidden_size":
        text = json.dumps({k: v for k, v in cfg.items() if k != "hidden_size"})
    elif text == "dtype float99":
        text = json.dumps({**cfg, "dtype": "float99", "torch_dtype": "float99"})
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ValueError, match=str(tmp_path).replace("\\", "/") + "/" + message):
        llama.load(tmp_path)


def test_error_bad_index_names_the_file(sharded):
    (sharded / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(ValueError, match="model.safetensors.index.json: no 'weight_map'"):
        llama.load(sharded)
    (sharded / "model.safetensors.index.json").write_text("{oops")
    with pytest.raises(ValueError, match="model.safetensors.index.json: not valid JSON"):
        llama.load(sharded)


def test_error_integer_tensor_is_refused_not_cast(tmp_path):
    from safetensors.torch import load_file, save_file
    hf_model(4, 2, False, None).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"].round().to(torch.int32)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="tensor model.norm.weight is torch.int32, expected floating-point"):
        llama.load(tmp_path)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_error_corrupt_or_truncated(tmp_path, damage):
    hf_model(4, 2, False, None).save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(b"\x00garbage" * 100 if damage == "garbage" else data[:len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors: corrupt or truncated safetensors file"):
        llama.load(tmp_path)


# ---------------------------------------------------------------- real weights: SmolLM2-135M-Instruct

@pytest.mark.slow
def test_smollm2_matches_transformers(smollm2_dir):
    import gguf_to_hf
    model = llama.load(smollm2_dir)
    tok = llama_tokenizer.Tokenizer(smollm2_dir)
    tokens = torch.tensor([tok.encode("The capital of France is Paris, and the capital of Germany is")])
    with torch.no_grad():
        ours = model(tokens)
        ref = LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
        assert (ref(tokens).logits - ours).abs().max() < 1e-4
        # independent of our converter: transformers' own GGUF reader, dequantizer and q/k permutation
        path = gguf_to_hf.gguf_path()
        from_gguf = LlamaForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
        assert (from_gguf(tokens).logits - ours).abs().max() < 1e-4


@pytest.mark.slow
def test_smollm2_greedy_says_paris(smollm2_dir):
    model, tok = llama.load(smollm2_dir), llama_tokenizer.Tokenizer(smollm2_dir)
    text = llama.generate(model, tok, "The capital of France is", max_new_tokens=8)
    assert "Paris" in text
    # nucleus sampling with top_p → 0 keeps only the most likely token: greedy again
    assert llama.generate(model, tok, "The capital of France is", 8, temperature=1.0, top_p=0.0, seed=0) == text
    a = llama.generate(model, tok, "Once upon a time", 12, temperature=1.0, top_p=0.95, seed=3)
    assert a == llama.generate(model, tok, "Once upon a time", 12, temperature=1.0, top_p=0.95, seed=3)
