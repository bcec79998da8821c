//! Sampling options as users give them (command line, HTTP request),
//! checked once here so every front end accepts and refuses the same.

use skillet_generate::SamplingParams;

use crate::{Result, RuntimeError};

/// Sampling options before validation (OpenAI's names and ranges).
#[derive(Debug, Clone, Default)]
pub struct SamplingOptions {
    /// 0 is greedy; up to 2.
    pub temperature: Option<f32>,
    /// Nucleus mass in (0, 1].
    pub top_p: Option<f32>,
    /// Keep the k most likely tokens (0: all).
    pub top_k: Option<usize>,
    /// CTRL-style repetition penalty (> 0; 1 = off).
    pub repetition_penalty: Option<f32>,
    /// OpenAI frequency penalty in [-2, 2].
    pub frequency_penalty: Option<f32>,
    /// OpenAI presence penalty in [-2, 2].
    pub presence_penalty: Option<f32>,
    /// Seed of the sampler.
    pub seed: Option<u64>,
}

/// A rejected option: which parameter and why.
fn bad(param: &str, message: String) -> RuntimeError {
    RuntimeError::Param {
        param: param.to_string(),
        message,
    }
}

impl SamplingOptions {
    /// The checked parameters; `default_seed` where none was given.
    pub fn resolve(&self, default_seed: u64) -> Result<SamplingParams> {
        let t = self.temperature.unwrap_or(0.0);
        if !(t.is_finite() && (0.0..=2.0).contains(&t)) {
            return Err(bad("temperature", format!("must be in [0, 2], got {t}")));
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return Err(bad("top_p", format!("must be in (0, 1], got {p}")));
        }
        let rep = self.repetition_penalty.unwrap_or(1.0);
        if !(rep.is_finite() && rep > 0.0) {
            return Err(bad("repetition_penalty", format!("must be > 0, got {rep}")));
        }
        for (name, v) in [
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ] {
            if let Some(v) = v
                && !(v.is_finite() && (-2.0..=2.0).contains(&v))
            {
                return Err(bad(name, format!("must be in [-2, 2], got {v}")));
            }
        }
        Ok(SamplingParams {
            temperature: t,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: rep,
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            seed: self.seed.unwrap_or(default_seed),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_checked_and_named() {
        let ok = SamplingOptions {
            temperature: Some(0.7),
            top_p: Some(0.9),
            frequency_penalty: Some(0.5),
            ..Default::default()
        };
        let p = ok.resolve(3).unwrap();
        assert_eq!((p.temperature, p.seed, p.frequency_penalty), (0.7, 3, 0.5));
        for (opts, param) in [
            (
                SamplingOptions {
                    temperature: Some(-1.0),
                    ..Default::default()
                },
                "temperature",
            ),
            (
                SamplingOptions {
                    temperature: Some(f32::NAN),
                    ..Default::default()
                },
                "temperature",
            ),
            (
                SamplingOptions {
                    top_p: Some(0.0),
                    ..Default::default()
                },
                "top_p",
            ),
            (
                SamplingOptions {
                    presence_penalty: Some(3.0),
                    ..Default::default()
                },
                "presence_penalty",
            ),
            (
                SamplingOptions {
                    repetition_penalty: Some(0.0),
                    ..Default::default()
                },
                "repetition_penalty",
            ),
        ] {
            match opts.resolve(0) {
                Err(RuntimeError::Param { param: p, .. }) => assert_eq!(p, param),
                other => panic!("{param}: {other:?}"),
            }
        }
    }
}
