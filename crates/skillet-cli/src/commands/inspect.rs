//! `skillet inspect`: what a model is, without loading its weights.

use serde::Serialize;
use skillet_tokenizer::SpecialTokens;

use crate::output::print_json;
use skillet_runtime::Bundle;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A .gguf file or a Hugging Face folder.
    model: std::path::PathBuf,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Report {
    path: String,
    format: &'static str,
    architecture: &'static str,
    parameters: usize,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    layers: usize,
    attention_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    context_length: usize,
    rope_theta: f64,
    rms_norm_eps: f64,
    tied_embeddings: bool,
    tensor_types: std::collections::BTreeMap<String, usize>,
    tokenizer_vocab_size: usize,
    special_tokens: SpecialTokens,
    eos_ids: Vec<u32>,
    chat_template: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let b = Bundle::open(&args.model)?;
    let c = &b.config;
    let weights = b.source.weights(c)?;
    let r = Report {
        path: b.source.path().display().to_string(),
        format: b.source.format_name(),
        architecture: c.architecture.name(),
        parameters: c.parameter_count(),
        vocab_size: c.vocab_size,
        hidden_size: c.hidden_size,
        intermediate_size: c.intermediate_size,
        layers: c.num_hidden_layers,
        attention_heads: c.num_attention_heads,
        kv_heads: c.num_key_value_heads,
        head_dim: c.head_dim,
        context_length: c.max_position_embeddings,
        rope_theta: c.rope_theta,
        rms_norm_eps: c.rms_norm_eps,
        tied_embeddings: c.tie_word_embeddings,
        tensor_types: weights.storage_types(),
        tokenizer_vocab_size: b.tokenizer.vocab_size(),
        special_tokens: b.tokenizer.specials().clone(),
        eos_ids: b.tokenizer.eos_ids().to_vec(),
        chat_template: b.template.is_some(),
    };
    if args.json {
        return print_json(&r);
    }
    let special = |t: &Option<skillet_tokenizer::SpecialToken>| {
        t.as_ref()
            .map_or("-".to_string(), |t| format!("{} ({})", t.text, t.id))
    };
    let types: Vec<String> = r
        .tensor_types
        .iter()
        .map(|(k, v)| format!("{k}×{v}"))
        .collect();
    println!("path            {}", r.path);
    println!("format          {}", r.format);
    println!("architecture    {}", r.architecture);
    println!(
        "parameters      {} ({:.1}M)",
        r.parameters,
        r.parameters as f64 / 1e6
    );
    println!("layers          {}", r.layers);
    println!(
        "hidden / mlp    {} / {}",
        r.hidden_size, r.intermediate_size
    );
    println!(
        "heads (kv)      {} ({}), head_dim {}",
        r.attention_heads, r.kv_heads, r.head_dim
    );
    println!("context         {}", r.context_length);
    println!("rope_theta      {}", r.rope_theta);
    println!("rms_norm_eps    {:e}", r.rms_norm_eps);
    println!("tied embeddings {}", r.tied_embeddings);
    println!("tensor types    {}", types.join(", "));
    println!(
        "vocab           {} (tokenizer {})",
        r.vocab_size, r.tokenizer_vocab_size
    );
    println!(
        "bos / eos       {} / {}",
        special(&r.special_tokens.bos),
        special(&r.special_tokens.eos)
    );
    println!(
        "pad / unk       {} / {}",
        special(&r.special_tokens.pad),
        special(&r.special_tokens.unk)
    );
    println!(
        "chat template   {}",
        if r.chat_template { "yes" } else { "no" }
    );
    Ok(())
}
