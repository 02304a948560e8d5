"""dqn.py against the paper's text (decoded with Meta's real Llama 3 tokenizer), hand-computed targets and losses."""
import collections
import copy
import random
import warnings

import pytest
import torch

import compact
import dqn
import ia3
import llama
import llama_tokenizer
import policy
from dqn import Episode

LEFT, DOWN, RIGHT, UP = 0, 1, 2, 3
H = lambda role, text: f"<|start_header_id|>{role}<|end_header_id|>{text}<|eot_id|>"  # noqa: E731

# The toy trajectory: a success (8 -> 9 -> 13 -> 14, goal) and an episode cut by the step limit (8 -> 8 -> 4)
SUCCESS = Episode([8, 9, 13, 14], [RIGHT, DOWN, RIGHT], [0.0, 0.0, 1.0], False)
TRUNCATED = Episode([8, 8, 4], [LEFT, UP], [0.0, 0.0], True)
SUCCESS_TEXT = ("<|begin_of_text|>" + H("observation", 8) + H("action", "right") + H("observation", 9)
                + H("action", "down") + H("observation", 13) + H("action", "right") + H("observation", 14)
                + H("reward", "1.0") + "<|end_of_text|>")
TRUNCATED_TEXT = ("<|begin_of_text|>" + H("observation", 8) + H("action", "left") + H("observation", 8)
                  + H("action", "up") + H("observation", 4) + H("edit", "...") + "<|end_of_text|>")


@pytest.fixture(scope="module")
def llama3_tok(llama3_tokenizer_path):
    return llama_tokenizer.Tokenizer(llama3_tokenizer_path)


@pytest.fixture(scope="module")
def llama3_fmt(llama3_tok):
    return dqn.TrajectoryFormat.for_tokenizer(llama3_tok)


def tiny_tokenizer(words=dqn.ACTION_WORDS):
    """A byte-level tiktoken vocabulary with Llama 3 special-token names, like the cpu preset's: 256 bytes plus the
    prefixes of `words` (so BPE can merge each word into one token)."""
    ranks = {bytes([b]): b for b in range(256)}
    for w in words:
        for i in range(2, len(w) + 1):
            ranks.setdefault(w[:i].encode(), len(ranks))
    specials = list(dqn.LLAMA3_FORMAT_SPECIALS) + ["<|eom_id|>"]
    return llama_tokenizer.Tokenizer.from_ranks(ranks, llama_tokenizer.LLAMA3_PATTERN, specials)


def tiny_model(vocab_size, seed=0):
    torch.manual_seed(seed)
    args = llama.ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size, ffn_dim=64,
                           rope_theta=10000.0, rope_scaling=None, max_seq_len=1024)
    return llama.Transformer(args)


# ---------------------------------------------------------------------------------------------------------------------
# The text format


def test_llama3_text_is_the_papers_format(llama3_tok, llama3_fmt):
    assert llama3_fmt.action_ids == [llama3_tok.encode(w)[0] for w in ("left", "down", "right", "up")]
    for word in dqn.ACTION_WORDS:  # each action word is one Llama 3 token
        assert len(llama3_tok.encode(word)) == 1
    for ep, text in ((SUCCESS, SUCCESS_TEXT), (TRUNCATED, TRUNCATED_TEXT)):
        tokens, q_positions = dqn.tokenize_episode(ep, llama3_fmt)
        assert llama3_tok.decode(tokens) == text
        assert tokens == llama3_tok.encode(text, allowed_special="all")  # what the tokenizer itself makes of the text
        assert len(q_positions) == len(ep.actions)
        for p, a in zip(q_positions, ep.actions):  # Q position: the <|end_header_id|> after "action"; then the word
            assert llama3_tok.decode(tokens[p - 2:p + 1]) == "<|start_header_id|>action<|end_header_id|>"
            assert llama3_tok.decode([tokens[p + 1]]) == dqn.ACTION_WORDS[a]


def test_format_pieces_compose_the_episode(llama3_fmt):
    """Evaluation builds contexts piece by piece in the documented order; it must give tokenize_episode's ids."""
    f = llama3_fmt
    for ep in (SUCCESS, TRUNCATED):
        built = f.episode_start() + f.observation(ep.observations[0])
        for a, s, r in zip(ep.actions, ep.observations[1:], ep.rewards):
            built += f.action_prompt() + f.action_word(a) + f.observation(s) + (f.reward(r) if r != 0 else [])
        built += f.episode_end(ep)
        assert built == dqn.tokenize_episode(ep, f)[0]
    assert f.episode_end(TRUNCATED) == f.block("edit", "...") + f.eos and f.episode_end(SUCCESS) == f.eos


def test_reward_text_rounded_to_two_decimals(llama3_tok, llama3_fmt):
    assert llama3_tok.decode(llama3_fmt.reward(1)) == H("reward", "1.0")
    assert llama3_tok.decode(llama3_fmt.reward(0.12345)) == H("reward", "0.12")


