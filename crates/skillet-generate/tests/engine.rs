//! The batching engine on a tiny random model: greedy generation of many
//! sequences batched together (different prompt lengths, adapters, output
//! lengths; sequences joining as others leave; prompts prefilled in chunks
//! beside running decodes) equals each sequence generated alone, token for
//! token; a cancelled or abandoned sequence frees its slot at once.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use candle_core::{Device, Tensor};
use skillet_adapters::{LoraAdapter, LoraSettings, Targets};
use skillet_generate::{
    Engine, EngineConfig, Event, Request, SamplingParams, TextStream, generate_all,
};
use skillet_models::{Adapter, LoadOptions, Model, random_weights, tiny_config};
use skillet_tokenizer::Tokenizer;

fn tokenizer() -> Tokenizer {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny-hf/llama");
    Tokenizer::from_hf_dir(&dir).unwrap()
}

fn model() -> Model {
    let cfg = tiny_config(300);
    Model::load(
        cfg.clone(),
        &random_weights(&cfg, 11).unwrap(),
        LoadOptions::default(),
    )
    .unwrap()
}

fn adapter(m: &Model, targets: &[&str], seed: u64) -> Arc<dyn Adapter> {
    let settings = LoraSettings::new(
        4,
        8.0,
        0.0,
        false,
        Targets::Names(targets.iter().map(|s| s.to_string()).collect()),
    )
    .unwrap();
    let a = LoraAdapter::new(m, &settings, seed, None).unwrap();
    for v in a.vars().iter().skip(1).step_by(2) {
        let vals: Vec<f32> = (0..v.elem_count())
            .map(|k| (((k * 17 + seed as usize) % 11) as f32 - 5.0) * 0.05)
            .collect();
        v.set(&Tensor::from_vec(vals, v.shape(), &Device::Cpu).unwrap())
            .unwrap();
    }
    Arc::new(a)
}

fn request(prompt: Vec<u32>, max_tokens: usize, adapter: Option<Arc<dyn Adapter>>) -> Request {
    Request {
        prompt,
        max_tokens,
        sampling: SamplingParams::default(),
        stop: vec![],
        eos_ids: vec![],
        adapter,
        logprobs: None,
    }
}

#[test]
fn batched_greedy_generation_equals_one_at_a_time() {
    let (m, tok) = (model(), tokenizer());
    let a1 = adapter(&m, &["q_proj", "v_proj"], 1);
    let a2 = adapter(&m, &["gate_proj", "down_proj", "lm_head"], 2);
    let adapters = [None, Some(a1), Some(a2)];
    let requests: Vec<Request> = (0..9)
        .map(|i| {
            let prompt: Vec<u32> = (0..3 + 5 * i)
                .map(|k| ((k * 7 + i * 13) % 290 + 3) as u32)
                .collect();
            request(prompt, 4 + (i * 5) % 11, adapters[i % 3].clone())
        })
        .collect();
    let alone: Vec<Vec<u32>> = requests
        .iter()
        .map(|r| {
            let config = EngineConfig {
                max_batch: 1,
                capacity: 128,
                prefill_chunk: 256,
                ..EngineConfig::default()
            };
            generate_all(&m, &tok, config, vec![r.clone()]).unwrap()[0]
                .ids
                .clone()
        })
        .collect();
    // Adapters change what is generated.
    assert_ne!(
        alone[1],
        generate_all(
            &m,
            &tok,
            EngineConfig::default(),
            vec![request(
                requests[1].prompt.clone(),
                requests[1].max_tokens,
                None
            )]
        )
        .unwrap()[0]
            .ids
    );
    // Three slots for nine sequences, prompts prefilled 8 tokens per step.
    let config = EngineConfig {
        max_batch: 3,
        capacity: 128,
        prefill_chunk: 8,
        ..EngineConfig::default()
    };
    let batched = generate_all(&m, &tok, config, requests.clone()).unwrap();
    for (i, (g, want)) in batched.iter().zip(&alone).enumerate() {
        assert_eq!(&g.ids, want, "sequence {i}");
        assert_eq!(g.ids.len(), requests[i].max_tokens);
        assert_eq!(g.finish_reason.as_str(), "length");
    }
}

