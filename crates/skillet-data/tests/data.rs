//! Data validation (every problem, with line and code) and loss masks for
//! every format, as snapshots of the dry-run rendering (`[[trained]]`).
//! Tokenizer and template: fixtures/tiny-hf/llama (made by transformers).

use std::path::{Path, PathBuf};

use skillet_data::{
    DataError, DataFormat, EncodeOptions, Encoder, IssueCode, mark_trained, pack, read_jsonl,
};
use skillet_tokenizer::{ChatTemplate, Tokenizer};

fn write(dir: &Path, name: &str, lines: &[&str]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

fn issues(path: &Path, format: DataFormat) -> Vec<(usize, &'static str, String)> {
    match read_jsonl(path, format) {
        Err(DataError::Invalid(list)) => list
            .into_iter()
            .map(|i| (i.line, i.code.as_str(), i.message))
            .collect(),
        other => panic!("expected invalid data, got {other:?}"),
    }
}

#[test]
fn every_bad_line_is_reported_with_line_and_code() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "bad.jsonl",
        &[
            r#"{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"hello"}]}"#,
            r#"{"messages":[{"role":"user","content":"hi"},"#,
            r#"["not", "an", "object"]"#,
            r#"{"prompt":"no messages here"}"#,
            r#"{"messages":[{"content":"who am i"},{"role":"assistant","content":"x"}]}"#,
            r#"{"messages":[{"role":"user","content":"hi","extra":1},{"role":"assistant","content":"x"}]}"#,
            r#"{"messages":[{"role":"wizard","content":"hi"},{"role":"assistant","content":"x"}]}"#,
            r#"{"messages":[{"role":"user","content":""},{"role":"assistant","content":"x"}]}"#,
            r#"{"messages":[{"role":"user","content":"only a question"}]}"#,
            "",
            r#"{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"x","weight":2}]}"#,
        ],
    );
    let got = issues(&p, DataFormat::Auto);
    let codes: Vec<(usize, &str)> = got.iter().map(|(l, c, _)| (*l, *c)).collect();
    assert_eq!(
        codes,
        vec![
            (2, "invalid_json"),
            (3, "data_type"),
            (4, "missing_messages_list"),
            (5, "message_missing_key"),
            (6, "message_unrecognized_key"),
            (7, "unrecognized_role"),
            (8, "missing_content"),
            (9, "example_missing_assistant_message"),
            (11, "invalid_weight"),
        ]
    );
    assert_eq!(got[1].2, "Line 3 is not a dictionary");
    assert!(got[4].2.contains("'extra'"), "{}", got[4].2);
    assert!(got[5].2.contains("\"wizard\""), "{}", got[5].2);
    // The error text names file, line and code for each problem.
    let text = read_jsonl(&p, DataFormat::Auto).unwrap_err().to_string();
    assert!(text.starts_with("9 problem(s)"), "{text}");
    assert!(
        text.contains(&format!("{}:7: [unrecognized_role]", p.display())),
        "{text}"
    );
}

