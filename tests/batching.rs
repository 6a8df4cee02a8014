//! The step scheduler with a real model (SmolLM2, `make model`), through the
//! engine itself: requests computed at once give exactly the answers each
//! gives alone (B = 2, 4 and 8, prompts of different lengths, cache hits
//! mixed in); a client that leaves is out of the batch within a step; and
//! cancelling one request does not disturb the others.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use kvserve::engine::generate::GenerateOptions;
use kvserve::engine::request::{ChatMessage, ChatRequest};
use kvserve::engine::types::{Event, FinishReason, Job, PromptUsage};
use kvserve::engine::worker::{Engine, EngineConfig};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

fn engine(parallel: usize) -> Engine {
    engine_with(parallel, None)
}

fn engine_with(parallel: usize, kv_bits: Option<u8>) -> Engine {
    engine_queue(parallel, 64, kv_bits)
}

fn engine_queue(parallel: usize, queue: usize, kv_bits: Option<u8>) -> Engine {
    Engine::start(EngineConfig {
        model: common::smollm2_dir().to_string_lossy().into_owned(),
        cache_bytes: 1 << 30,
        cache_dir: None,
        cache_disk: Default::default(),
        queue,
        prefill_chunk: 512,
        parallel,
        kv_bits,
        context_override: None,
        pipeline: None,
    })
    .expect("the engine starts (run `make model` first)")
}

/// The prompt's token ids, through the model's chat template.
fn prompt(e: &Engine, text: &str) -> Vec<u32> {
    let req = ChatRequest {
        messages: vec![ChatMessage { role: "user".into(), content: text.into(), ..Default::default() }],
        max_tokens: 64,
        ..Default::default()
    };
    req.prompt(&e.info).unwrap().ids
}

/// Greedy; with `stop_at_eos` false, runs to `max_tokens` whatever it writes.
fn submit(e: &Engine, ids: &[u32], max_tokens: usize, stop_at_eos: bool) -> UnboundedReceiver<Event> {
    let (tx, rx) = unbounded_channel();
    let eos_ids = if stop_at_eos { e.info.eos_ids.clone() } else { vec![] };
    let opts = GenerateOptions { max_tokens, eos_ids, ..Default::default() };
    e.submit(Job { prompt: ids.to_vec(), opts, events: tx, cache_points: vec![] }).unwrap();
    rx
}

#[derive(Debug, Clone, PartialEq)]
struct Answer {
    text: String,
    tokens: usize,
    finish: FinishReason,
}

fn collect(rx: &mut UnboundedReceiver<Event>) -> (Answer, PromptUsage) {
    let mut text = String::new();
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            Event::Started(_) => {}
            Event::Text(t) => text += &t,
            Event::Done(d) => return (Answer { text, tokens: d.generated_tokens, finish: d.finish }, d.usage),
            Event::Error(e) => panic!("the engine failed: {e}"),
        }
    }
    panic!("the engine closed the channel without Done")
}

fn questions() -> Vec<String> {
    let story = "The lighthouse keeper climbed the stairs every evening and lit the lamp. ".repeat(12);
    let notes = "Notes: tides, gulls, fog, ships, lanterns, rope, salt. ".repeat(4);
    vec![
        "What is 2+2?".into(),
        format!("{story}\nWhat did the keeper do every evening?"),
        "Name three colours.".into(),
        format!("{notes}\nWhich of these is a bird?"),
        format!("{story}\nWrite a title for this story."),
        "Why is the sea salty? Answer briefly.".into(),
        format!("{notes}\nList two of them."),
        format!("{story}\nWhere did the keeper climb?"),
    ]
}

#[test]
fn requests_computed_together_answer_exactly_as_alone() {
    let e = engine(8);
    let prompts: Vec<Vec<u32>> = questions().iter().map(|q| prompt(&e, q)).collect();
    let lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
    assert!(lens.iter().any(|&n| n < 40) && lens.iter().any(|&n| n > 150), "prompts of different lengths: {lens:?}");
    // Alone, each on an empty cache: the reference. Counting steps shows
    // below that the batched runs shared their steps.
    let mut solo = vec![];
    let steps0 = e.load.steps.load(Ordering::SeqCst);
    for p in &prompts {
        let cleared = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(e.clear_cache());
        cleared.unwrap();
        solo.push(collect(&mut submit(&e, p, 24, true)).0);
    }
    let solo_steps = e.load.steps.load(Ordering::SeqCst) - steps0;
    assert!(solo.iter().all(|a| !a.text.is_empty()), "{solo:?}");
    // Together, B at a time, on the cache the earlier requests left (the
    // story and the notes are cached after their first use).
    let mut read = 0;
    for b in [2usize, 4, 8] {
        for group in (0..prompts.len()).collect::<Vec<_>>().chunks(b) {
            let steps0 = e.load.steps.load(Ordering::SeqCst);
            let mut rxs: Vec<_> = group.iter().map(|&i| submit(&e, &prompts[i], 24, true)).collect();
            let mut together = vec![];
            for rx in &mut rxs {
                let (a, u) = collect(rx);
                read += u.cache_read;
                together.push(a);
            }
            let steps = e.load.steps.load(Ordering::SeqCst) - steps0;
            for (&i, a) in group.iter().zip(&together) {
                assert_eq!(a, &solo[i], "B = {b}: request {i} ({} prompt tokens) computed beside others", lens[i]);
            }
            let alone: u64 = group.iter().map(|&i| solo[i].tokens as u64 + 2).sum();
            eprintln!("B = {b}, requests {group:?}: {steps} steps together (about {alone} alone)");
            assert!(steps < alone, "B = {b}: {steps} steps for requests that take about {alone} one at a time: they did not share steps");
        }
    }
    assert!(read > 0, "cache hits were mixed in");
    eprintln!("solo runs took {solo_steps} steps; cached prompt tokens read while batched: {read}");
}

