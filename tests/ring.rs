//! `kvserve ring` over MLX's ring backend on 127.0.0.1: three ranks join and
//! check an all_sum; a rank whose neighbours never come gives up within its
//! timeout with an error naming them; a malformed hostfile, or a rank it
//! does not list, is named. (The ranks share this machine's 2 cores.)

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn kvserve() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kvserve"));
    c.env_remove("MLX_RANK").env_remove("MLX_HOSTFILE").env("RUST_BACKTRACE", "0");
    c
}

/// This file's tests take the ring port slots 0 to 4.
fn hostfile(name: &str, ranks: usize) -> PathBuf {
    let slot = ["three", "alone", "ranks", "pipe2", "pipe3"].iter().position(|n| *n == name).expect("a known test");
    common::ring_hostfile(name, slot, ranks)
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn three_ranks_join_and_sum() {
    let h = hostfile("three", 3);
    let children: Vec<_> = (0..3)
        .map(|r| {
            let mut c = kvserve();
            c.args(["ring", "--hostfile", h.to_str().unwrap(), "--timeout", "60", "--bytes", "65536"]);
            // Rank 2 through MLX_RANK, as mlx.launch sets it; the others by flag.
            if r == 2 {
                c.env("MLX_RANK", "2");
            } else {
                c.args(["--rank", &r.to_string()]);
            }
            c.output_as_child()
        })
        .collect();
    for (r, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        let t = text(&out);
        assert!(out.status.success(), "rank {r}: {t}");
        let json: serde_json::Value = serde_json::from_str(t.lines().find(|l| l.starts_with('{')).unwrap()).unwrap();
        assert_eq!((json["rank"].as_u64(), json["size"].as_u64(), json["sum"].as_f64()), (Some(r as u64), Some(3), Some(6.0)), "{t}");
        assert!(json["latency_s"].as_f64().unwrap() > 0.0 && json["all_sum_bytes_per_s"].as_f64().unwrap() > 0.0, "{t}");
        eprintln!("{}", t.lines().next().unwrap_or(""));
    }
    let _ = std::fs::remove_file(h);
}

trait Spawn {
    fn output_as_child(&mut self) -> std::process::Child;
}

impl Spawn for Command {
    fn output_as_child(&mut self) -> std::process::Child {
        self.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap()
    }
}

#[test]
fn a_rank_alone_gives_up_within_its_timeout() {
    let h = hostfile("alone", 2);
    let t0 = Instant::now();
    let out = kvserve().args(["ring", "--hostfile", h.to_str().unwrap(), "--rank", "0", "--timeout", "3"]).output().unwrap();
    let took = t0.elapsed();
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(t.contains("rank 0 of 2 could not join the ring within 3 s") && t.contains("127.0.0.1:"), "{t}");
    assert!(took < Duration::from_secs(20), "took {took:?}");
    let _ = std::fs::remove_file(h);
}

#[test]
fn bad_hostfiles_and_ranks_are_named() {
    let bad = std::env::temp_dir().join(format!("kvserve-ring-bad-{}.json", std::process::id()));
    std::fs::write(&bad, r#"[["127.0.0.1:5000"], ["127.0.0.1"]]"#).unwrap();
    let out = kvserve().args(["ring", "--hostfile", bad.to_str().unwrap(), "--rank", "0"]).output().unwrap();
    assert!(!out.status.success() && text(&out).contains("rank 1, address 0: '127.0.0.1' has no port"), "{}", text(&out));
    let h = hostfile("ranks", 2);
    let out = kvserve().args(["ring", "--hostfile", h.to_str().unwrap(), "--rank", "5"]).output().unwrap();
    assert!(!out.status.success() && text(&out).contains("rank 5 is not in"), "{}", text(&out));
    let out = kvserve().args(["ring", "--hostfile", h.to_str().unwrap()]).output().unwrap();
    assert!(!out.status.success() && text(&out).contains("give --rank N or set MLX_RANK"), "{}", text(&out));
    let _ = std::fs::remove_file(bad);
    let _ = std::fs::remove_file(h);
}

/// `kvserve generate --hostfile`: SmolLM2 split by layers over 2 and over 3
/// ranks (pipeline parallelism, each rank loading only its layers) gives
/// the greedy answer one process gives.
#[test]
fn pipeline_generation_equals_one_process() {
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct");
    assert!(model.join("config.json").exists(), "run `make model` first");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = ["generate", "--model", model.to_str().unwrap(), "--prompt", "Write three sentences about rivers.", "--max-tokens", "40"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let one = kvserve().args(args(&[])).output().unwrap();
    assert!(one.status.success(), "{}", text(&one));
    let want = String::from_utf8_lossy(&one.stdout).trim().to_string();
    assert!(want.split_whitespace().count() > 10, "a long enough answer to compare: {want:?}");
    for (name, ranks) in [("pipe2", 2), ("pipe3", 3)] {
        let h = hostfile(name, ranks);
        let children: Vec<_> = (0..ranks).map(|r| kvserve().args(args(&["--hostfile", h.to_str().unwrap(), "--rank", &r.to_string()])).output_as_child()).collect();
        let outs: Vec<Output> = children.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
        for (r, o) in outs.iter().enumerate() {
            assert!(o.status.success(), "{ranks} ranks, rank {r}: {}", text(o));
            eprintln!("{}", String::from_utf8_lossy(&o.stderr).lines().filter(|l| l.starts_with("rank")).collect::<Vec<_>>().join(" | "));
        }
        assert_eq!(String::from_utf8_lossy(&outs[0].stdout).trim(), want, "{ranks} ranks answer as one process does");
        let _ = std::fs::remove_file(h);
    }
}