#[test]
fn other_formats_and_empty_files() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "empty.jsonl", &["", "  "]);
    assert_eq!(
        issues(&p, DataFormat::Auto),
        vec![(0, "empty_file", "the file has no examples".to_string())]
    );
    let p = write(
        dir.path(),
        "alpaca.jsonl",
        &[
            r#"{"instruction":"do","output":"done"}"#,
            r#"{"instruction":"do"}"#,
            r#"{"instruction":3,"output":"x"}"#,
        ],
    );
    let got = issues(&p, DataFormat::Auto);
    assert_eq!(
        got.iter().map(|(l, c, _)| (*l, *c)).collect::<Vec<_>>(),
        vec![(2, "missing_field"), (3, "missing_field")]
    );
    let p = write(
        dir.path(),
        "sgpt.jsonl",
        &[r#"{"conversations":[{"from":"human","value":"q"},{"from":"bot","value":"a"}]}"#],
    );
    assert_eq!(issues(&p, DataFormat::Auto)[0].1, "unrecognized_role");
    let p = write(
        dir.path(),
        "unknown.jsonl",
        &[r#"{"question":"q","answer":"a"}"#],
    );
    assert_eq!(issues(&p, DataFormat::Auto)[0].1, "missing_field");
    let p = write(
        dir.path(),
        "text.jsonl",
        &[r#"{"text":"fine"}"#, r#"{"txt":"typo"}"#],
    );
    assert_eq!(
        issues(&p, DataFormat::Auto),
        vec![(2, "missing_field", "missing 'text'".to_string())]
    );
}

fn tiny() -> (Tokenizer, ChatTemplate) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny-hf/llama");
    let tok = Tokenizer::from_hf_dir(&dir).unwrap();
    let tmpl = ChatTemplate::from_hf_dir(&dir, tok.specials())
        .unwrap()
        .unwrap();
    (tok, tmpl)
}

fn dry_run(lines: &[&str], options: EncodeOptions) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "d.jsonl", lines);
    let (_, examples) = read_jsonl(&p, DataFormat::Auto).unwrap();
    let (tok, tmpl) = tiny();
    let enc = Encoder::new(&tok, Some(&tmpl), options);
    enc.encode_all(&p, &examples)
        .unwrap()
        .iter()
        .map(|t| mark_trained(&tok, &t.ids, &t.trainable).unwrap())
        .collect()
}

const OPTS: EncodeOptions = EncodeOptions {
    max_seq_len: 512,
    train_on_prompt: false,
    add_eos: true,
};