def test_chatml_mapping_for_smollm2(smollm2_dir):
    tok = llama_tokenizer.Tokenizer(smollm2_dir)
    fmt = dqn.TrajectoryFormat.for_tokenizer(tok)
    tokens, q_positions = dqn.tokenize_episode(TRUNCATED, fmt)
    assert tok.decode(tokens) == ("<|im_start|>observation\n8<|im_end|><|im_start|>action\nleft<|im_end|>"
                                  "<|im_start|>observation\n8<|im_end|><|im_start|>action\nup<|im_end|>"
                                  "<|im_start|>observation\n4<|im_end|><|im_start|>edit\n...<|im_end|><|endoftext|>")
    assert [tok.decode([tokens[p]]) for p in q_positions] == ["\n", "\n"]  # last token before the action word
    assert [tok.decode([tokens[p + 1]]) for p in q_positions] == ["left", "up"]
    assert fmt.action_ids == [tok.encode(w)[0] for w in dqn.ACTION_WORDS]


def test_tiny_byte_vocabulary_like_the_cpu_preset():
    tok = tiny_tokenizer()
    fmt = dqn.TrajectoryFormat.for_tokenizer(tok)
    tokens, q_positions = dqn.tokenize_episode(SUCCESS, fmt)
    assert tok.decode(tokens) == SUCCESS_TEXT
    assert [tok.decode([tokens[p + 1]]) for p in q_positions] == ["right", "down", "right"]
    for text in dqn.FORMAT_TEXTS:  # every text piece of the format is encodable and comes back unchanged
        assert tok.decode(tok.encode(text)) == text
    with pytest.raises(ValueError, match="not single tokens"):  # bytes only: "left" is 4 tokens
        dqn.TrajectoryFormat.for_tokenizer(tiny_tokenizer(words=()))


def test_leading_space_spelling_when_only_it_is_one_token():
    tok = tiny_tokenizer(words=[" " + w for w in dqn.ACTION_WORDS])
    fmt = dqn.TrajectoryFormat.for_tokenizer(tok)
    assert fmt.word_prefix == " "
    assert tok.decode(fmt.action_word(RIGHT)) == " right<|eot_id|>"


def test_bad_input_errors(llama3_fmt):
    with pytest.raises(ValueError, match="observations"):
        dqn.tokenize_episode(Episode([8, 9], [RIGHT, DOWN], [0.0, 0.0]), llama3_fmt)
    with pytest.raises(ValueError, match="truncated"):
        dqn.tokenize_episode(Episode([8, 9], [RIGHT], [1.0], True), llama3_fmt)
    with pytest.raises(ValueError, match="special tokens"):
        dqn.TrajectoryFormat.for_tokenizer(llama_tokenizer.Tokenizer.from_ranks({bytes([b]): b for b in range(256)},
                                                                       llama_tokenizer.LLAMA3_PATTERN, ["<|x|>"]))
    with pytest.raises(TypeError, match="sets"):
        dqn.pack_slices([SUCCESS, TRUNCATED], llama3_fmt, 4096, random.Random(0))


# ---------------------------------------------------------------------------------------------------------------------
# Packing


def random_episode(rng, n_states=25):
    n = rng.randint(1, 12)
    obs = [rng.randrange(n_states) for _ in range(n + 1)]
    truncated = rng.random() < 0.2
    rewards = [0.0] * (n - 1) + [0.0 if truncated else float(rng.random() < 0.5)]
    return Episode(obs, [rng.randrange(4) for _ in range(n)], rewards, truncated)


def test_packing_keeps_whole_episodes_shuffled_within_sets(llama3_fmt):
    rng = random.Random(1)
    sets = [[random_episode(rng) for _ in range(rng.randint(20, 40))] for _ in range(6)]
    context = 1024
    slices = dqn.pack_slices(sets, llama3_fmt, context, random.Random(7))
    bos = llama3_fmt.episode_start()[0]
    texts = {}  # episode text -> episode, to recover which episode each piece of a slice is
    for i, s in enumerate(sets):
        for ep in s:
            texts[tuple(dqn.tokenize_episode(ep, llama3_fmt)[0])] = (i, ep)
    packed = []  # (set index, episode) in packing order
    for k, s in enumerate(slices):
        assert len(s.tokens) <= context and s.tokens[0] == bos
        starts = [i for i, t in enumerate(s.tokens) if t == bos] + [len(s.tokens)]
        episodes = [texts[tuple(s.tokens[a:b])] for a, b in zip(starts, starts[1:])]  # every piece is a whole episode
        if k + 1 < len(slices):  # a slice ends only where the next episode would not fit
            first_episode = slices[k + 1].tokens.index(llama3_fmt.eos[0]) + 1
            assert len(s.tokens) + first_episode > context
        j = 0  # per action: position, word, reward, last flag, and the next action of the same episode
        for e, (set_index, ep) in enumerate(episodes):
            lo, hi = starts[e], starts[e + 1]
            for t, a in enumerate(ep.actions):
                p = s.q_positions[j + t]
                assert lo < p < hi and s.tokens[p + 1] == llama3_fmt.action_ids[a] and s.actions[j + t] == a
                assert s.is_last[j + t] == (t == len(ep.actions) - 1)
                if s.is_last[j + t]:
                    assert s.next_index[j + t] == -1
                    assert s.rewards[j + t] == (0.0 if ep.truncated else sum(ep.rewards))
                else:
                    nxt = s.next_index[j + t]
                    assert nxt == j + t + 1 and lo < s.q_positions[nxt] < hi and s.actions[nxt] == ep.actions[t + 1]
                    assert s.rewards[j + t] == 0.0
            j += len(ep.actions)
        assert j == len(s.actions) == len(s.q_positions) == len(s.rewards) == len(s.is_last) == len(s.next_index)
        packed += episodes
    # every episode exactly once, sets contiguous and in the caller's order, shuffled inside each set
    assert [i for i, _ in packed] == sorted(i for i, _ in packed)
    assert sum(map(len, sets)) == len(packed)
    for i, s in enumerate(sets):
        order = [ep for j, ep in packed if j == i]
        assert sorted(map(id, order)) == sorted(map(id, s)) and [id(e) for e in order] != [id(e) for e in s]
    again = dqn.pack_slices(sets, llama3_fmt, context, random.Random(7))
    assert [s.tokens for s in again] == [s.tokens for s in slices]  # the rng alone decides the shuffle


