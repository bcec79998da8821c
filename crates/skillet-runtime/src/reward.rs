//! Using a reward model: score token sequences, score a file of
//! preference pairs (accuracy, margin, reward statistics, as TRL's
//! `RewardTrainer` evaluates), or score examples and texts. The reward
//! adapter is passed with each call, so the same loaded base can also run
//! a policy.

use std::path::Path;
use std::sync::Arc;

use candle_core::Tensor;
use serde::Serialize;
use skillet_adapters::RewardAdapter;
use skillet_data::{EncodeOptions, Encoder, Example, PairPrompt, Turn};
use skillet_models::export::SCORE_HEAD;
use skillet_models::{Adapted, Adapter, CausalLm, LoadOptions, Model};
use skillet_train::{Trainable, score_sequences};

use crate::{Bundle, PairData, Result, RuntimeError};

/// A reward model: a reward adapter (LoRA and `score` head) on the base
/// model it is used with, or a whole model of its own (full fine-tuning:
/// a folder whose weights include `score.weight`).
pub struct RewardModel {
    /// Its own body, where it is a whole model (else the base it is used
    /// with runs it).
    pub body: Option<Model>,
    /// The LoRA on the body, where it is an adapter.
    pub adapter: Option<Arc<dyn Adapter>>,
    /// `[1, hidden]`.
    pub score: Tensor,
}

impl RewardModel {
    /// Reads the reward adapter folder `dir` (Skillet's or TRL's) for
    /// `model`.
    pub fn load(model: &dyn CausalLm, dir: &Path) -> Result<Self> {
        let a = RewardAdapter::load(model, dir)?;
        Ok(Self {
            body: None,
            adapter: Trainable::adapter(&a),
            score: a.score,
        })
    }

    /// Reads a whole reward model: a model folder (what full fine-tuning
    /// of a reward model writes) whose weights include `score.weight`.
    pub fn load_model(dir: &Path) -> Result<Self> {
        let bundle = Bundle::open(dir)?;
        let score = read_score_head(&bundle)?;
        let body = bundle.load_model(LoadOptions::default())?;
        Ok(Self {
            body: Some(body),
            adapter: None,
            score,
        })
    }

    /// The reward of each sequence, `batch` sequences per forward; `model`
    /// is the base a reward adapter runs on (unused by a whole model).
    pub fn score(
        &self,
        model: &dyn CausalLm,
        sequences: &[Vec<u32>],
        batch: usize,
        pad_id: u32,
    ) -> Result<Vec<f32>> {
        let body = self.body.as_ref().map_or(model, |b| b as &dyn CausalLm);
        let adapted = Adapted::new(body, self.adapter.clone());
        Ok(score_sequences(
            &adapted,
            &self.score,
            sequences,
            batch,
            pad_id,
        )?)
    }
}

/// The `score.weight` (`[1, hidden]`, f32) of a model folder.
pub(crate) fn read_score_head(bundle: &Bundle) -> Result<Tensor> {
    let dir = bundle.source.path();
    let weights = bundle.source.weights(&bundle.config)?;
    if !weights.contains(SCORE_HEAD) {
        return Err(RuntimeError::Invalid(format!(
            "{}: no {SCORE_HEAD}: not a reward model (give its adapter with the base model instead)",
            dir.display()
        )));
    }
    let score = weights
        .load(SCORE_HEAD, false)?
        .to_dense(&candle_core::Device::Cpu)?
        .to_dtype(candle_core::DType::F32)?;
    let hidden = bundle.config.hidden_size;
    if score.dims() != [1, hidden] {
        return Err(RuntimeError::Invalid(format!(
            "{}: {SCORE_HEAD} is {:?}; a reward head of this model is [1, {hidden}]",
            dir.display(),
            score.dims()
        )));
    }
    Ok(score)
}

/// Least, greatest, mean and standard deviation (population) of rewards.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RewardStats {
    /// Mean.
    pub mean: f64,
    /// Standard deviation.
    pub std: f64,
    /// Least.
    pub min: f64,
    /// Greatest.
    pub max: f64,
}

impl RewardStats {
    /// Statistics of `values` (`None` when empty).
    pub fn of(values: impl IntoIterator<Item = f64>) -> Option<Self> {
        let v: Vec<f64> = values.into_iter().collect();
        if v.is_empty() {
            return None;
        }
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64;
        Some(Self {
            mean,
            std: var.sqrt(),
            min: v.iter().copied().fold(f64::INFINITY, f64::min),
            max: v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        })
    }
}

/// One pair's rewards.
#[derive(Debug, Clone, Serialize)]
pub struct PairReward {
    /// Line in the file.
    pub line: usize,
    /// Reward of the chosen side.
    pub chosen: f64,
    /// Reward of the rejected side.
    pub rejected: f64,
}

/// A file of pairs scored.
#[derive(Debug, Clone, Serialize)]
pub struct PairScores {
    /// Pairs scored.
    pub pairs: usize,
    /// Fraction whose chosen side scores strictly higher.
    pub accuracy: f64,
    /// Mean of chosen − rejected.
    pub mean_margin: f64,
    /// Statistics over both sides' rewards.
    pub rewards: RewardStats,
    /// Each pair.
    pub each: Vec<PairReward>,
}

/// Scores every pair of `data`.
pub fn score_pairs(
    rm: &RewardModel,
    model: &dyn CausalLm,
    data: &PairData,
    batch: usize,
    pad_id: u32,
) -> Result<PairScores> {
    if data.tokenized.is_empty() {
        return Err(RuntimeError::Invalid(format!(
            "{}: no pairs",
            data.path.display()
        )));
    }
    let sequences: Vec<Vec<u32>> = data
        .tokenized
        .iter()
        .flat_map(|p| [p.side(true).ids, p.side(false).ids])
        .collect();
    let r = rm.score(model, &sequences, batch, pad_id)?;
    let each: Vec<PairReward> = data
        .tokenized
        .iter()
        .zip(r.chunks(2))
        .map(|(p, s)| PairReward {
            line: p.line,
            chosen: s[0] as f64,
            rejected: s[1] as f64,
        })
        .collect();
    let n = each.len() as f64;
    Ok(PairScores {
        pairs: each.len(),
        accuracy: each.iter().filter(|p| p.chosen > p.rejected).count() as f64 / n,
        mean_margin: each.iter().map(|p| p.chosen - p.rejected).sum::<f64>() / n,
        rewards: RewardStats::of(r.iter().map(|&x| x as f64)).expect("not empty"),
        each,
    })
}

/// What a reward model scores in an example: the conversation's last
/// assistant turn after the turns before it, a prompt's completion, or a
/// whole text (as a completion of an empty prompt).
pub fn scored_tokens(
    bundle: &Bundle,
    options: EncodeOptions,
    example: &Example,
) -> Result<Vec<u32>> {
    let encoder = Encoder::new(&bundle.tokenizer, bundle.template.as_ref(), options);
    let (prompt, completion) = match example {
        Example::Chat(turns) => {
            let Some((last, before)) = turns.split_last().filter(|(l, _)| l.role == "assistant")
            else {
                return Err(RuntimeError::Invalid(
                    "a conversation to score must end with an assistant turn".into(),
                ));
            };
            let before: Vec<Turn> = before.to_vec();
            (PairPrompt::Chat(before), last.content.as_str())
        }
        Example::Completion { prompt, completion } => {
            (PairPrompt::Text(prompt.clone()), completion.as_str())
        }
        Example::Text(text) => (PairPrompt::Text(String::new()), text.as_str()),
    };
    Ok(encoder.encode_scored(&prompt, completion)?)
}
