//! The causal-LM loss: next-token cross-entropy summed over labelled
//! positions only. The LM head runs on those positions alone, so padding,
//! prompts and ignored tokens cost no vocabulary projection.

use candle_core::backprop::GradStore;
use candle_core::{D, DType, Device, Tensor};
use skillet_models::CausalLm;

use crate::{Result, TrainBatch};

/// The summed loss of one batch and what it was summed over.
#[derive(Debug)]
pub struct LossParts {
    /// Scalar: the sum of per-token negative log-likelihoods (differentiable).
    pub sum: Tensor,
    /// Number of labelled tokens in the sum.
    pub tokens: usize,
    /// How many of them the model's argmax predicted.
    pub correct: usize,
}

/// Summed next-token cross-entropy of `batch` under `model`. Divide by the
/// total labelled tokens of the whole (accumulated) batch to get the mean,
/// as transformers does since its gradient-accumulation fix. A plain
/// dense LM head (frozen, or trainable in full fine-tuning) goes through
/// the fused, chunked op; one wrapped by an adapter through composed
/// candle ops.
pub fn causal_lm_loss(model: &dyn CausalLm, batch: &TrainBatch) -> Result<LossParts> {
    causal_lm_loss_with(model, batch, true)
}

/// [`causal_lm_loss`] for evaluation: the sum is detached, so the fused
/// loss makes no gradient (it makes one in forward where one may follow).
pub fn causal_lm_loss_value(model: &dyn CausalLm, batch: &TrainBatch) -> Result<LossParts> {
    loss(model, batch, true, false)
}

/// [`causal_lm_loss`], choosing whether the fused op may be used (the
/// composed path is the reference the fused one is tested against).
pub fn causal_lm_loss_with(
    model: &dyn CausalLm,
    batch: &TrainBatch,
    allow_fused: bool,
) -> Result<LossParts> {
    loss(model, batch, allow_fused, true)
}

fn loss(
    model: &dyn CausalLm,
    batch: &TrainBatch,
    allow_fused: bool,
    gradient: bool,
) -> Result<LossParts> {
    let targets = batch.targets();
    if targets.is_empty() {
        return Ok(LossParts {
            sum: Tensor::new(0f32, &Device::Cpu)?,
            tokens: 0,
            correct: 0,
        });
    }
    let input = batch.input()?;
    let hidden = model.forward_hidden(&input)?; // [B,T,C]
    let c = hidden.dim(D::Minus1)?;
    let rows: Vec<u32> = targets.iter().map(|&(i, _)| i as u32).collect();
    let labels: Vec<u32> = targets.iter().map(|&(_, t)| t).collect();
    let n = rows.len();
    let adapters = input.adapters.gather(&rows, batch.seq);
    let picked = hidden
        .reshape((batch.batch * batch.seq, c))?
        .index_select(&Tensor::new(rows, &Device::Cpu)?, 0)?; // [N,C]
    let picked = if gradient { picked } else { picked.detach() };
    if allow_fused && let Some(head) = model.head_frozen(&adapters)? {
        let (sum, correct) = skillet_kernels::linear_cross_entropy_frozen(&picked, &head, &labels)?;
        return Ok(LossParts {
            sum,
            tokens: n,
            correct,
        });
    }
    if allow_fused && let Some(head) = model.head_weight(&adapters) {
        let (nll, correct) =
            skillet_kernels::linear_token_nll(&picked, head.lm_head(), &labels, 1.0)?;
        return Ok(LossParts {
            sum: nll.sum_all()?,
            tokens: n,
            correct,
        });
    }
    let logits = model.head(&picked, &adapters)?.to_dtype(DType::F32)?; // [N,V]
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?; // [N,1]
    let label_t = Tensor::new(labels.as_slice(), &Device::Cpu)?.reshape((n, 1))?;
    let picked_logit = shifted.gather(&label_t, D::Minus1)?; // [N,1]
    let sum = (lse - picked_logit)?.sum_all()?;
    let argmax = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
    let correct = argmax.iter().zip(&labels).filter(|(a, b)| a == b).count();
    Ok(LossParts {
        sum,
        tokens: n,
        correct,
    })
}

/// `loss.backward()`, plus the gradients that checkpointed layers of
/// `model` set aside (see `Model::set_activation_checkpointing`).
pub fn backward(model: &dyn CausalLm, loss: &Tensor) -> Result<GradStore> {
    let mut store = loss.backward()?;
    for (var, grad) in model.take_checkpoint_grads() {
        let grad = match store.remove(&var) {
            Some(prev) => (prev + grad)?,
            None => grad,
        };
        store.insert(&var, grad);
    }
    Ok(store)
}
