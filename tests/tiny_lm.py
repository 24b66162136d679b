"""Tiny random-weight language models and a word-level tokenizer for recipe tests (no downloads)."""
import functools

import torch

WORDS = "the a cat dog is happy sad good bad love hate very not I you we they it and or".split()


@functools.lru_cache(maxsize=None)
def _llama_state(hidden: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1234)
    config = LlamaConfig(vocab_size=len(WORDS) + 3, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return config, LlamaForCausalLM(config).state_dict()


def llama(hidden: int = 32):
    """A 2-layer LlamaForCausalLM in eval mode (same weights on every call)."""
    from transformers import LlamaForCausalLM

    config, state = _llama_state(hidden)
    model = LlamaForCausalLM(config)
    model.load_state_dict(state)
    return model.eval()


def gpt2(hidden: int = 32):
    """A 2-layer GPT2LMHeadModel in eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(4321)
    config = GPT2Config(vocab_size=len(WORDS) + 3, n_embd=hidden, n_layer=2, n_head=4, n_positions=64,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return GPT2LMHeadModel(config).eval()


def tokenizer(padding_side: str = "right"):
    """Word-level fast tokenizer over WORDS: [PAD]=0, [BOS]=1, [EOS]=2, no special tokens added."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[PAD]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", bos_token="[BOS]",
                                   eos_token="[EOS]", padding_side=padding_side)