def test_episode_longer_than_context_is_dropped_with_a_warning(llama3_fmt):
    long = Episode([0] * 101, [UP] * 100, [0.0] * 100, True)
    with pytest.warns(UserWarning, match="dropped 1 episodes \\(100 actions\\)"):
        slices = dqn.pack_slices([[SUCCESS, long, TRUNCATED]], llama3_fmt, 200, random.Random(0))
    assert sum(len(s.actions) for s in slices) == 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing dropped, nothing said
        dqn.pack_slices([[SUCCESS, TRUNCATED]], llama3_fmt, 200, random.Random(0))


# ---------------------------------------------------------------------------------------------------------------------
# Targets and loss, by hand


def toy_batch(fmt):
    """Row 0: SUCCESS then TRUNCATED (5 actions; the last one is the last of the slice). Row 1: TRUNCATED alone."""
    slices = dqn.pack_slices([[SUCCESS], [TRUNCATED]], fmt, 4096, random.Random(0))
    assert len(slices) == 1
    row1 = dqn.pack_slices([[TRUNCATED]], fmt, 4096, random.Random(0))[0]
    return dqn.collate([slices[0], row1], pad_id=fmt.eos[0]), slices[0], row1


def test_collate_pads(llama3_fmt):
    batch, s0, s1 = toy_batch(llama3_fmt)
    assert batch["tokens"].shape == (2, len(s0.tokens)) and batch["q_positions"].shape == (2, 5)
    assert batch["tokens"][1, len(s1.tokens):].eq(llama3_fmt.eos[0]).all()
    assert batch["mask"].tolist() == [[True] * 5, [True, True, False, False, False]]
    assert batch["next_index"].tolist() == [[1, 2, -1, 4, -1], [1, -1, -1, -1, -1]]
    assert batch["is_last"].tolist() == [[False, False, True, False, True], [False, True, True, True, True]]
    assert batch["rewards"].tolist() == [[0, 0, 1, 0, 0], [0, 0, 0, 0, 0]]
    assert batch["actions"].tolist() == [[RIGHT, DOWN, RIGHT, LEFT, UP], [LEFT, UP, 0, 0, 0]]


def test_bellman_targets_by_hand(llama3_fmt):
    batch, _, _ = toy_batch(llama3_fmt)
    # Q values per action slot (left, down, right, up); online and target argmax differ at row 0's slots 1 and 2
    q_online = torch.tensor([[[0., 1., 2., 3.], [5., 0., 0., 4.], [1., 9., 0., 0.], [2., 2., 2., 2.],
                              [0., 0., 0., 7.]],
                             [[1., 1., 1., 1.], [0., 0., 6., 0.], [9., 9., 9., 9.], [9., 9., 9., 9.],
                              [9., 9., 9., 9.]]])
    q_target = torch.tensor([[[4., 4., 4., 4.], [10., 20., 30., 40.], [100., 7., 0., 0.], [1., 1., 1., 1.],
                              [5., 6., 8., 11.]],
                             [[0., 0., 0., 0.], [3., 3., 13., 3.], [0., 0., 0., 0.], [0., 0., 0., 0.],
                              [0., 0., 0., 0.]]])
    q_online.requires_grad_(True)
    y = dqn.bellman_targets(q_online, q_target, batch, gamma=0.9, reward_scale=30.0)
    expected = torch.tensor([
        [0.9 * 10.0,   # SUCCESS a_0: next slot 1, online argmax left (5), target values it 10 (not its own max 40)
         0.9 * 7.0,    # SUCCESS a_1: next slot 2, online argmax down (9), target 7 (its own max would be 100)
         30.0 * 1.0,   # SUCCESS a_2: terminal success, scaled reward, no bootstrap
         0.9 * 11.0,   # TRUNCATED a_0: next slot 4, online argmax up (7), target 11
         0.0],         # TRUNCATED a_1: last action of the slice, truncated -> terminal, reward 0
        [0.9 * 13.0, 0.0, 0.0, 0.0, 0.0]])  # row 1: bootstrap through slot 1 (online right -> 13), then padding
    torch.testing.assert_close(y, expected)
    assert not y.requires_grad
    y2 = dqn.bellman_targets(q_online, q_target, batch, gamma=0.5, reward_scale=2.0)
    torch.testing.assert_close(y2[0], torch.tensor([5.0, 3.5, 2.0, 5.5, 0.0]))