#[test]
fn masks_cover_exactly_the_assistant_turns_and_their_end_of_turn() {
    let got = dry_run(
        &[
            r#"{"messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi"},{"role":"assistant","content":"hello"},{"role":"user","content":"again"},{"role":"assistant","content":"bye","weight":1}]}"#,
            r#"{"messages":[{"role":"user","content":"a"},{"role":"assistant","content":"skip me","weight":0},{"role":"user","content":"b"},{"role":"assistant","content":"learn me"}]}"#,
        ],
        OPTS,
    );
    let sharegpt = dry_run(
        &[r#"{"conversations":[{"from":"human","value":"q"},{"from":"gpt","value":"a"}]}"#],
        OPTS,
    );
    assert_eq!(
        got,
        vec![
            "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n[[hello<|im_end|>]]\n<|im_start|>user\nagain<|im_end|>\n<|im_start|>assistant\n[[bye<|im_end|>]]\n",
            "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nskip me<|im_end|>\n<|im_start|>user\nb<|im_end|>\n<|im_start|>assistant\n[[learn me<|im_end|>]]\n",
        ]
    );
    assert_eq!(
        sharegpt,
        vec!["<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n[[a<|im_end|>]]\n"]
    );
}

#[test]
fn masks_for_alpaca_completion_and_text() {
    let got = dry_run(
        &[
            r#"{"instruction":"Add","input":"2 and 3","output":"5"}"#,
            r#"{"instruction":"Say hi","output":"hi"}"#,
        ],
        OPTS,
    );
    assert_eq!(
        got,
        vec![
            "<|im_start|>user\nAdd\n\n2 and 3<|im_end|>\n<|im_start|>assistant\n[[5<|im_end|>]]\n",
            "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n[[hi<|im_end|>]]\n",
        ]
    );
    let got = dry_run(&[r#"{"prompt":"The sky is","completion":" blue"}"#], OPTS);
    assert_eq!(got, vec!["The sky is[[ blue<|im_end|>]]"]);
    let got = dry_run(&[r#"{"text":"just text"}"#], OPTS);
    assert_eq!(got, vec!["[[just text<|im_end|>]]"]);
    let got = dry_run(
        &[r#"{"text":"just text"}"#],
        EncodeOptions {
            add_eos: false,
            ..OPTS
        },
    );
    assert_eq!(got, vec!["[[just text]]"]);
    let got = dry_run(
        &[r#"{"prompt":"The sky is","completion":" blue"}"#],
        EncodeOptions {
            train_on_prompt: true,
            ..OPTS
        },
    );
    assert_eq!(got, vec!["[[The sky is blue<|im_end|>]]"]);
}

#[test]
fn eos_stays_trained_when_pad_is_eos_and_there_is_no_double_bos() {
    let (tok, tmpl) = tiny();
    // The fixture's pad token is <|im_end|>, the same as EOS.
    assert_eq!(tok.specials().pad, tok.specials().eos);
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "d.jsonl",
        &[r#"{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"yo"}]}"#],
    );
    let (_, ex) = read_jsonl(&p, DataFormat::Auto).unwrap();
    let t = &Encoder::new(&tok, Some(&tmpl), OPTS)
        .encode_all(&p, &ex)
        .unwrap()[0];
    let eos = tok.specials().eos.as_ref().unwrap().id;
    let last_trained = t
        .ids
        .iter()
        .zip(&t.trainable)
        .filter(|(_, tr)| **tr)
        .map(|(id, _)| *id)
        .next_back();
    assert_eq!(last_trained, Some(eos));
    let bos = tok.specials().bos.as_ref().unwrap().id;
    assert!(t.ids.windows(2).all(|w| !(w[0] == bos && w[1] == bos)));
}

#[test]
fn truncation_keeps_the_first_tokens_and_reports_empty_examples() {
    let (tok, tmpl) = tiny();
    let dir = tempfile::tempdir().unwrap();
    let long = "word ".repeat(40);
    let line = format!(
        r#"{{"messages":[{{"role":"user","content":"{long}"}},{{"role":"assistant","content":"ok"}}]}}"#
    );
    let p = write(
        dir.path(),
        "d.jsonl",
        &[
            &line,
            r#"{"messages":[{"role":"user","content":"q"},{"role":"assistant","content":"a"}]}"#,
        ],
    );
    let (_, ex) = read_jsonl(&p, DataFormat::Auto).unwrap();
    // Room for the short conversation, not for the long one's answer.
    let short = Encoder::new(&tok, Some(&tmpl), OPTS)
        .encode(ex[1].0, &ex[1].1)
        .unwrap()
        .ids
        .len();
    let full = Encoder::new(&tok, Some(&tmpl), OPTS)
        .encode(ex[0].0, &ex[0].1)
        .unwrap();
    let enc = Encoder::new(
        &tok,
        Some(&tmpl),
        EncodeOptions {
            max_seq_len: short,
            ..OPTS
        },
    );
    let t = enc.encode(ex[0].0, &ex[0].1).unwrap();
    assert_eq!(t.ids.len(), short);
    assert!(t.truncated() && t.full_len == full.ids.len());
    assert_eq!(t.ids[..], full.ids[..short]);
    match enc.encode_all(&p, &ex) {
        Err(DataError::Invalid(list)) => {
            assert_eq!(list.len(), 1);
            assert_eq!(
                (list[0].line, list[0].code),
                (1, IssueCode::NoTrainableTokens)
            );
            assert!(
                list[0]
                    .message
                    .contains(&format!("truncation to {short} tokens")),
                "{}",
                list[0].message
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn packing_restarts_positions_per_example() {
    let (tok, tmpl) = tiny();
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "d.jsonl",
        &[
            r#"{"text":"one two"}"#,
            r#"{"text":"three"}"#,
            r#"{"text":"four"}"#,
        ],
    );
    let (_, ex) = read_jsonl(&p, DataFormat::Auto).unwrap();
    let enc = Encoder::new(&tok, Some(&tmpl), OPTS);
    let all = enc.encode_all(&p, &ex).unwrap();
    let lens: Vec<usize> = all.iter().map(|t| t.ids.len()).collect();
    let max = lens[0] + lens[1];
    assert!(
        lens[2] <= max && lens[0] + lens[1] + lens[2] > max,
        "{lens:?}"
    );
    let packed = pack(&all.iter().collect::<Vec<_>>(), max);
    assert_eq!(packed.len(), 2);
    assert_eq!(
        packed[0].ids,
        [all[0].ids.clone(), all[1].ids.clone()].concat()
    );
    assert_eq!(
        packed[0].segments,
        [vec![0; lens[0]], vec![1; lens[1]]].concat()
    );
    assert_eq!(
        packed[0].positions,
        [
            (0..lens[0] as u32).collect::<Vec<_>>(),
            (0..lens[1] as u32).collect()
        ]
        .concat()
    );
    assert_eq!(packed[1].segments, vec![0; lens[2]]);
}
