"""Gemma 4 26B-A4B's text model, as the `text_config` of its published config.json
gives it: what benchmarks/bench-serve serves with dummy weights and bench-moe's Gemma4MoE
takes its MoE dimensions from. For transformers' Gemma4TextConfig (model_type
gemma4_text, vLLM's Gemma4ForCausalLM); without the per-layer input embeddings
(hidden_size_per_layer_input 0), as in the 26B-A4B."""

ARCHITECTURE = "Gemma4ForCausalLM"
TEXT_CONFIG = {
    "vocab_size": 262144,
    "hidden_size": 2816,
    "intermediate_size": 2112,  # the dense MLP beside the experts
    "num_hidden_layers": 30,
    "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 5,
    "sliding_window": 1024,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "num_global_key_value_heads": 2,
    "head_dim": 256,
    "global_head_dim": 512,
    "attention_k_eq_v": True,
    "attention_bias": False,
    "rope_parameters": {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {
            "rope_type": "proportional",
            "partial_rotary_factor": 0.25,
            "rope_theta": 1000000.0,
        },
    },
    "enable_moe_block": True,
    "num_experts": 128,
    "top_k_experts": 8,
    "moe_intermediate_size": 704,
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size_per_layer_input": 0,
    "num_kv_shared_layers": 0,
    "use_double_wide_mlp": False,
    "max_position_embeddings": 262144,
    "rms_norm_eps": 1e-6,
    "final_logit_softcapping": 30.0,
    "tie_word_embeddings": True,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 2,
}
