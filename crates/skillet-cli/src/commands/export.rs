//! `skillet export`: a model, with an adapter merged in or not, as a
//! Hugging Face folder or one GGUF file of a chosen type; or an adapter
//! alone as a llama.cpp LoRA GGUF.

use serde::Serialize;
use skillet_models::FileType;
use skillet_runtime::{
    AdapterSpec, Bundle, merged_weights, write_gguf_adapter, write_gguf_model, write_hf_folder,
};

use crate::args::ModelArg;
use crate::output::print_json;

/// What to write.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Format {
    /// A Hugging Face folder (f32 safetensors, tokenizer, template).
    Hf,
    /// One GGUF file (weights in `--type`, tokenizer, chat template).
    Gguf,
    /// The adapter alone, in llama.cpp's LoRA GGUF format (`--lora`).
    GgufLora,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArg,
    /// A PEFT adapter folder: merged into the weights (hf, gguf), or the
    /// adapter to convert (gguf-lora). For hf and gguf, repeat it (with
    /// `DIR:WEIGHT` where wanted) to merge several: each update at its
    /// weight, as they run together.
    #[arg(long, value_name = "DIR[:WEIGHT]")]
    adapter: Vec<AdapterSpec>,
    /// Output format.
    #[arg(long, value_enum, default_value = "gguf")]
    format: Format,
    /// GGUF file type: f32, f16, bf16, q8_0, q4_0, q4_k_m or q6_k. Tensors
    /// are typed as llama.cpp's quantizer types them (the head in Q6_K for
    /// the 4-bit types; Q5_0 / Q8_0 where a row is not a whole number of
    /// 256-value blocks; norms in f32). A quantized base is dequantized,
    /// merged in f32, then quantized once.
    #[arg(long = "type", default_value = "f16", value_parser = parse_type)]
    file_type: FileType,
    /// Output path: a folder for hf, a file for gguf and gguf-lora.
    #[arg(long, short = 'o')]
    out: std::path::PathBuf,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

fn parse_type(s: &str) -> Result<FileType, String> {
    FileType::parse(s).ok_or_else(|| {
        let names: Vec<&str> = FileType::ALL.iter().map(|t| t.name()).collect();
        format!("unknown type '{s}' (one of {})", names.join(", "))
    })
}

#[derive(Serialize)]
struct Output {
    out: String,
    format: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    file_type: Option<&'static str>,
    merged_modules: usize,
    dequantized_base: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let b = Bundle::open(&args.model.model)?;
    let out = args.out.display().to_string();
    let o = match args.format {
        Format::GgufLora => {
            let adapter = match args.adapter.as_slice() {
                [one] if one.weight == 1.0 => &one.dir,
                [] => anyhow::bail!("--format gguf-lora needs --adapter"),
                [_] => anyhow::bail!(
                    "--format gguf-lora writes the adapter as it is; give its weight to llama.cpp (--lora-scaled)"
                ),
                _ => anyhow::bail!(
                    "--format gguf-lora converts one adapter; combine several first (skillet merge --combine)"
                ),
            };
            let n = write_gguf_adapter(&b, adapter, &args.out)?;
            Output {
                out,
                format: "gguf-lora",
                file_type: None,
                merged_modules: n,
                dequantized_base: false,
            }
        }
        Format::Hf | Format::Gguf => {
            let merged = merged_weights(&b, &args.adapter)?;
            let (format, file_type) = match args.format {
                Format::Hf => {
                    write_hf_folder(&b, &merged.weights, &args.out)?;
                    ("hf", None)
                }
                _ => {
                    write_gguf_model(&b, &merged.weights, args.file_type, &args.out)?;
                    ("gguf", Some(args.file_type.name()))
                }
            };
            Output {
                out,
                format,
                file_type,
                merged_modules: merged.merged_modules,
                dequantized_base: merged.dequantized_base,
            }
        }
    };
    if args.json {
        return print_json(&o);
    }
    match o.format {
        "gguf-lora" => println!("wrote {} adapted modules to {}", o.merged_modules, o.out),
        _ => println!(
            "wrote {} ({}{}) to {}",
            o.format,
            o.file_type.unwrap_or("f32"),
            match o.merged_modules {
                0 => String::new(),
                n => format!(", {n} modules merged"),
            },
            o.out
        ),
    }
    Ok(())
}