def test_td_loss_by_hand(llama3_fmt):
    batch, _, _ = toy_batch(llama3_fmt)
    q = torch.zeros(2, 5, 4)
    # Q of the taken action per slot (row 0 actions right, down, right, left, up; row 1 left, up, then padding)
    q[0, 0, RIGHT], q[0, 1, DOWN], q[0, 2, RIGHT], q[0, 3, LEFT], q[0, 4, UP] = 1., 2., 3., 4., 5.
    q[1, 0, LEFT], q[1, 1, UP] = 6., 7.
    q[1, 2:] = 100.  # padding: must not count
    y = torch.tensor([[2., 2., 1., 0., 5.], [4., 11., 50., 50., 50.]])
    errors = [[-1., 0., 2., 4., 0.], [2., -4.]]
    plain = sum(e * e for row in errors for e in row) / 7
    torch.testing.assert_close(dqn.td_loss(q, y, batch), torch.tensor(plain))
    q.requires_grad_(True)  # the gradient reaches only the taken actions' Q-values of real slots: 2 (Q - y) / 7
    dqn.td_loss(q, y, batch).backward()
    expected = torch.zeros(2, 5, 4)
    expected[0, [0, 1, 2, 3, 4], [RIGHT, DOWN, RIGHT, LEFT, UP]] = torch.tensor(errors[0]) * 2 / 7
    expected[1, [0, 1], [LEFT, UP]] = torch.tensor(errors[1]) * 2 / 7
    torch.testing.assert_close(q.grad, expected)


# ---------------------------------------------------------------------------------------------------------------------
# Q-values on a model, Polyak, gradients


def test_q_values_read_the_action_logits_at_the_q_positions():
    tok = tiny_tokenizer()
    fmt = dqn.TrajectoryFormat.for_tokenizer(tok)
    model = tiny_model(tok.n_words)
    batch, _, _ = toy_batch(fmt)
    with torch.no_grad():
        q = dqn.q_values(model, batch["tokens"], batch["q_positions"], fmt.action_ids)
        full = model(batch["tokens"])  # (B, T, V), the reference: every position, every word
    assert q.shape == (2, 5, 4) and q.dtype == torch.float32
    reference = torch.stack([full[b, batch["q_positions"][b]][:, fmt.action_ids] for b in range(2)])
    torch.testing.assert_close(q, reference, rtol=1e-4, atol=1e-5)


def test_polyak_by_hand():
    theta = [torch.tensor([1.0, 2.0]), torch.tensor([[10.0]])]
    for alpha, expected in ((1.0, [[1.0, 2.0], [[10.0]]]), (0.0, [[3.0, -5.0], [[0.5]]]),
                            (0.1, [[0.1 * 1 + 0.9 * 3, 0.1 * 2 + 0.9 * -5], [[0.1 * 10 + 0.9 * 0.5]]])):
        phi = [torch.tensor([3.0, -5.0]), torch.tensor([[0.5]])]
        dqn.polyak_update(phi, theta, alpha=alpha)
        for p, e in zip(phi, expected):
            torch.testing.assert_close(p, torch.tensor(e))
    assert theta[0].tolist() == [1.0, 2.0]  # the online side is untouched
    online, target = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    dqn.polyak_update(target, online, alpha=1.0)  # modules work too
    assert torch.equal(target.weight, online.weight) and torch.equal(target.bias, online.bias)
    with pytest.raises(ValueError, match="not copies"):
        dqn.polyak_update([torch.zeros(2)], [torch.zeros(3)])


def td_step_loss(model, target_model, online_adapter, target_adapter, batch, fmt):
    q_online = dqn.q_values(model, batch["tokens"], batch["q_positions"], fmt.action_ids, online_adapter)
    q_target = dqn.q_values(target_model, batch["tokens"], batch["q_positions"], fmt.action_ids, target_adapter)
    y = dqn.bellman_targets(q_online, q_target, batch)
    return dqn.td_loss(q_online, y, batch), y


def test_no_gradient_reaches_the_target():
    tok = tiny_tokenizer()
    fmt = dqn.TrajectoryFormat.for_tokenizer(tok)
    batch, _, _ = toy_batch(fmt)
    # IA3: the frozen base is shared, the target adapter is a copy
    base = tiny_model(tok.n_words).requires_grad_(False)
    online = ia3.IA3(base)
    with torch.no_grad():
        for p in online.parameters():
            p.uniform_(0.5, 1.5)
    target = online.copy()
    loss, y = td_step_loss(base, base, online, target, batch, fmt)
    assert not y.requires_grad
    loss.backward()
    assert all(p.grad is None for p in target.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in online.parameters())
    # from scratch: every weight trained, the target network a deep copy (forward run with gradients enabled)
    model = tiny_model(tok.n_words)
    target_model = copy.deepcopy(model)
    loss, _ = td_step_loss(model, target_model, None, None, batch, fmt)
    loss.backward()
    assert all(p.grad is None for p in target_model.parameters())
    assert all(p.grad is not None for p in model.layers[0].parameters())


def test_one_optimizer_step_lowers_the_td_loss():
    tok = tiny_tokenizer()
    fmt = dqn.TrajectoryFormat.for_tokenizer(tok)
    rng = random.Random(0)
    slices = dqn.pack_slices([[random_episode(rng) for _ in range(20)]], fmt, 512, rng)
    batch = dqn.collate(slices, pad_id=fmt.eos[0])
    model = tiny_model(tok.n_words, seed=1)
    target_model = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    for _ in range(2):
        loss, y = td_step_loss(model, target_model, None, None, batch, fmt)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        dqn.polyak_update(target_model.parameters(), model.parameters(), alpha=0.1)
        with torch.no_grad():
            after = dqn.td_loss(dqn.q_values(model, batch["tokens"], batch["q_positions"], fmt.action_ids), y, batch)
        assert after < loss.detach(), (float(loss), float(after))


