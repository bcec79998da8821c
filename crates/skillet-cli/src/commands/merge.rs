//! `skillet merge`: fold LoRA adapters into the base weights and write a
//! Hugging Face folder whose logits equal base + adapters (`W + scale·B·A`
//! per adapter, each at its weight); or, with `--combine`, make several
//! adapters into one adapter folder (PEFT's `add_weighted_adapter`). A
//! quantized base is dequantized first, then merged in f32, never merged
//! into quantized blocks (which loses quality).

use serde::Serialize;
use skillet_adapters::{Combine, combine, read_lora_peft, write_peft_file};
use skillet_runtime::{AdapterSpec, Bundle, merged_weights, write_hf_folder};

use crate::output::print_json;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The base model (needed unless --combine).
    #[arg(
        long,
        short = 'm',
        env = "SKILLET_MODEL",
        required_unless_present = "combine"
    )]
    model: Option<std::path::PathBuf>,
    /// A PEFT adapter folder to merge, optionally with a weight
    /// (`DIR:0.7`); repeat for several.
    #[arg(long, value_name = "DIR[:WEIGHT]", required = true)]
    adapter: Vec<AdapterSpec>,
    /// Make the adapters into one adapter folder instead of merging them
    /// into the base: linear (weighted sums of the A and of the B factors;
    /// one rank), cat (factors side by side: the exact sum, rank Σr) or svd
    /// (the exact sum truncated to --svd-rank by SVD).
    #[arg(long, value_enum)]
    combine: Option<CombineArg>,
    /// The rank of an svd combination (default: the largest adapter rank).
    #[arg(long, requires = "combine")]
    svd_rank: Option<usize>,
    /// Output folder (created).
    #[arg(long, short = 'o')]
    out: std::path::PathBuf,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

/// How `--combine` makes adapters into one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum CombineArg {
    Linear,
    Cat,
    Svd,
}

#[derive(Serialize)]
struct Output {
    out: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    combine: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rank: Option<usize>,
    merged_modules: usize,
    dequantized_base: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let o = match args.combine {
        Some(how) => combined(&args, how)?,
        None => {
            let model = args.model.as_ref().expect("clap requires --model");
            let b = Bundle::open(model)?;
            let merged = merged_weights(&b, &args.adapter)?;
            write_hf_folder(&b, &merged.weights, &args.out)?;
            Output {
                out: args.out.display().to_string(),
                combine: None,
                rank: None,
                merged_modules: merged.merged_modules,
                dequantized_base: merged.dequantized_base,
            }
        }
    };
    if args.json {
        return print_json(&o);
    }
    if o.dequantized_base {
        eprintln!(
            "note: the base model is quantized; it was dequantized to f32 and the adapters merged into that"
        );
    }
    match (o.combine, o.rank) {
        (Some(how), Some(r)) => println!(
            "combined {} adapters ({how}) into one of rank {r} on {} modules: {}",
            args.adapter.len(),
            o.merged_modules,
            o.out
        ),
        _ => println!("merged {} modules into {}", o.merged_modules, o.out),
    }
    Ok(())
}

/// `--combine`: the adapters made into one, written as a PEFT folder.
fn combined(args: &Args, how: CombineArg) -> anyhow::Result<Output> {
    let mut files = Vec::with_capacity(args.adapter.len());
    for spec in &args.adapter {
        files.push((read_lora_peft(&spec.dir)?, spec.weight));
    }
    let parts: Vec<_> = files.iter().map(|(f, w)| (f, *w)).collect();
    let (method, name) = match how {
        CombineArg::Linear => (Combine::Linear, "linear"),
        CombineArg::Cat => (Combine::Cat, "cat"),
        CombineArg::Svd => (
            Combine::Svd {
                rank: args.svd_rank,
            },
            "svd",
        ),
    };
    let file = combine(&parts, method)?;
    // One adapter is combined linearly whatever was asked (PEFT's rule).
    let name = if parts.len() == 1 { "linear" } else { name };
    write_peft_file(&args.out, &file)?;
    Ok(Output {
        out: args.out.display().to_string(),
        combine: Some(name),
        rank: Some(file.config.r),
        merged_modules: file.lora.len(),
        dequantized_base: false,
    })
}