/// Starts `n` long answers (no end token) and waits for each one's first text.
fn start_long(e: &Engine, prompts: &[Vec<u32>], tokens: usize) -> Vec<(UnboundedReceiver<Event>, String)> {
    let mut out: Vec<_> = prompts.iter().map(|p| (submit(e, p, tokens, false), String::new())).collect();
    for (rx, text) in &mut out {
        loop {
            match rx.blocking_recv().expect("events until Done") {
                Event::Text(t) => {
                    *text += &t;
                    break;
                }
                Event::Started(_) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    out
}

#[test]
fn a_client_that_leaves_is_out_of_the_batch_within_a_step_and_the_others_are_undisturbed() {
    let e = engine(4);
    let qs = ["Write a long story about a cat.", "Describe the ocean in detail.", "Explain how bread is made.", "Tell me about the moon."];
    let prompts: Vec<Vec<u32>> = qs.iter().map(|q| prompt(&e, q)).collect();
    const TOKENS: usize = 96;
    let solo: Vec<Answer> = prompts.iter().map(|p| collect(&mut submit(&e, p, TOKENS, false)).0).collect();
    assert!(solo.iter().all(|a| a.tokens == TOKENS && a.finish == FinishReason::Length), "{solo:?}");

    let mut running = start_long(&e, &prompts, TOKENS);
    // The count is published at the end of each step (the one that sent the
    // last first text may still be finishing).
    let t = Instant::now();
    while e.load.running.load(Ordering::SeqCst) != 4 {
        assert!(t.elapsed() < Duration::from_secs(2), "all four run at once: {} running", e.load.running.load(Ordering::SeqCst));
        std::thread::sleep(Duration::from_micros(200));
    }
    // Request 1 leaves mid-answer.
    let (gone, _) = running.remove(1);
    let steps0 = e.load.steps.load(Ordering::SeqCst);
    drop(gone);
    let t = Instant::now();
    while e.load.running.load(Ordering::SeqCst) == 4 {
        assert!(t.elapsed() < Duration::from_secs(10), "the departed request is still running");
        std::thread::sleep(Duration::from_micros(200));
    }
    let steps = e.load.steps.load(Ordering::SeqCst) - steps0;
    // The step under way when it left may still carry it; the next one does not.
    assert!(steps <= 2, "it left after {steps} steps");
    for ((mut rx, mut text), want) in running.into_iter().zip([&solo[0], &solo[2], &solo[3]]) {
        let (rest, _) = collect(&mut rx);
        text += &rest.text;
        assert_eq!((&text, rest.tokens, rest.finish), (&want.text, want.tokens, want.finish), "a request beside the one that left");
    }
}

/// `--kv-bits 8`: snapshots are kept packed and unpacked when a request
/// reads one; the next turn of a conversation reads its prefix from it and
/// answers as with f16 snapshots, and the cache holds about half the bytes.
#[test]
fn packed_snapshots_serve_the_next_turn() {
    let story = "The lighthouse keeper climbed the stairs every evening and lit the lamp. ".repeat(12);
    let turns = [format!("{story}\nWhat did the keeper do?"), format!("{story}\nWhat did the keeper do? Answer in one word.")];
    let run = |kv_bits: Option<u8>| {
        let e = engine_with(2, kv_bits);
        let answers: Vec<(Answer, PromptUsage)> = turns.iter().map(|q| collect(&mut submit(&e, &prompt(&e, q), 24, true))).collect();
        (answers, e.cache_stats())
    };
    let (f16, f16_stats) = run(None);
    let (packed, packed_stats) = run(Some(8));
    assert!(packed[1].1.cache_read > 100, "the second turn read its prefix: {:?}", packed[1].1);
    assert_eq!(packed[1].1, f16[1].1, "the same usage numbers");
    for (p, f) in packed.iter().zip(&f16) {
        assert_eq!(p.0, f.0, "the same answers from packed snapshots");
    }
    let ratio = packed_stats.bytes as f64 / f16_stats.bytes as f64;
    eprintln!("--kv-bits 8: {} bytes cached against {} with f16 ({ratio:.2})", packed_stats.bytes, f16_stats.bytes);
    assert!(ratio > 0.2 && ratio < 0.6, "{ratio}");
}

/// `--queue` counts requests waiting beyond the free places: with 4 places
/// and a queue of 1, three more requests join a running one at once, a
/// fourth waits, and only a fifth is refused.
#[test]
fn the_queue_counts_what_waits_beyond_the_free_places() {
    let e = engine_queue(4, 1, None);
    let p = prompt(&e, "Write a long story about a ship.");
    let mut first = start_long(&e, std::slice::from_ref(&p), 200);
    let t = Instant::now();
    while e.load.running.load(Ordering::SeqCst) != 1 {
        assert!(t.elapsed() < Duration::from_secs(2));
        std::thread::sleep(Duration::from_micros(200));
    }
    let (tx, _rx) = unbounded_channel();
    let job = |tx: &tokio::sync::mpsc::UnboundedSender<Event>| Job { prompt: p.clone(), opts: GenerateOptions { max_tokens: 200, ..Default::default() }, events: tx.clone(), cache_points: vec![] };
    for i in 0..4 {
        assert!(e.submit(job(&tx)).is_ok(), "request {i} beside the running one was refused");
    }
    let refused = e.submit(job(&tx));
    assert!(matches!(refused, Err(kvserve::engine::worker::SubmitError::Full(1))), "{:?}", refused.err());
    drop(first.remove(0));
}