# ---------------------------------------------------------------------------------------------------------------------
# The compact format and its hindsight recap

@pytest.fixture(scope="module")
def compact_fmt():
    tok = policy.small_tokenizer("compact")
    return tok, compact.CompactFormat(tok.special_tokens)


def test_recap_tags_by_hand():
    # success with a loop: 0 -right-> 1 -left-> 0 -right-> 1 -down-> 5 -down-> 5 (wall) -right-> 6 (goal)
    looped = Episode([0, 1, 0, 1, 5, 5, 6], [RIGHT, LEFT, RIGHT, DOWN, DOWN, RIGHT], [0, 0, 0, 0, 0, 1.0], False)
    # (0,right) last occurs at t=2, the last visit of 0: goal; (1,left) at t=1 is not 1's last visit: other;
    # (1,down) at t=3: goal; (5,down) stayed: wall; (5,right) at t=5, 5's last visit: goal. Order = last occurrence.
    assert compact.recap_steps(looped) == [(1, LEFT, "other"), (0, RIGHT, "goal"), (1, DOWN, "goal"), (5, DOWN, "wall"),
                                       (5, RIGHT, "goal")]
    hole = Episode([4, 4, 5, 9], [LEFT, RIGHT, DOWN], [0, 0, 0], False)  # a wall, a step, then a hole
    assert compact.recap_steps(hole) == [(4, LEFT, "wall"), (4, RIGHT, "other"), (5, DOWN, "hole")]
    # truncated: the last step is no hole; a repeated (s, a) keeps its strongest tag, at its last occurrence
    assert compact.recap_steps(TRUNCATED) == [(8, LEFT, "wall"), (8, UP, "other")]
    assert compact.recap_steps(Episode([2, 2, 2], [UP, UP], [0, 0], True)) == [(2, UP, "wall")]


def test_compact_text_q_positions_and_recap(compact_fmt):
    tok, fmt = compact_fmt
    assert type(fmt).__name__ == "CompactFormat" and fmt.style == "compact"
    tokens, q_positions = dqn.tokenize_episode(SUCCESS, fmt)
    assert tok.decode(tokens) == ("<|begin_of_text|><|obs_8|><|act_right|><|obs_9|><|act_down|><|obs_13|>"
                                  "<|act_right|><|obs_14|><|goal|><|end_of_text|>"
                                  "<|recap_8_right_goal|><|recap_9_down_goal|><|recap_13_right_goal|>")
    # Q(h_t, ·) is read at s_t's token, which predicts a_t's token
    assert [tokens[p] for p in q_positions] == fmt.observation(8) + fmt.observation(9) + fmt.observation(13)
    assert [tokens[p + 1] for p in q_positions] == [fmt.action_ids[a] for a in SUCCESS.actions]
    tokens, _ = dqn.tokenize_episode(TRUNCATED, fmt)
    assert tok.decode(tokens).endswith("<|obs_4|><|truncated|><|end_of_text|><|recap_8_left_wall|><|recap_8_up_other|>")
    with pytest.raises(ValueError, match="observations 0..63"):
        fmt.observation(64)


def test_compact_embeddings_are_composed_from_parts(tmp_path):
    """A tile's embedding is its own vector plus its row's and column's; a recap token's adds its tile's row and
    column, the action and the tag; every other token is its own row. Saved weights are the raw table, and a loaded
    policy embeds the same way."""
    import train
    tok = policy.small_tokenizer("compact")
    model = policy.small_model(train.make_config(dim=64, n_layers=1), tok.n_words, tok.special_tokens)
    sp, raw = tok.special_tokens, model.tok_embeddings.weight.detach()
    e = model.tok_embeddings(torch.arange(tok.n_words)).detach()                            # (V, dim)
    r = lambda name: raw[sp[name]]  # noqa: E731
    torch.testing.assert_close(e[sp["<|obs_13|>"]], r("<|obs_13|>") + r("<|row_1|>") + r("<|col_5|>"))
    torch.testing.assert_close(e[sp["<|recap_63_left_hole|>"]], r("<|recap_63_left_hole|>") + r("<|row_7|>")
                               + r("<|col_7|>") + r("<|act_left|>") + r("<|tag_hole|>"))
    composed = {sp[f"<|obs_{s}|>"] for s in range(64)} | {i for n, i in sp.items() if n.startswith("<|recap_")}
    plain = [i for i in range(tok.n_words) if i not in composed]
    assert len(composed) == 64 + 1024 and torch.equal(e[plain], raw[plain])
    # the parts are trained through every token that holds them
    model.tok_embeddings(torch.tensor([sp["<|obs_13|>"], sp["<|obs_14|>"]])).sum().backward()
    grad = model.tok_embeddings.weight.grad
    assert grad[sp["<|row_1|>"]].eq(2).all() and grad[sp["<|col_5|>"]].eq(1).all()
    assert grad[sp["<|row_0|>"]].eq(0).all()
    assert [k for k in model.state_dict() if k.startswith("tok_embeddings.")] == ["tok_embeddings.weight"]
    llama.save(model, tmp_path / "m")
    loaded = policy.load_small_model(tmp_path / "m", train.make_config(), tok.special_tokens)
    torch.testing.assert_close(loaded.tok_embeddings(torch.arange(tok.n_words)), e)


