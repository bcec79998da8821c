//! Per-sequence log-probabilities: for each row of a batch, the sum of
//! `log p(token | prefix)` over its labelled tokens, from one batched
//! forward, and how many tokens each sum has. DPO compares these sums
//! between policy and reference, as TRL's `concatenated_forward` does.
//! The LM head runs on labelled positions only, through the fused op that
//! never stores the `[N, vocabulary]` logits where the head is a plain
//! weight (composed candle ops where an adapter wraps it); log-softmax is
//! in f32 and the row sums are a product with a 0/1 row-membership matrix,
//! so the whole stays differentiable.

use candle_core::{D, DType, Device, Tensor};
use skillet_kernels::{LmHead, linear_token_nll};
use skillet_models::CausalLm;

use crate::{Result, TrainBatch};

/// Summed log-probabilities of each row's labelled tokens (`[rows]`,
/// differentiable) and their counts.
pub fn sequence_logps(model: &dyn CausalLm, batch: &TrainBatch) -> Result<(Tensor, Vec<usize>)> {
    let targets = batch.targets();
    let mut counts = vec![0usize; batch.batch];
    for &(at, _) in &targets {
        counts[at / batch.seq] += 1;
    }
    if targets.is_empty() {
        return Ok((
            Tensor::zeros(batch.batch, DType::F32, &Device::Cpu)?,
            counts,
        ));
    }
    let n = targets.len();
    let token = token_logps(model, batch, 1.0)?.reshape((n, 1))?;
    let mut member = vec![0f32; batch.batch * n];
    for (k, &(at, _)) in targets.iter().enumerate() {
        member[(at / batch.seq) * n + k] = 1.0;
    }
    let member = Tensor::from_vec(member, (batch.batch, n), &Device::Cpu)?;
    let sums = member.matmul(&token)?.squeeze(1)?; // [B]
    Ok((sums, counts))
}

/// `log p(token | prefix)` of every labelled token (`[N]`, f32,
/// differentiable), in the order of [`TrainBatch::targets`], from logits
/// divided by `temperature` (what sampling at that temperature draws from,
/// as TRL's GRPO scores its completions).
pub fn token_logps(model: &dyn CausalLm, batch: &TrainBatch, temperature: f64) -> Result<Tensor> {
    let targets = batch.targets();
    if targets.is_empty() {
        return Ok(Tensor::zeros(0, DType::F32, &Device::Cpu)?);
    }
    let input = batch.input()?;
    let hidden = model.forward_hidden(&input)?; // [B,T,C]
    let c = hidden.dim(D::Minus1)?;
    let rows: Vec<u32> = targets.iter().map(|&(i, _)| i as u32).collect();
    let labels: Vec<u32> = targets.iter().map(|&(_, t)| t).collect();
    let adapters = input.adapters.gather(&rows, batch.seq);
    let picked = hidden
        .reshape((batch.batch * batch.seq, c))?
        .index_select(&Tensor::new(rows.as_slice(), &Device::Cpu)?, 0)?; // [N,C]
    if let Some(head) = model.head_frozen(&adapters)? {
        let (nll, _) = linear_token_nll(&picked, LmHead::Frozen(&head), &labels, temperature)?;
        return Ok(nll.neg()?);
    }
    if let Some(head) = model.head_weight(&adapters) {
        let (nll, _) = linear_token_nll(&picked, head.lm_head(), &labels, temperature)?;
        return Ok(nll.neg()?);
    }
    composed_logps(model.head(&picked, &adapters)?, &labels, temperature)
}

/// `log softmax(logits / temperature)[label]` of each row, through
/// candle's own ops (an LM head wrapped by an adapter).
fn composed_logps(logits: Tensor, labels: &[u32], temperature: f64) -> Result<Tensor> {
    let n = labels.len();
    let mut logits = logits.to_dtype(DType::F32)?; // [N,V]
    if temperature != 1.0 {
        logits = (logits / temperature)?;
    }
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?; // [N,1]
    let label_t = Tensor::new(labels, &Device::Cpu)?.reshape((n, 1))?;
    Ok((shifted.gather(&label_t, D::Minus1)? - lse)?.squeeze(1)?)
}
