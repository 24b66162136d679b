"""Tiny random MoE models of every family in the architecture table's routers (shared by the
expert-steering tests)."""
import torch

T = __import__("transformers")

D = 32
_COMMON = dict(vocab_size=100, hidden_size=D, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               pad_token_id=0, bos_token_id=1, eos_token_id=2)

CONFIGS = {
    "mixtral": lambda: T.MixtralConfig(**_COMMON, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2,
                                       head_dim=8),
    "qwen2_moe": lambda: T.Qwen2MoeConfig(**_COMMON, intermediate_size=48, moe_intermediate_size=24, num_experts=8,
                                          num_experts_per_tok=2, shared_expert_intermediate_size=32,
                                          norm_topk_prob=False),
    "qwen3_moe": lambda: T.Qwen3MoeConfig(**_COMMON, intermediate_size=48, moe_intermediate_size=24, num_experts=8,
                                          num_experts_per_tok=2, head_dim=8, norm_topk_prob=True),
    "olmoe": lambda: T.OlmoeConfig(**_COMMON, intermediate_size=24, num_experts=8, num_experts_per_tok=2),
    "deepseek_v3": lambda: T.DeepseekV3Config(**_COMMON, intermediate_size=48, moe_intermediate_size=24,
                                              n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
                                              n_shared_experts=1, first_k_dense_replace=0, routed_scaling_factor=2.5,
                                              q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=4,
                                              qk_nope_head_dim=4, v_head_dim=8),
}


def tiny_moe(model_type: str, seed: int = 0):
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(CONFIGS[model_type]()).eval()
    for name, p in model.named_parameters():  # some routers initialise to zeros: make routing real
        if name.endswith("gate.weight"):
            torch.nn.init.normal_(p, std=0.5)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.normal_(0, 0.1)
    return model
