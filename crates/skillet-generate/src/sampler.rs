//! Next-token choice from logits, in the order transformers applies its
//! logits processors: repetition penalty, then temperature, top-k, top-p.

use skillet_models::Rng;

/// How to pick tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax); otherwise logits are divided by it.
    pub temperature: f32,
    /// Keep only the k most likely tokens (None or 0: all).
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability reaches p (None or 1: all).
    pub top_p: Option<f32>,
    /// CTRL-style penalty (Keskar et al. 2019) on tokens already present:
    /// positive logits divided by it, negative ones multiplied. 1 = off.
    pub repetition_penalty: f32,
    /// OpenAI's frequency penalty: subtracted from a token's logit once
    /// per time it was generated so far. 0 = off.
    pub frequency_penalty: f32,
    /// OpenAI's presence penalty: subtracted from the logit of every token
    /// generated so far. 0 = off.
    pub presence_penalty: f32,
    /// Seed of the sampling generator.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: 0,
        }
    }
}

/// Stateful sampler (owns the random generator).
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
}

/// Index of the largest value; the first one on ties, as `torch.argmax`.
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best as u32
}

impl Sampler {
    /// A sampler for `params`.
    pub fn new(params: SamplingParams) -> Self {
        let rng = Rng::new(params.seed);
        Self { params, rng }
    }

    /// The parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from `logits` given the tokens so far
    /// (`history`, of which the first `prompt_len` are the prompt).
    pub fn sample(&mut self, logits: &[f32], history: &[u32], prompt_len: usize) -> u32 {
        let mut scores = logits.to_vec();
        let (freq, presence) = (self.params.frequency_penalty, self.params.presence_penalty);
        if freq != 0.0 || presence != 0.0 {
            let mut counts = std::collections::HashMap::<u32, u32>::new();
            for &t in history.get(prompt_len..).unwrap_or_default() {
                *counts.entry(t).or_default() += 1;
            }
            for (t, c) in counts {
                if let Some(v) = scores.get_mut(t as usize) {
                    *v -= c as f32 * freq + presence;
                }
            }
        }
        let penalty = self.params.repetition_penalty;
        if penalty != 1.0 {
            let mut seen = vec![false; scores.len()];
            for &t in history {
                if let Some(s) = seen.get_mut(t as usize)
                    && !*s
                {
                    *s = true;
                    let v = &mut scores[t as usize];
                    *v = if *v < 0.0 { *v * penalty } else { *v / penalty };
                }
            }
        }
        if self.params.temperature <= 0.0 {
            return argmax(&scores);
        }
        let t = self.params.temperature;
        scores.iter_mut().for_each(|s| *s /= t);

        let top_k = self.params.top_k.filter(|&k| k > 0 && k < scores.len());
        let top_p = self.params.top_p.filter(|&p| p > 0.0 && p < 1.0);
        if top_k.is_none() && top_p.is_none() {
            // Nothing cut: the whole distribution, walked in vocabulary
            // order (no ranking needed).
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let weights: Vec<f64> = scores.iter().map(|&s| f64::from(s - max).exp()).collect();
            let total: f64 = weights.iter().sum();
            let u = self.rng.next_f64();
            let mut cum = 0.0;
            for (i, w) in weights.iter().enumerate() {
                cum += w / total;
                if u < cum {
                    return i as u32;
                }
            }
            // Sums short of `u` by rounding: the last token with weight.
            return weights.iter().rposition(|&w| w > 0.0).unwrap_or(0) as u32;
        }
        let mut ranked = Ranked::new(&scores);
        let max = scores[ranked.at(0)];
        let weight = |i: usize| f64::from(scores[i] - max).exp();
        // Top-k: the k best, and every token tied with the k-th (as in
        // transformers); the kept tokens are the first `keep` ranks.
        let kth = top_k.map(|k| scores[ranked.at(k - 1)]);
        let kept = |s: f32| kth.is_none_or(|kth| s >= kth);
        let keep = scores.iter().filter(|&&s| kept(s)).count();
        let total: f64 = (0..scores.len())
            .filter(|&i| kept(scores[i]))
            .map(weight)
            .sum();
        // Top-p: the fewest best tokens whose probability reaches p.
        let (mut limit, mut mass) = (keep, total);
        if let Some(p) = top_p {
            let (mut cum, mut sum, mut n) = (0.0, 0.0, 0);
            while n < keep {
                let w = weight(ranked.at(n));
                cum += w / total;
                sum += w;
                n += 1;
                if cum >= f64::from(p) {
                    break;
                }
            }
            (limit, mass) = (n.max(1), sum);
        }
        let u = self.rng.next_f64();
        let mut cum = 0.0;
        for rank in 0..limit {
            let i = ranked.at(rank);
            cum += weight(i) / mass;
            if u < cum {
                return i as u32;
            }
        }
        ranked.at(limit - 1) as u32
    }
}

/// Token indices by descending score (ties: lower index first), ranked
/// only as far as asked: sampling walks from the most likely token and
/// nearly always stops within the first few dozen, so sorting the whole
/// vocabulary for every token would be most of the sampler's time. Each
/// extension selects the best `m` in one pass and sorts those (`m`
/// doubling); the order is total, so every prefix is the full sort's.
struct Ranked<'a> {
    scores: &'a [f32],
    order: Vec<usize>,
}

impl<'a> Ranked<'a> {
    fn new(scores: &'a [f32]) -> Self {
        Self {
            scores,
            order: Vec::new(),
        }
    }

