//! config.json validation: transformers' defaults, both spellings of keys that moved
//! between transformers versions, and rejection of absurd or unsupported values.

use std::path::Path;

use flashpack::input::config::{ModelConfig, RawConfig, RopeScaling};
use flashpack::Error;
use serde_json::{json, Value};

fn llama() -> Value {
    json!({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 1000, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 256, "hidden_act": "silu",
        "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16", "eos_token_id": [1, 2], "bos_token_id": 0
    })
}

fn opt() -> Value {
    json!({
        "architectures": ["OPTForCausalLM"], "vocab_size": 1000, "hidden_size": 64, "ffn_dim": 256,
        "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 128,
        "do_layer_norm_before": true, "word_embed_proj_dim": 64, "dtype": "float16"
    })
}

fn validate(value: Value) -> Result<ModelConfig, Error> {
    let raw: RawConfig = serde_json::from_value(value).expect("shape of config.json");
    ModelConfig::from_raw(&raw, Path::new("config.json"))
}

fn with(mut value: Value, key: &str, v: Value) -> Value {
    value[key] = v;
    value
}

fn rejected(value: Value, needle: &str) {
    let err = validate(value).expect_err("should be rejected");
    assert_eq!(err.exit_class().code(), 2, "{err}");
    assert!(
        err.to_string().contains(needle),
        "{err} should mention {needle:?}"
    );
}

#[test]
fn llama_defaults_follow_transformers() {
    let cfg = validate(llama()).unwrap();
    assert_eq!(cfg.head_dim, 16);
    assert_eq!(cfg.kv_dim(), 32);
    assert_eq!(cfg.rope_theta, 10_000.0);
    assert_eq!(cfg.rope_scaling, None);
    assert!(!cfg.tie_word_embeddings && !cfg.qkv_bias && !cfg.ffn_bias);
    assert_eq!(cfg.eos_token_ids, vec![1, 2]);
    assert_eq!(cfg.declared_dtype.as_deref(), Some("bfloat16"));
    assert_eq!(cfg.max_context, 256);
}

#[test]
fn opt_defaults_follow_transformers() {
    let cfg = validate(opt()).unwrap();
    let o = cfg.opt.unwrap();
    assert!(o.do_layer_norm_before && o.has_final_layer_norm && o.layer_norm_affine);
    assert!(cfg.tie_word_embeddings && cfg.qkv_bias && cfg.ffn_bias);
    assert_eq!(cfg.declared_dtype.as_deref(), Some("float16"));
    let removed = validate(with(opt(), "_remove_final_layer_norm", json!(true))).unwrap();
    assert!(!removed.opt.unwrap().has_final_layer_norm);
}

#[test]
fn rope_settings_read_from_either_key() {
    let v4 = with(
        with(llama(), "rope_theta", json!(500000.0)),
        "rope_scaling",
        json!({"type": "linear", "factor": 2.0}),
    );
    let cfg = validate(v4).unwrap();
    assert_eq!(cfg.rope_theta, 500000.0);
    assert_eq!(cfg.rope_scaling, Some(RopeScaling::Linear { factor: 2.0 }));

    let v5 = with(
        llama(),
        "rope_parameters",
        json!({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    );
    let cfg = validate(v5).unwrap();
    assert_eq!(cfg.rope_theta, 500000.0);
    assert!(matches!(
        cfg.rope_scaling,
        Some(RopeScaling::Llama3 {
            original_max_position_embeddings: 8192,
            ..
        })
    ));

    let default = with(
        llama(),
        "rope_parameters",
        json!({"rope_type": "default", "rope_theta": 1e6}),
    );
    assert_eq!(validate(default).unwrap().rope_theta, 1e6);
}

#[test]
fn unsupported_rope_scaling_is_named() {
    rejected(
        with(
            llama(),
            "rope_scaling",
            json!({"rope_type": "yarn", "factor": 4.0}),
        ),
        "yarn",
    );
}

#[test]
fn qwen2_has_qkv_biases_and_mistral_window_caps_context() {
    let qwen = validate(with(llama(), "architectures", json!(["Qwen2ForCausalLM"]))).unwrap();
    assert!(qwen.qkv_bias && !qwen.o_bias);
    let mistral = with(
        with(llama(), "architectures", json!(["MistralForCausalLM"])),
        "sliding_window",
        json!(64),
    );
    let cfg = validate(mistral).unwrap();
    assert_eq!((cfg.max_position_embeddings, cfg.max_context), (256, 64));
    let no_window = with(
        with(llama(), "architectures", json!(["MistralForCausalLM"])),
        "sliding_window",
        json!(null),
    );
    assert_eq!(validate(no_window).unwrap().max_context, 256);
}

#[test]
fn sliding_attention_layers_in_llama_are_rejected() {
    rejected(
        with(
            llama(),
            "layer_types",
            json!(["full_attention", "sliding_attention"]),
        ),
        "layer_types",
    );
}

#[test]
fn absurd_sizes_are_rejected_before_any_allocation() {
    rejected(
        with(llama(), "num_hidden_layers", json!(1_000_000_000_000u64)),
        "num_hidden_layers",
    );
    rejected(with(llama(), "hidden_size", json!(0)), "hidden_size");
    rejected(with(llama(), "vocab_size", json!(1u64 << 40)), "vocab_size");
    rejected(
        with(llama(), "intermediate_size", json!(null)),
        "intermediate_size",
    );
    rejected(
        with(opt(), "max_position_embeddings", json!(1u64 << 40)),
        "max_position_embeddings",
    );
}

#[test]
fn heads_that_do_not_divide_are_rejected() {
    rejected(
        with(llama(), "num_attention_heads", json!(5)),
        "not divisible",
    );
    rejected(
        with(llama(), "num_key_value_heads", json!(3)),
        "num_key_value_heads",
    );
    rejected(
        with(opt(), "num_attention_heads", json!(6)),
        "not divisible",
    );
}

#[test]
fn unsupported_activation_and_architecture_are_named() {
    // gelu is accepted for Llama (tests/activations.rs); a name without an
    // implementation is refused by name.
    rejected(
        with(llama(), "hidden_act", json!("quick_gelu")),
        "quick_gelu",
    );
    rejected(with(opt(), "activation_function", json!("gelu")), "gelu");
    rejected(
        with(llama(), "architectures", json!(["BertModel"])),
        "BertModel",
    );
    rejected(with(llama(), "architectures", json!([])), "architectures");
}

#[test]
fn token_ids_outside_the_vocabulary_are_rejected() {
    rejected(with(llama(), "eos_token_id", json!(5000)), "eos_token_id");
}