#[test]
fn cancelled_and_abandoned_sequences_free_their_slots() {
    let (m, tok) = (model(), tokenizer());
    let config = EngineConfig {
        max_batch: 2,
        capacity: 64,
        prefill_chunk: 64,
        ..EngineConfig::default()
    };
    let mut engine = Engine::new(&m, &tok, config);
    let tokens = Arc::new(Mutex::new(0usize));
    let counted = tokens.clone();
    // A client that goes away after its third token.
    engine.add(
        request(vec![5, 6, 7], 40, None),
        Box::new(move |e| {
            let mut n = counted.lock().unwrap();
            if matches!(e, Event::Token { .. }) {
                *n += 1;
            }
            *n < 3
        }),
    );
    let kept = engine.add(request(vec![8, 9], 40, None), Box::new(|_| true));
    let waiting = engine.add(request(vec![10, 11], 40, None), Box::new(|_| true));
    engine.step().unwrap();
    assert_eq!((engine.running(), engine.waiting()), (2, 1));
    for _ in 0..3 {
        engine.step().unwrap();
    }
    // The abandoned one left; the waiting one took its slot.
    assert_eq!(*tokens.lock().unwrap(), 3);
    assert_eq!((engine.running(), engine.waiting()), (2, 0));
    engine.cancel(kept);
    engine.cancel(waiting);
    assert!(!engine.has_work());
}

#[test]
fn logprobs_of_greedy_tokens() {
    let (m, tok) = (model(), tokenizer());
    let mut r = request(vec![5, 6, 7], 6, None);
    r.logprobs = Some(3);
    let (tx, rx) = std::sync::mpsc::channel();
    let mut engine = Engine::new(&m, &tok, EngineConfig::default());
    engine.add(r, Box::new(move |e| tx.send(e).is_ok()));
    engine.run_to_end().unwrap();
    let mut seen = 0;
    for e in rx.try_iter() {
        if let Event::Token {
            id,
            logprob: Some(lp),
            ..
        } = e
        {
            assert_eq!(lp.id, id);
            assert_eq!(lp.top.len(), 3);
            // Greedy: the chosen token is the most likely one.
            assert_eq!(lp.top[0].0, id);
            assert!((lp.top[0].1 - lp.logprob).abs() < 1e-6 && lp.logprob <= 0.0);
            assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1));
            seen += 1;
        }
    }
    assert_eq!(seen, 6);
}

#[test]
fn text_streams_whole_characters_and_stops_before_stop_strings() {
    let tok = tokenizer();
    let text = "héllo wörld, this is a test of streaming";
    let ids = tok.encode(text, false).unwrap();
    let stream_all = |stop: Vec<String>| {
        let mut s = TextStream::new(stop);
        let mut pieces = Vec::new();
        for n in 1..=ids.len() {
            let p = s.push(&tok, &ids[..n]).unwrap();
            assert!(!p.contains('\u{FFFD}'), "{p:?}");
            pieces.push(p);
            if s.stopped() {
                break;
            }
        }
        pieces.push(s.finish(&tok, &ids).unwrap());
        (pieces.concat(), s.text().to_string(), s.stopped())
    };
    let (streamed, full, stopped) = stream_all(vec![]);
    assert_eq!(streamed, tok.decode(&ids, true).unwrap());
    assert_eq!(full, streamed);
    assert!(!stopped);
    let want = streamed[..streamed.find("is a").unwrap()].to_string();
    let (streamed, full, stopped) = stream_all(vec!["is a".into(), "zzz".into()]);
    assert_eq!(
        (streamed.as_str(), full.as_str(), stopped),
        (want.as_str(), want.as_str(), true)
    );
}

