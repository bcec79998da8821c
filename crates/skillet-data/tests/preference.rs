//! Preference pairs: the three shapes detected and validated line by line,
//! the prompt rendered once and shared by both sides, each completion the
//! span SFT would train, truncation from the end with empty sides reported,
//! and a line that is not UTF-8 reported with its number in every format.
//! Tokenizer and template: fixtures/tiny-hf/llama (made by transformers).

use std::path::{Path, PathBuf};

use skillet_data::{
    DataError, DataFormat, EncodeOptions, Encoder, PairFormat, PairPrompt, read_jsonl, read_pairs,
};
use skillet_tokenizer::{ChatTemplate, Tokenizer};

fn write(dir: &Path, name: &str, lines: &[&[u8]]) -> PathBuf {
    let p = dir.join(name);
    let mut bytes = lines.join(&b'\n');
    bytes.push(b'\n');
    std::fs::write(&p, bytes).unwrap();
    p
}

fn issues(err: DataError) -> Vec<(usize, &'static str, String)> {
    match err {
        DataError::Invalid(list) => list
            .into_iter()
            .map(|i| (i.line, i.code.as_str(), i.message))
            .collect(),
        other => panic!("expected invalid data, got {other:?}"),
    }
}

fn tiny() -> (Tokenizer, ChatTemplate) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny-hf/llama");
    let tok = Tokenizer::from_hf_dir(&dir).unwrap();
    let tmpl = ChatTemplate::from_hf_dir(&dir, tok.specials())
        .unwrap()
        .unwrap();
    (tok, tmpl)
}

const OPTS: EncodeOptions = EncodeOptions {
    max_seq_len: 512,
    train_on_prompt: false,
    add_eos: true,
};

const CONVERSATIONAL: &str = r#"{"prompt":[{"role":"system","content":"be brief"},{"role":"user","content":"sky?"}],"chosen":[{"role":"assistant","content":"Blue."}],"rejected":[{"role":"assistant","content":"Green, I think."}]}"#;
const OPENAI: &str = r#"{"input":{"messages":[{"role":"system","content":"be brief"},{"role":"user","content":"sky?"}]},"preferred_output":[{"role":"assistant","content":"Blue."}],"non_preferred_output":[{"role":"assistant","content":"Green, I think."}]}"#;

#[test]
fn three_shapes_are_detected_and_the_chat_ones_agree() {
    let dir = tempfile::tempdir().unwrap();
    let standard = write(
        dir.path(),
        "s.jsonl",
        &[br#"{"prompt":"The sky is","chosen":" blue.","rejected":" green.","margin":1.5}"#],
    );
    let (f, pairs) = read_pairs(&standard, PairFormat::Auto).unwrap();
    assert_eq!(f, PairFormat::Standard);
    assert_eq!(pairs[0].1.prompt, PairPrompt::Text("The sky is".into()));
    assert_eq!(pairs[0].1.margin, Some(1.5));
    let conv = write(dir.path(), "c.jsonl", &[CONVERSATIONAL.as_bytes()]);
    let openai = write(dir.path(), "o.jsonl", &[OPENAI.as_bytes()]);
    let (fc, c) = read_pairs(&conv, PairFormat::Auto).unwrap();
    let (fo, o) = read_pairs(&openai, PairFormat::Auto).unwrap();
    assert_eq!((fc, fo), (PairFormat::Conversational, PairFormat::OpenAi));
    assert_eq!(c[0].1, o[0].1, "TRL's and OpenAI's shapes read alike");
    assert_eq!(c[0].1.chosen, "Blue.");
}

#[test]
fn every_bad_pair_is_reported_with_line_and_code() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "bad.jsonl",
        &[
            CONVERSATIONAL.as_bytes(),
            br#"{"prompt":[{"role":"user","content":"q"}],"chosen":[{"role":"assistant","content":"a"}]}"#,
            br#"{"prompt":[{"role":"user","content":"q"},{"role":"assistant","content":"a"}],"chosen":[{"role":"assistant","content":"a"}],"rejected":[{"role":"assistant","content":"b"}]}"#,
            br#"{"prompt":[{"role":"user","content":"q"}],"chosen":[{"role":"user","content":"a"}],"rejected":"b"}"#,
            br#"{"prompt":[{"role":"user","content":"q"}],"chosen":[{"role":"assistant","content":"a"}],"rejected":[{"role":"assistant","content":"b"}],"margin":"big"}"#,
            b"{\"prompt\":[{\"role\":\"user\",\"content\":\"caf\xe9\"}]}",
            br#"{"prompt":[{"role":"user","content":"q"}],"chosen":[{"role":"assistant","content":""}],"rejected":[{"role":"assistant","content":"b"}]}"#,
        ],
    );
    let got = issues(read_pairs(&p, PairFormat::Auto).unwrap_err());
    let codes: Vec<(usize, &str)> = got.iter().map(|(l, c, _)| (*l, *c)).collect();
    assert_eq!(
        codes,
        vec![
            (2, "missing_field"),
            (3, "invalid_prompt"),
            (4, "invalid_completion"),
            (4, "invalid_completion"),
            (5, "invalid_margin"),
            (6, "invalid_utf8"),
            (7, "missing_content"),
        ],
        "{got:#?}"
    );
    assert!(got[0].2.contains("'rejected'"), "{}", got[0].2);
    assert!(got[5].2.contains("column 41"), "{}", got[5].2);
}