    /// The index of the token at `rank` (< the number of scores).
    fn at(&mut self, rank: usize) -> usize {
        if rank >= self.order.len() {
            let n = self.scores.len();
            let m = (rank + 1).max(2 * self.order.len()).max(64).min(n);
            let scores = self.scores;
            let cmp = |a: &usize, b: &usize| scores[*b].total_cmp(&scores[*a]).then(a.cmp(b));
            let mut idx: Vec<usize> = (0..n).collect();
            if m < n {
                idx.select_nth_unstable_by(m - 1, cmp);
                idx.truncate(m);
            }
            idx.sort_unstable_by(cmp);
            self.order = idx;
        }
        self.order[rank]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            ..Default::default()
        }
    }

    #[test]
    fn greedy_is_argmax_first_on_ties() {
        let mut s = Sampler::new(params(0.0));
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0], &[], 0), 1);
    }

    #[test]
    fn repetition_penalty_follows_sign() {
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            ..params(0.0)
        });
        // 4.0 -> 2.0 (seen), so 3.0 wins; a negative seen logit gets worse.
        assert_eq!(s.sample(&[4.0, 3.0, -1.0], &[0, 2], 0), 1);
    }

    #[test]
    fn top_k_one_is_greedy_and_seed_repeats() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut s = Sampler::new(SamplingParams {
            top_k: Some(1),
            ..params(1.0)
        });
        for _ in 0..20 {
            assert_eq!(s.sample(&logits, &[], 0), argmax(&logits));
        }
        let draw = |seed| {
            let mut s = Sampler::new(SamplingParams {
                seed,
                ..params(1.0)
            });
            (0..30)
                .map(|_| s.sample(&logits, &[], 0))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // Probabilities ~ [0.64, 0.24, 0.09, 0.03]: p = 0.6 keeps only the first.
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        let mut s = Sampler::new(SamplingParams {
            top_p: Some(0.6),
            ..params(1.0)
        });
        for _ in 0..50 {
            assert_eq!(s.sample(&logits, &[], 0), 0);
        }
        // p = 0.8 keeps two; both must show up, never the others.
        let mut s = Sampler::new(SamplingParams {
            top_p: Some(0.8),
            seed: 3,
            ..params(1.0)
        });
        let seen: std::collections::BTreeSet<u32> =
            (0..200).map(|_| s.sample(&logits, &[], 0)).collect();
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![0, 1]);
    }

    /// The sort of the whole vocabulary the ranked walk replaces (and,
    /// where nothing is cut, the walk in vocabulary order).
    fn sample_fully_sorted(params: &SamplingParams, logits: &[f32], u: f64) -> u32 {
        let scores: Vec<f32> = logits.iter().map(|s| s / params.temperature).collect();
        let mut order: Vec<usize> = (0..scores.len()).collect();
        let cut = params.top_k.is_some_and(|k| k > 0 && k < scores.len())
            || params.top_p.is_some_and(|p| p > 0.0 && p < 1.0);
        if cut {
            order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
        }
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut keep = order.len();
        if let Some(k) = params.top_k.filter(|&k| k > 0 && k < keep) {
            let kth = scores[order[k - 1]];
            keep = order.iter().take_while(|&&i| scores[i] >= kth).count();
        }
        let mut probs: Vec<f64> = order[..keep]
            .iter()
            .map(|&i| f64::from(scores[i] - max).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if let Some(p) = params.top_p.filter(|&p| p > 0.0 && p < 1.0) {
            let mut cum = 0.0;
            let n = probs
                .iter()
                .position(|q| {
                    cum += q;
                    cum >= f64::from(p)
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(n.max(1));
            let total: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|q| *q /= total);
        }
        let mut cum = 0.0;
        for (rank, q) in probs.iter().enumerate() {
            cum += q;
            if u < cum {
                return order[rank] as u32;
            }
        }
        order[probs.len() - 1] as u32
    }

    /// Ranking only as far as the walk goes picks what sorting the whole
    /// vocabulary picks, with top-k (ties included) and top-p, on a
    /// vocabulary with ties and a flat tail (so walks go past the first
    /// extensions).
    #[test]
    fn ranked_walk_picks_what_a_full_sort_picks() {
        let logits: Vec<f32> = (0..5000)
            .map(|i| {
                ((i * 7919 % 104_729) as f32 * 1e-4).sin() * 4.0
                    + if i % 97 == 0 { 6.0 } else { 0.0 }
            })
            .map(|x| (x * 8.0).round() / 8.0)
            .collect();
        let settings = [
            (1.0, None, None),
            (0.7, Some(40), None),
            (1.3, None, Some(0.9)),
            (1.0, Some(500), Some(0.95)),
            (2.0, None, Some(0.999)),
        ];
        for (temperature, top_k, top_p) in settings {
            let p = SamplingParams {
                temperature,
                top_k,
                top_p,
                seed: 5,
                ..Default::default()
            };
            let mut s = Sampler::new(p.clone());
            let mut rng = Rng::new(5);
            for _ in 0..300 {
                let got = s.sample(&logits, &[], 0);
                let want = sample_fully_sorted(&p, &logits, rng.next_f64());
                assert_eq!(got, want, "{p:?}");
            }
        }
    }

    #[test]
    fn temperature_sampling_matches_probabilities() {
        let logits = [0.0f32, (3.0f32).ln()]; // probabilities 1/4, 3/4
        let mut s = Sampler::new(SamplingParams {
            seed: 11,
            ..params(1.0)
        });
        let ones = (0..4000).filter(|_| s.sample(&logits, &[], 0) == 1).count();
        assert!((2850..3150).contains(&ones), "{ones}");
    }
}
