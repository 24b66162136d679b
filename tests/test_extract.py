"""extract_activations against the model's own output_hidden_states, padding on either side,
pooling, sites, batching, progress, and bad inputs."""
import pytest
import tiny_lm
import torch

from actshift.steering import extract_activations

TEXTS = ["the cat is happy", "dog", "I love you very very much", "they hate it"]


def hidden_states_alone(model, tok, text):
    """Per-token hidden states of one unpadded input (the independent fact)."""
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return [h[0] for h in model(ids, output_hidden_states=True).hidden_states]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("pooling", ["last", "mean", None])
def test_equals_output_hidden_states_with_padding(side, pooling):
    model, tok = tiny_lm.llama(), tiny_lm.tokenizer(side)
    acts = extract_activations(model, TEXTS, [0], tokenizer=tok, pooling=pooling, batch_size=3, progress=False)
    rows = []
    for text in TEXTS:
        h = hidden_states_alone(model, tok, text)[1]  # block 0's output
        rows.append({"last": h[-1:], "mean": h.mean(0, keepdim=True), None: h}[pooling])
    expected = torch.cat(rows)
    assert acts[0].dtype == torch.float32 and acts[0].device.type == "cpu"
    torch.testing.assert_close(acts[0], expected, rtol=1e-5, atol=1e-5)


def test_last_layer_is_the_block_output_before_the_final_norm():
    model, tok = tiny_lm.llama(), tiny_lm.tokenizer("left")
    acts = extract_activations(model, TEXTS, [-1, 0], tokenizer=tok, progress=False)
    assert sorted(acts) == [0, 1]
    for i, text in enumerate(TEXTS):
        hs = hidden_states_alone(model, tok, text)
        with torch.no_grad():
            normed = model.model.norm(acts[1][i][None])[0]  # hidden_states[-1] = norm(last block output)
        torch.testing.assert_close(normed, hs[2][-1], rtol=1e-5, atol=1e-5)


def test_block_input_is_previous_block_output_and_gpt2_tensor_inputs():
    model = tiny_lm.gpt2()
    ids = torch.randint(3, 20, (5, 6))
    acts_in = extract_activations(model, ids, [1], site="block_input", pooling=None, batch_size=2, progress=False)
    acts_out = extract_activations(model, {"input_ids": ids}, [0], pooling=None, progress=False)
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(acts_in[1], hs[1].reshape(-1, 32), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(acts_out[0], hs[1].reshape(-1, 32), rtol=1e-5, atol=1e-5)


def test_mlp_output_site_matches_a_hook():
    model, tok = tiny_lm.llama(), tiny_lm.tokenizer()
    seen = []
    handle = model.model.layers[1].mlp.register_forward_hook(lambda m, a, o: seen.append(o[0, -1].clone()))
    try:
        acts = extract_activations(model, "the dog is sad", 1, tokenizer=tok, site="mlp_output", progress=False)
    finally:
        handle.remove()
    torch.testing.assert_close(acts[1][0], seen[0])


def test_progress_bar_reports(capsys):
    model, tok = tiny_lm.llama(), tiny_lm.tokenizer()
    extract_activations(model, TEXTS, 0, tokenizer=tok, batch_size=2, progress=True)
    assert "4/4" in capsys.readouterr().err


def test_simple_progress_without_tqdm(capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "tqdm.auto", None)  # import fails as if not installed
    model, tok = tiny_lm.llama(), tiny_lm.tokenizer()
    extract_activations(model, TEXTS, 0, tokenizer=tok, batch_size=3, progress=True)
    err = capsys.readouterr().err
    assert "extracting: 3/4" in err and "extracting: 4/4" in err


def test_bad_inputs_name_the_argument():
    model, tok = tiny_lm.llama(), tiny_lm.tokenizer()
    with pytest.raises(ValueError, match="layers: layer 5 is out of range"):
        extract_activations(model, TEXTS, [5], tokenizer=tok, progress=False)
    with pytest.raises(ValueError, match="site"):
        extract_activations(model, TEXTS, [0], tokenizer=tok, site="nowhere", progress=False)
    with pytest.raises(ValueError, match="pooling"):
        extract_activations(model, TEXTS, [0], tokenizer=tok, pooling="max", progress=False)
    with pytest.raises(ValueError, match="tokenizer"):
        extract_activations(model, TEXTS, [0], progress=False)
    with pytest.raises(ValueError, match="inputs"):
        extract_activations(model, [], [0], tokenizer=tok, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        extract_activations(model, TEXTS, [0], tokenizer=tok, batch_size=0, progress=False)
    with pytest.raises(TypeError, match="layers"):
        extract_activations(model, TEXTS, "0", tokenizer=tok, progress=False)
    with pytest.raises(ValueError, match="model"):
        extract_activations(torch.nn.Linear(2, 2), TEXTS, [0], tokenizer=tok, progress=False)


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(1, 9), min_size=1, max_size=6), left=st.booleans(), d=st.integers(1, 17))
def test_property_pooling_ignores_padding_on_either_side(lengths, left, d):
    """Pooled padded batches equal the same rows pooled alone, for any lengths and padding side."""
    from actshift.steering.extract import _pool

    T = max(lengths)
    h = torch.randn(len(lengths), T, d)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        if left:
            mask[b, T - n:] = 1
        else:
            mask[b, :n] = 1
    rows = [h[b][mask[b].bool()] for b in range(len(lengths))]
    torch.testing.assert_close(_pool(h, mask, "last"), torch.stack([r[-1] for r in rows]))
    torch.testing.assert_close(_pool(h, mask, "mean"), torch.stack([r.mean(0) for r in rows]))
    torch.testing.assert_close(_pool(h, mask, None), torch.cat(rows))


def test_bert_encoder_layers_with_right_padding():
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(vocab_size=30, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64, max_position_embeddings=32)).eval()
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    acts = extract_activations(model, {"input_ids": ids, "attention_mask": mask}, [0, 1], pooling="mean",
                               progress=False)
    for b, n in enumerate((4, 2)):
        with torch.no_grad():
            hs = model(ids[b:b + 1, :n], output_hidden_states=True).hidden_states
        for layer in (0, 1):
            torch.testing.assert_close(acts[layer][b], hs[layer + 1][0].mean(0), rtol=1e-5, atol=1e-5)