#[test]
fn a_line_that_is_not_utf8_is_one_problem_in_every_format() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "sft.jsonl",
        &[
            br#"{"text":"fine"}"#,
            b"{\"text\":\"\xff\xfe\"}",
            br#"{"text":"also fine"}"#,
        ],
    );
    let got = issues(read_jsonl(&p, DataFormat::Auto).unwrap_err());
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].0, got[0].1), (2, "invalid_utf8"));
}

#[test]
fn both_sides_share_the_prompt_and_train_the_sft_span() {
    let (tok, tmpl) = tiny();
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "c.jsonl", &[CONVERSATIONAL.as_bytes()]);
    let (_, pairs) = read_pairs(&p, PairFormat::Auto).unwrap();
    let enc = Encoder::new(&tok, Some(&tmpl), OPTS);
    let t = &enc.encode_pairs(&p, &pairs).unwrap()[0];
    let text = |ids: &[u32]| tok.decode(ids, false).unwrap();
    assert_eq!(
        text(&t.prompt),
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nsky?<|im_end|>\n<|im_start|>assistant\n"
    );
    // The span SFT trains on the same conversation: the answer and its
    // end-of-turn token, not the template's newline after it.
    assert_eq!(text(&t.chosen), "Blue.<|im_end|>");
    assert_eq!(text(&t.rejected), "Green, I think.<|im_end|>");
    let sft = write(
        dir.path(),
        "sft.jsonl",
        &[br#"{"messages":[{"role":"system","content":"be brief"},{"role":"user","content":"sky?"},{"role":"assistant","content":"Blue."}]}"#],
    );
    let (_, ex) = read_jsonl(&sft, DataFormat::Auto).unwrap();
    let s = enc.encode(1, &ex[0].1).unwrap();
    let side = t.side(true);
    let trained = |ids: &[u32], flags: &[bool]| -> Vec<u32> {
        ids.iter()
            .zip(flags)
            .filter(|f| *f.1)
            .map(|f| *f.0)
            .collect()
    };
    assert_eq!(
        trained(&side.ids, &side.trainable),
        trained(&s.ids, &s.trainable)
    );
    assert_eq!(&side.ids[..t.prompt.len()], &s.ids[..t.prompt.len()]);
    // No second BOS: the encoder adds none to what the template wrote.
    let bos = tok.specials().bos.as_ref().map(|b| b.id);
    assert!(!(Some(side.ids[0]) == bos && Some(side.ids[1]) == bos));
    // Plain text: no template, EOS after each completion.
    let std_p = write(
        dir.path(),
        "s.jsonl",
        &[br#"{"prompt":"The sky is","chosen":" blue.","rejected":" green."}"#],
    );
    let (_, sp) = read_pairs(&std_p, PairFormat::Auto).unwrap();
    let st = &enc.encode_pairs(&std_p, &sp).unwrap()[0];
    assert_eq!(text(&st.prompt), "The sky is");
    let eos = tok.specials().eos.as_ref().unwrap().id;
    assert_eq!(st.chosen.last(), Some(&eos));
    assert_eq!(text(&st.chosen[..st.chosen.len() - 1]), " blue.");
}

#[test]
fn truncation_keeps_the_start_and_reports_pairs_cut_away() {
    let (tok, tmpl) = tiny();
    let dir = tempfile::tempdir().unwrap();
    let long = format!(
        r#"{{"prompt":"{}","chosen":" yes","rejected":" no"}}"#,
        "word ".repeat(60)
    );
    let p = write(
        dir.path(),
        "s.jsonl",
        &[
            br#"{"prompt":"q","chosen":" a long answer that goes on","rejected":" no"}"#,
            long.as_bytes(),
        ],
    );
    let (_, pairs) = read_pairs(&p, PairFormat::Auto).unwrap();
    let opts = EncodeOptions {
        max_seq_len: 6,
        ..OPTS
    };
    let enc = Encoder::new(&tok, Some(&tmpl), opts);
    let got = issues(enc.encode_pairs(&p, &pairs).unwrap_err());
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!((got[0].0, got[0].1), (2, "no_trainable_tokens"));
    assert!(got[0].2.contains("cut away"), "{}", got[0].2);
    let (first, full) = enc.encode_pair(1, &pairs[0].1).unwrap();
    let q = tok.encode("q", false).unwrap();
    assert_eq!(first.prompt, q, "the prompt's start is kept");
    assert_eq!(first.prompt.len() + first.chosen.len(), 6);
    assert_eq!(
        first.chosen,
        tok.encode(" a long answer that goes on", false).unwrap()[..6 - q.len()],
        "the completion's start is kept"
    );
    assert!(first.truncated && full.1 > first.chosen.len());
    // max_prompt_len cuts the prompt first, leaving room for the answers.
    let enc = Encoder::new(&tok, Some(&tmpl), opts).with_max_prompt_len(Some(2));
    let (second, _) = enc.encode_pair(2, &pairs[1].1).unwrap();
    assert_eq!(second.prompt.len(), 2);
    assert!(!second.chosen.is_empty() && !second.rejected.is_empty());
}

#[test]
fn alpaca_input_is_not_mistaken_for_openai_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let alpaca = write(
        dir.path(),
        "a.jsonl",
        &[br#"{"instruction":"add","input":"2 and 2","output":"4"}"#],
    );
    assert!(!skillet_data::looks_like_pairs(&alpaca));
    let openai = write(dir.path(), "o.jsonl", &[OPENAI.as_bytes()]);
    assert!(skillet_data::looks_like_pairs(&openai));
}
