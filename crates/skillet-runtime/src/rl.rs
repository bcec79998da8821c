//! GRPO's prompts, sampled and scored: a prompt file read and encoded for
//! the model, and the [`RolloutSource`] that samples G completions per
//! prompt with the current policy through the continuous-batching engine
//! (the one `skillet serve` runs; the G requests of a prompt share its
//! cached prefix) and sums the weighted reward functions.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use skillet_data::{
    DataError, DataIssue, EncodeOptions, Encoder, IssueCode, RlPrompt, read_prompts,
};
use skillet_generate::{EngineConfig, Request, SamplingParams, generate_all};
use skillet_models::{Activations, Adapter, CausalLm, LoadOptions, Model};
use skillet_tokenizer::Tokenizer;
use skillet_train::{GrpoSettings, Metrics, RolloutSource, Sampled};

use crate::{Bundle, Result, RewardFn, ToScore};

/// Sequences the engine decodes together.
const ENGINE_BATCH: usize = 16;

/// A prompt file, parsed and encoded.
#[derive(Debug, Clone)]
pub struct PromptSet {
    /// The file.
    pub path: PathBuf,
    /// Each prompt with its line number.
    pub prompts: Vec<(usize, RlPrompt)>,
    /// Each prompt's tokens.
    pub ids: Vec<Vec<u32>>,
}

impl PromptSet {
    /// Reads and encodes `path`; a prompt longer than `max_prompt_len`
    /// tokens (the room `max_completion_length` leaves) is reported with
    /// its line, as every bad line is, before anything runs.
    pub fn load(path: &Path, bundle: &Bundle, max_prompt_len: usize) -> Result<Self> {
        let prompts = read_prompts(path)?;
        let options = EncodeOptions {
            max_seq_len: usize::MAX,
            train_on_prompt: false,
            add_eos: false,
        };
        let encoder = Encoder::new(&bundle.tokenizer, bundle.template.as_ref(), options);
        let mut ids = Vec::with_capacity(prompts.len());
        let mut issues = Vec::new();
        for (line, p) in &prompts {
            let t = encoder.encode_prompt(&p.prompt)?;
            if t.len() > max_prompt_len || t.is_empty() {
                issues.push(DataIssue {
                    file: path.to_path_buf(),
                    line: *line,
                    code: IssueCode::InvalidPrompt,
                    message: format!(
                        "the prompt has {} tokens; data.max_seq_len minus method.max_completion_length leaves {max_prompt_len}",
                        t.len()
                    ),
                });
            }
            ids.push(t);
        }
        if !issues.is_empty() {
            return Err(DataError::Invalid(issues).into());
        }
        Ok(Self {
            path: path.to_path_buf(),
            prompts,
            ids,
        })
    }

    /// Keeps the prompts at `indices` (in order).
    pub fn subset(&self, indices: &[usize]) -> Self {
        Self {
            path: self.path.clone(),
            prompts: indices.iter().map(|&i| self.prompts[i].clone()).collect(),
            ids: indices.iter().map(|&i| self.ids[i].clone()).collect(),
        }
    }
}

/// A copy of the model in its quantized blocks to sample with, where the
/// weights are quantized and training holds them dequantized (`None`
/// otherwise): the same numbers, a fraction of the bytes read per decoded
/// token, about 0.3 bytes per parameter more memory for a 4-bit base.
pub fn quantized_sampler(bundle: &Bundle, training_quantized: bool) -> Result<Option<Model>> {
    if training_quantized || !crate::is_quantized(bundle.source.weights(&bundle.config)?.as_ref()) {
        return Ok(None);
    }
    Ok(Some(bundle.load_model(LoadOptions {
        keep_quantized: true,
        ..Default::default()
    })?))
}

/// Training and held-out prompts with the reward functions.
pub struct PromptSource<'a> {
    /// Training prompts.
    pub train: &'a PromptSet,
    /// Held-out prompts.
    pub valid: &'a PromptSet,
    /// The model's tokenizer.
    pub tokenizer: &'a Tokenizer,
    /// The weighted reward functions.
    pub rewards: &'a [RewardFn],
    /// GRPO's settings (G, lengths, temperature).
    pub settings: GrpoSettings,
    /// Nucleus sampling.
    pub top_p: f64,
    /// The run's seed.
    pub seed: u64,
    /// Padding id (for reward models).
    pub pad_id: u32,
    /// The model to sample with, where it is not the one trained: the
    /// base in its quantized blocks holds the same numbers as the
    /// dequantized copy training multiplies, and reads a fraction of the
    /// bytes per decoded token. The adapter applies to it alike.
    pub sampler: Option<&'a dyn CausalLm>,
    /// How quantized weights take their inputs while sampling.
    pub activations: Activations,
    /// Sample every training completion to `max_completion_length`,
    /// ignoring end-of-turn tokens (as `min_new_tokens` does in
    /// transformers): benchmarks use it to fix the lengths.
    pub ignore_eos: bool,
}

/// Mean and Bessel-corrected standard deviation (0 for one value).
fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let mean = v.iter().sum::<f64>() / n;
    let ss = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>();
    (
        mean,
        if v.len() > 1 {
            (ss / (n - 1.0)).sqrt()
        } else {
            0.0
        },
    )
}