def test_next_token_loss_skips_q_positions_and_padding(compact_fmt):
    tok, fmt = compact_fmt
    batch, s0, s1 = toy_batch(fmt)
    # row 1 (TRUNCATED alone): <bos> obs8 act obs8 act obs4 <truncated> <eos> recap recap, then padding. Q positions
    # are its two observation tokens before an action (1, 3); the last real token (9) has nothing to predict.
    assert len(s1.tokens) == 10 and s1.q_positions == [1, 3]
    assert batch["lm_mask"][1].tolist() == [True, False, True, False, True, True, True, True, True] + \
        [False] * (batch["tokens"].shape[1] - 9)
    torch.manual_seed(0)
    logits = torch.randn(2, batch["tokens"].shape[1], tok.n_words)
    # reference: average of -log softmax(logits[b, t])[token b, t+1] over the allowed positions, one by one
    nll = [-logits[b, t].log_softmax(-1)[batch["tokens"][b, t + 1]]
           for b, s in enumerate((s0, s1)) for t in range(len(s.tokens) - 1) if t not in s.q_positions]
    assert len(nll) == (len(s0.tokens) - 1 - 5) + 7
    torch.testing.assert_close(compact.next_token_loss(logits, batch), torch.stack(nll).mean())
    # the Q positions' logits (the Q-values) do not reach it
    logits.requires_grad_(True)
    compact.next_token_loss(logits, batch).backward()
    assert logits.grad[1, [1, 3]].abs().sum() == 0 and logits.grad[1, 9:].abs().sum() == 0
    assert logits.grad[1, 2].abs().sum() > 0


def test_canvas_states_by_hand(compact_fmt):
    tok, fmt = compact_fmt
    # a 3-wide map: tiles 0 (r0 c0), 1 (r0 c1), 4 (r1 c1); placed at row 1, column 2 of the 8x8 canvas
    ep = Episode([0, 1, 4], [RIGHT, DOWN], [0.0, 1.0], ncol=3)
    moved = compact.to_canvas(ep, 1, 2)
    assert moved.observations == [10, 11, 19] and moved.ncol == 8 and moved.actions == ep.actions
    assert compact.to_canvas(moved).observations == moved.observations  # already on the canvas: unchanged
    at_origin = compact.to_canvas(ep)  # tile (1, 1) of the 3-wide map is 1·8 + 1
    assert at_origin.observations == [0, 1, 9] and at_origin.ncol == 8 and not at_origin.truncated
    assert [compact.canvas_state(s, 3, 1, 2) for s in ep.observations] == moved.observations
    # the format writes the states it is given: the callers (data.py, rollout.py) place the episodes
    canvas = compact.CompactFormat(fmt.ids, canvas=True)
    assert dqn.tokenize_episode(at_origin, canvas) == dqn.tokenize_episode(Episode([0, 1, 9], [RIGHT, DOWN],
                                                                                   [0.0, 1.0]), fmt)
    assert tok.decode(dqn.tokenize_episode(moved, canvas)[0]).startswith(
        "<|begin_of_text|><|obs_10|><|act_right|><|obs_11|><|act_down|><|obs_19|><|goal|><|end_of_text|>")
    with pytest.raises(ValueError, match="needs each episode's map width"):
        compact.to_canvas(Episode([0, 1], [RIGHT], [0.0]))
    with pytest.raises(ValueError, match="leaves the 8x8 canvas"):
        compact.to_canvas(ep, 0, 6)
    with pytest.raises(ValueError, match="leaves the 8x8 canvas"):
        compact.to_canvas(Episode([0, 7], [DOWN], [0.0], ncol=1), 1, 0)


# A 4-wide map. FIRST: 0 -right-> 1 -left-> 0 -up-> 0 (the edge) -down-> 4 (a hole);
# SECOND: 0 -right-> 1 -down-> 5 (the goal); CUT (the step limit): 0 -left-> 0 (the edge) -right-> 1 -right-> 2;
# LAST: 1 -right-> 2 -left-> 1 -up-> 1 (the edge) -down-> 5 (the goal)
FIRST = Episode([0, 1, 0, 0, 4], [RIGHT, LEFT, UP, DOWN], [0.0, 0.0, 0.0, 0.0], False)
SECOND = Episode([0, 1, 5], [RIGHT, DOWN], [0.0, 1.0], False)
CUT = Episode([0, 0, 1, 2], [LEFT, RIGHT, RIGHT], [0.0, 0.0, 0.0], True)
LAST = Episode([1, 2, 1, 1, 5], [RIGHT, LEFT, UP, DOWN], [0.0, 0.0, 0.0, 1.0], False)
# what the context before each action shows about its state's [left, down, right, up]: 0 untried, 1 dead end, 2 open
HAND_FACTS = [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 2, 0], [0, 0, 2, 1],  # FIRST: its own earlier steps count
              [0, 1, 2, 1], [2, 0, 0, 0],                              # SECOND: down from 0 is the hole, up the edge
              [0, 1, 2, 1], [1, 1, 2, 1], [2, 2, 0, 0],                # CUT: down from 1 entered the goal: open
              [2, 2, 2, 0], [0, 0, 0, 0], [2, 2, 2, 0], [2, 2, 2, 1]]  # LAST: 1 -right-> 2 was cut, not a hole


