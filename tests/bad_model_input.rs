//! Bad model files give one-line errors naming the file and the problem.

use std::path::PathBuf;

use kvserve::model::source;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kvserve-bad-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn err_of(spec: &str) -> String {
    match source::load(spec) {
        Ok(_) => panic!("{spec} loaded"),
        Err(e) => e.to_string(),
    }
}

fn real_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct")
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

#[test]
fn not_a_gguf_is_refused() {
    let d = tmp("gguf");
    let f = d.join("model.gguf");
    std::fs::write(&f, b"GGUF but not really").unwrap();
    let e = err_of(f.to_str().unwrap());
    assert!(e.contains("model.gguf") && e.contains("cannot load GGUF"), "{e}");
}