impl PromptSource<'_> {
    /// Generates for `asked` (prompt index, sampling) in `set`, scores
    /// every completion, and returns the tokens, the weighted totals and
    /// the metrics. Training samples (`training`) are drawn by the sampler
    /// where there is one, to the full length where `ignore_eos`; held-out
    /// ones by `model` itself, which then carries its adapter inside.
    fn roll(
        &self,
        model: &dyn CausalLm,
        adapter: Option<Arc<dyn Adapter>>,
        set: &PromptSet,
        asked: &[(usize, SamplingParams)],
        training: bool,
    ) -> Result<(Vec<Vec<u32>>, Vec<f64>, Metrics)> {
        let max_tokens = self.settings.max_completion_length;
        let longest = asked
            .iter()
            .map(|(i, _)| set.ids[*i].len())
            .max()
            .unwrap_or(0);
        let requests: Vec<Request> = asked
            .iter()
            .map(|(i, sampling)| Request {
                prompt: set.ids[*i].clone(),
                max_tokens,
                sampling: sampling.clone(),
                stop: vec![],
                eos_ids: if training && self.ignore_eos {
                    vec![]
                } else {
                    self.tokenizer.eos_ids().to_vec()
                },
                adapter: adapter.clone(),
                logprobs: None,
            })
            .collect();
        let config = EngineConfig {
            max_batch: ENGINE_BATCH.min(asked.len().max(1)),
            capacity: longest + max_tokens,
            activations: self.activations,
            ..EngineConfig::default()
        };
        // Held-out generation gets the model with its adapter inside
        // (`adapter` is None): only training samples go to the sampler.
        let sampler = match (&adapter, self.sampler) {
            (Some(_), Some(s)) => s,
            _ => model,
        };
        let generations = generate_all(sampler, self.tokenizer, config, requests)?;
        let items: Vec<ToScore<'_>> = asked
            .iter()
            .zip(&generations)
            .map(|((i, _), g)| ToScore {
                line: set.prompts[*i].0,
                prompt: &set.prompts[*i].1,
                prompt_ids: &set.ids[*i],
                completion: &g.text,
                completion_ids: &g.ids,
            })
            .collect();
        let mut totals = vec![0f64; items.len()];
        let mut metrics = Metrics::new();
        for r in self.rewards {
            let scores = r.score(model, &items, self.pad_id)?;
            for (t, s) in totals.iter_mut().zip(&scores) {
                *t += r.weight * s;
            }
            let (mean, std) = mean_std(&scores);
            metrics.insert(format!("rewards/{}/mean", r.name), mean);
            metrics.insert(format!("rewards/{}/std", r.name), std);
        }
        let lens: Vec<f64> = generations.iter().map(|g| g.ids.len() as f64).collect();
        metrics.insert("completions/mean_length".into(), mean_std(&lens).0);
        metrics.insert(
            "completions/min_length".into(),
            lens.iter().copied().fold(f64::INFINITY, f64::min),
        );
        metrics.insert(
            "completions/max_length".into(),
            lens.iter().copied().fold(0.0, f64::max),
        );
        let eos = self.tokenizer.eos_ids();
        let clipped = generations
            .iter()
            .filter(|g| g.ids.last().is_none_or(|t| !eos.contains(t)))
            .count();
        metrics.insert(
            "completions/clipped_ratio".into(),
            clipped as f64 / generations.len().max(1) as f64,
        );
        let completions = generations.into_iter().map(|g| g.ids).collect();
        Ok((completions, totals, metrics))
    }
}

impl RolloutSource for PromptSource<'_> {
    fn len(&self) -> usize {
        self.train.ids.len()
    }

    fn sample(
        &self,
        model: &dyn CausalLm,
        adapter: Option<Arc<dyn Adapter>>,
        items: &[usize],
        step: u64,
    ) -> skillet_train::Result<Sampled> {
        let g = self.settings.num_generations;
        let asked: Vec<(usize, SamplingParams)> = items
            .iter()
            .flat_map(|&i| {
                (0..g).map(move |k| {
                    // Seeded by the run, the step, the prompt and the draw,
                    // so a resumed run samples what the first would have.
                    let seed = self.seed
                        ^ (step + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                        ^ (i as u64 + 1).wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
                        ^ (k as u64 + 1).wrapping_mul(0x1656_67B1_9E37_79F9);
                    let sampling = SamplingParams {
                        temperature: self.settings.temperature as f32,
                        top_p: (self.top_p < 1.0).then_some(self.top_p as f32),
                        seed,
                        ..SamplingParams::default()
                    };
                    (i, sampling)
                })
            })
            .collect();
        let (completions, rewards, metrics) =
            self.roll(model, adapter, self.train, &asked, true)
                .map_err(|e| skillet_train::TrainError::Invalid(e.to_string()))?;
        Ok(Sampled {
            prompts: items.iter().map(|&i| self.train.ids[i].clone()).collect(),
            completions,
            rewards,
            metrics,
        })
    }

    fn has_validation(&self) -> bool {
        !self.valid.ids.is_empty()
    }

    /// One greedy completion per held-out prompt: the weighted reward's
    /// mean, each function's mean (exact match where configured), lengths.
    fn validate(&self, model: &dyn CausalLm) -> skillet_train::Result<Metrics> {
        let asked: Vec<(usize, SamplingParams)> = (0..self.valid.ids.len())
            .map(|i| (i, SamplingParams::default()))
            .collect();
        let (_, totals, metrics) = self
            .roll(model, None, self.valid, &asked, false)
            .map_err(|e| skillet_train::TrainError::Invalid(e.to_string()))?;
        let mut out: Metrics = metrics
            .into_iter()
            .filter(|(k, _)| !k.ends_with("/std"))
            .collect();
        out.insert("reward".into(), mean_std(&totals).0);
        out.insert("prompts".into(), totals.len() as f64);
        Ok(out)
    }
}
