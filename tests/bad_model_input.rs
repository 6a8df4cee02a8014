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
    for (ty, name) in [(12, "Q4_K"), (14, "Q6_K"), (23, "IQ4_XS")] {
        let f = d.join(format!("{name}.gguf"));
        std::fs::write(&f, gguf_with_tensor_type(ty)).unwrap();
        let e = err_of(f.to_str().unwrap());
        assert!(
            e.contains(&format!("{name}.gguf")) && e.contains(&format!("'blk.0.ffn_down.weight' has type {name}")),
            "{e}"
        );
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
