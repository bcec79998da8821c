//! A tokenizer.json trained and saved by Hugging Face `tokenizers`, with the
//! chat template inside tokenizer_config.json (fixtures/tiny-hf/make.py).

use std::path::Path;

use skillet_tokenizer::{ChatTemplate, Message, Tokenizer};

#[test]
fn tiny_hf_tokenizer_and_template_match_the_reference() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny-hf/llama");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let tok = Tokenizer::from_hf_dir(&dir).unwrap();
    for case in reference["tokenize"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        assert_eq!(tok.encode(text, false).unwrap(), want, "{text:?}");
    }
    let specials = tok.specials();
    assert_eq!(specials.bos.as_ref().unwrap().text, "<|im_start|>");
    assert_eq!(
        specials.eos.as_ref().unwrap().id,
        tok.token_to_id("<|im_end|>").unwrap()
    );
    assert_eq!(tok.eos_ids()[0], specials.eos.as_ref().unwrap().id);
    let template = ChatTemplate::from_hf_dir(&dir, specials)
        .unwrap()
        .expect("template in tokenizer_config.json");
    let rendered = template
        .render(&[Message::new("user", "hi")], true)
        .unwrap();
    assert_eq!(rendered, reference["chat_rendered"].as_str().unwrap());
}