#[test]
fn a_freed_slot_lends_its_prompt_prefix_to_the_next_request() {
    let (m, tok) = (model(), tokenizer());
    let a1 = adapter(&m, &["q_proj", "v_proj"], 1);
    let config = EngineConfig {
        max_batch: 2,
        capacity: 128,
        prefill_chunk: 8,
        ..EngineConfig::default()
    };
    let prompt: Vec<u32> = (0..30).map(|k| (k * 11 % 280 + 5) as u32).collect();
    let fresh = |r: Request| {
        generate_all(&m, &tok, config, vec![r]).unwrap()[0]
            .ids
            .clone()
    };
    let mut engine = Engine::new(&m, &tok, config);
    let run = |engine: &mut Engine, r: Request| {
        let (tx, rx) = std::sync::mpsc::channel();
        engine.add(
            r,
            Box::new(move |e| {
                if let Event::Finished(g) = e {
                    let _ = tx.send(g.ids);
                }
                true
            }),
        );
        engine.run_to_end().unwrap();
        rx.recv().unwrap()
    };
    let first = run(&mut engine, request(prompt.clone(), 10, None));
    assert_eq!(engine.reused_prompt_tokens(), 0);
    // The same prompt again: all but its last token come from the cache.
    assert_eq!(run(&mut engine, request(prompt.clone(), 10, None)), first);
    assert_eq!(engine.reused_prompt_tokens(), 29);
    // A longer prompt sharing 20 tokens, and the same prompt under an
    // adapter (whose keys differ: nothing reused); each equals a fresh run.
    let mut longer = prompt[..20].to_vec();
    longer.extend([7, 8, 9, 10, 11]);
    assert_eq!(
        run(&mut engine, request(longer.clone(), 10, None)),
        fresh(request(longer, 10, None))
    );
    assert_eq!(engine.reused_prompt_tokens(), 29 + 20);
    let with_adapter = run(&mut engine, request(prompt.clone(), 10, Some(a1.clone())));
    assert_eq!(with_adapter, fresh(request(prompt, 10, Some(a1))));
    assert_eq!(engine.reused_prompt_tokens(), 29 + 20);
}

/// Requests sharing a prompt that arrive together (the completions of one
/// prompt sampled for RL, several users with one long system prompt): the
/// prompt is prefilled once, in chunks, and copied into the other slots;
/// each sampled sequence equals its own run alone, and a prompt sharing
/// less than half waits for nobody.
#[test]
fn requests_arriving_together_prefill_a_shared_prompt_once() {
    let (m, tok) = (model(), tokenizer());
    let a1 = adapter(&m, &["q_proj", "v_proj"], 1);
    let config = EngineConfig {
        max_batch: 6,
        capacity: 128,
        prefill_chunk: 8,
        ..EngineConfig::default()
    };
    let prompt: Vec<u32> = (0..30).map(|k| (k * 11 % 280 + 5) as u32).collect();
    let other: Vec<u32> = (0..12).map(|k| (k * 5 % 250 + 9) as u32).collect();
    let sampled = |seed: u64, prompt: &[u32], adapter: Option<Arc<dyn Adapter>>| Request {
        sampling: SamplingParams {
            temperature: 1.0,
            seed,
            ..SamplingParams::default()
        },
        ..request(prompt.to_vec(), 6, adapter)
    };
    let requests = vec![
        sampled(1, &prompt, Some(a1.clone())),
        sampled(2, &prompt, Some(a1.clone())),
        sampled(3, &prompt, Some(a1.clone())),
        sampled(4, &other, None),
        sampled(5, &prompt, None),
        sampled(6, &prompt, Some(a1.clone())),
    ];
    let alone: Vec<Vec<u32>> = requests
        .iter()
        .map(|r| {
            generate_all(&m, &tok, config, vec![r.clone()]).unwrap()[0]
                .ids
                .clone()
        })
        .collect();
    assert_ne!(alone[0], alone[1], "different seeds sample differently");
    let mut engine = Engine::new(&m, &tok, config);
    let got = Arc::new(Mutex::new(vec![Vec::new(); requests.len()]));
    for (i, r) in requests.into_iter().enumerate() {
        let got = got.clone();
        engine.add(
            r,
            Box::new(move |e| {
                if let Event::Finished(g) = e {
                    got.lock().unwrap()[i] = g.ids;
                }
                true
            }),
        );
    }
    engine.run_to_end().unwrap();
    assert_eq!(*got.lock().unwrap(), alone);
    // Three copies of 29 positions under the adapter; the base-model
    // request of the same prompt and the other prompt computed their own.
    assert_eq!(engine.reused_prompt_tokens(), 3 * 29);
}