def test_context_facts_by_hand(compact_fmt):
    """The facts target: for each action of a compact slice, what the slice's earlier episodes and the episode's
    earlier steps show about the state's 4 moves (a hole and a bump into the edge are dead ends, a move into the
    goal or another tile open, a truncated episode's last state no hole); the recap tokens change nothing."""
    tok, fmt = compact_fmt
    for recap in (True, False):
        f = compact.CompactFormat(fmt.ids, recap=recap)
        (sl,) = dqn.pack_slices([[FIRST], [SECOND], [CUT], [LAST]], f, 1024, random.Random(0))
        assert sl.actions == FIRST.actions + SECOND.actions + CUT.actions + LAST.actions
        assert compact.context_facts(sl.tokens, fmt.ids) == HAND_FACTS
    # a slice starts from an empty context: the same four episodes in slices too short for two of them
    slices = dqn.pack_slices([[FIRST], [SECOND], [CUT], [LAST]], fmt, 20, random.Random(0))
    assert len(slices) == 4
    assert [compact.context_facts(s.tokens, fmt.ids) for s in slices] == [
        HAND_FACTS[:4], [[0, 0, 0, 0], [0, 0, 0, 0]], [[0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]],
        [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 2, 0], [0, 0, 2, 1]]]


def test_context_facts_replay_the_slices_episodes(compact_fmt):
    """On random episodes in slices of several episodes: the facts read from the tokens alone are those of the
    slice's episodes, before each step, learned step by step into planner.ContextModel from the Episode objects."""
    import planner
    tok, fmt = compact_fmt
    rng = random.Random(5)
    episodes = [random_episode(rng) for _ in range(40)]
    slices = dqn.pack_slices([[ep] for ep in episodes], fmt, 200, random.Random(0))  # sets of one keep the order
    assert len(slices) > 3
    rest = iter(episodes)
    for sl in slices:
        lake, expected = planner.ContextModel(), []
        while len(expected) < len(sl.actions):
            ep = next(rest)
            for t, (s, a) in enumerate(zip(ep.observations, ep.actions)):
                expected.append(lake.facts(s))
                last = t == len(ep.actions) - 1
                lake.learn(s, a, ep.observations[t + 1], last and not ep.truncated, ep.rewards[t])
        assert compact.context_facts(sl.tokens, fmt.ids) == expected
    assert next(rest, None) is None
    assert {v for sl in slices for f in compact.context_facts(sl.tokens, fmt.ids) for v in f} == {0, 1, 2}


def test_facts_loss_by_hand(compact_fmt):
    """facts_loss: at each real action slot, for each of the 4 moves the cross-entropy of the context's fact over
    that move's 3 LM-head rows <|fact_W_untried|>, <|fact_W_dead_end|>, <|fact_W_open|>; the mean over the 4 moves,
    then over the real slots. Only those 12 rows at the Q positions get a gradient."""
    import math
    tok, fmt = compact_fmt
    (hand,) = dqn.pack_slices([[FIRST], [SECOND], [CUT], [LAST]], fmt, 1024, random.Random(0))
    cut = dqn.pack_slices([[CUT]], fmt, 1024, random.Random(0))[0]
    batch = dqn.collate([hand, cut], pad_id=fmt.eos[0])
    batch["facts"] = compact.facts_targets([hand, cut], fmt.ids)
    cut_facts = [[0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    assert batch["facts"].tolist() == [HAND_FACTS, cut_facts + [[0, 0, 0, 0]] * 10]  # padded slots: 0, masked out
    rows = [[fmt.ids[f"<|fact_{w}_{f}|>"] for f in ("untried", "dead_end", "open")] for w in dqn.ACTION_WORDS]
    flat = [r for move in rows for r in move]
    assert len(set(flat)) == 12 and not set(flat) & set(fmt.action_ids) and max(flat) < tok.n_words
    torch.manual_seed(0)
    logits = (3 * torch.randn(2, batch["tokens"].shape[1], tok.n_words)).requires_grad_(True)
    per_slot = []
    for b, (sl, facts) in enumerate(((hand, HAND_FACTS), (cut, cut_facts))):
        for p, fact in zip(sl.q_positions, facts):
            nll = 0.0
            for move in range(4):
                z = [logits[b, p, r].item() for r in rows[move]]
                nll += math.log(sum(math.exp(v) for v in z)) - z[fact[move]]
            per_slot.append(nll / 4)
    assert len(per_slot) == 16
    loss = compact.facts_loss(logits, batch, fmt.ids)
    torch.testing.assert_close(loss, torch.tensor(sum(per_slot) / 16), rtol=1e-5, atol=1e-5)
    loss.backward()
    got = logits.grad.abs() > 0
    expected = torch.zeros_like(got)
    for b, sl in enumerate((hand, cut)):
        expected[b, torch.tensor(sl.q_positions)[:, None], torch.tensor(flat)] = True
    assert torch.equal(got, expected)


def test_no_token_of_an_episode_depends_on_another_episodes_steps():
    """The cpu preset's format (recap and canvas): packed episodes are each exactly tokenize_episode of the episode
    alone, and ModelPolicy's live context at every Q position is the finished episodes' texts, each written alone,
    then the training text of the unfinished one up to that Q position."""
    import frozenlake
    import rollout
    import train
    cfg = train.make_config("cpu")
    tok = policy.small_tokenizer(cfg.format)
    fmt = policy.trajectory_format(cfg, tok)
    assert fmt.recap and fmt.canvas
    rng = random.Random(2)
    written = []
    for _ in range(30):
        ep = random_episode(rng)
        ep.ncol = 5
        written.append(compact.to_canvas(ep, rng.randrange(4), rng.randrange(4)))
    alone = [dqn.tokenize_episode(ep, fmt) for ep in written]
    slices = dqn.pack_slices([[ep] for ep in written], fmt, 160, random.Random(0))
    assert len(slices) > 3
    rest = iter(alone)
    for sl in slices:
        tokens, q_positions = [], []
        while len(q_positions) < len(sl.q_positions):
            text, q = next(rest)
            tokens, q_positions = tokens + text, q_positions + [len(tokens) + p for p in q]
        assert sl.tokens == tokens and sl.q_positions == q_positions
    assert next(rest, None) is None

    model = tiny_model(tok.n_words)
    player = rollout.ModelPolicy(model, fmt, context=1024)
    finished, seen = collections.defaultdict(list), []
    greedy, observe = player.greedy_actions, player.observe

    def spy_greedy(rows, maps, episodes):
        actions = greedy(rows, maps, episodes)
        seen.extend((r, list(player.rows[r].tokens), len(finished[r]), copy.deepcopy(ep))
                    for r, ep in zip(rows, episodes))
        return actions

    def spy_observe(row, episode, terminated, done):
        observe(row, episode, terminated, done)
        if done:
            finished[row].append(copy.deepcopy(episode))
    player.greedy_actions, player.observe = spy_greedy, spy_observe
    maps = [[m] for m in frozenlake.test_maps()[:2] + frozenlake.ood_maps()[:1]]
    rollout.run_episodes(player, maps, [0.0, 0.0, 0.5], seed=1, max_steps=20)
    assert player.mismatches == 0 and player.overflows == 0
    text = lambda ep: dqn.tokenize_episode(compact.to_canvas(ep), fmt)  # noqa: E731
    for row, context, done, live in seen:
        before = sum((text(ep)[0] for ep in finished[row][:done]), [])
        # the live episode with one more (dummy) step: its last Q position is the live one
        longer = Episode(live.observations + [0], live.actions + [0], live.rewards + [0.0], ncol=live.ncol)
        tokens, q_positions = text(longer)
        assert context == before + tokens[:q_positions[-1] + 1]
    for row in range(len(maps)):
        assert player.rows[row].tokens == sum((text(ep)[0] for ep in finished[row]), [])
    assert len(seen) > 50 and any(ep.truncated for eps in finished.values() for ep in eps)


def test_python_compact_py_prints_the_episode_with_tokenize_episodes_q_positions():
    """`python compact.py`: the episode 0 -> 1 -> 2 -> 5 -> 8 of a 3x3 lake token by token in both formats, with the Q
    positions of dqn.tokenize_episode marked (hand-counted too: the paper's text spends 10 tokens per step, the
    compact format 2), each with its action and Eq. 6 target; dqn itself imports no cpu-preset module."""
    import subprocess
    import sys
    from pathlib import Path
    code = ("import sys, dqn; assert not {'compact', 'policy', 'planner'} & set(sys.modules), 'cpu-preset import'; "
            "import compact; compact.main()")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    episode = Episode([0, 1, 2, 5, 8], [RIGHT, RIGHT, DOWN, DOWN], [0.0, 0.0, 0.0, 1.0], False, ncol=3)
    paper, small = policy.small_tokenizer("paper"), policy.small_tokenizer("compact")
    fmts = [dqn.TrajectoryFormat.for_tokenizer(paper), compact.CompactFormat(small.special_tokens, canvas=True)]
    sections = out.split("\n\n")[1:]
    assert len(sections) == 2
    for section, fmt, written, hand in zip(sections, fmts, (episode, compact.to_canvas(episode)),
                                           ([8, 18, 28, 38], [1, 3, 5, 7])):
        rows = [line.split(None, 3) for line in section.splitlines()[2:]]  # pos, id, token, note
        tokens, q_positions = dqn.tokenize_episode(written, fmt)
        assert [int(r[0]) for r in rows] == list(range(len(tokens))) and [int(r[1]) for r in rows] == tokens
        marked = [int(r[0]) for r in rows if len(r) == 4]
        assert marked == q_positions == hand
        notes = [rows[p][3] for p in marked]
        assert [n.split(":")[0] for n in notes] == [f"<- Q position, a_{t} = {w}" for t, w in
                                                    enumerate(("right", "right", "down", "down"))]
        for t in range(3):  # bootstrapped from the next Q position of the episode
            assert notes[t].endswith(f"y_{t} = 0.9·Q_φ(h_{t + 1}, argmax_a Q_θ(h_{t + 1}, a)), "
                                     f"h_{t + 1} = tokens 0..{q_positions[t + 1]}")
        assert notes[3].endswith("y_3 = 30·R = 30·1 = 30")
    assert [r.split()[2] for r in sections[1].splitlines()[2:] if "<- Q" in r] == [
        "<|obs_0|>", "<|obs_1|>", "<|obs_2|>", "<|obs_10|>"]  # canvas: tile (1, 2) of the 3-wide lake is 1·8 + 2
