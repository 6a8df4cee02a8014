//! The config file: `$XDG_CONFIG_HOME/kvserve/config.toml` (else
//! `~/.config/kvserve/config.toml`), or the file `--config FILE` names. It
//! holds the same keys as the flags, in a section per command:
//!
//! ```toml
//! [serve]
//! model = "models/SmolLM2-135M-Instruct"
//! port = 9000
//! cache-dir = "auto"
//! alias = ["claude-sonnet-4-5", "local"]
//!
//! [claude]
//! context = 32768
//! ```
//!
//! A key becomes its flag (`cache_dir` and `cache-dir` are the same), placed
//! before the command line's own flags, which therefore override it. A key
//! that is no flag of its command, a section that is no command, or a value
//! of the wrong kind is an error naming it.

use std::path::{Path, PathBuf};

/// The commands a config file may have a section for.
pub const SECTIONS: [&str; 2] = ["serve", "claude"];

/// An XDG base folder: `$VAR` when set and not empty, else `~/HOME_DEFAULT`.
pub fn xdg_dir(var: &str, home_default: &str) -> Option<PathBuf> {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(home_default)))
}

/// `$XDG_CONFIG_HOME/kvserve/config.toml`, else `~/.config/kvserve/config.toml`.
pub fn default_path() -> Option<PathBuf> {
    xdg_dir("XDG_CONFIG_HOME", ".config").map(|d| d.join("kvserve/config.toml"))
}

/// A flag of a command: its long name, and whether it takes a value.
pub struct Flag {
    pub long: String,
    pub takes_value: bool,
}

/// The flags the `section` of the config `text` (read from `file`) stands
/// for, given the command's `flags`. Other sections are checked too (their
/// names), but only this one is turned into flags.
pub fn to_args(text: &str, file: &Path, section: &str, flags: &[Flag]) -> Result<Vec<String>, String> {
    let doc: toml::Table = text.parse().map_err(|e: toml::de::Error| format!("{}: not valid TOML: {}", file.display(), e.message()))?;
    for (k, v) in &doc {
        if !v.is_table() {
            return Err(format!("{}: key '{k}' is outside a section; put it under [serve] or [claude]", file.display()));
        }
        if !SECTIONS.contains(&k.as_str()) {
            return Err(format!("{}: unknown section [{k}]; sections are [serve] and [claude]", file.display()));
        }
    }
    let Some(table) = doc.get(section).and_then(|v| v.as_table()) else { return Ok(vec![]) };
    let mut args = vec![];
    for (key, value) in table {
        let long = key.replace('_', "-");
        let Some(flag) = flags.iter().find(|f| f.long == long) else {
            let known: Vec<&str> = flags.iter().map(|f| f.long.as_str()).filter(|l| *l != "help" && *l != "config").collect();
            return Err(format!("{}: [{section}] has an unknown key '{key}'; `kvserve {section}` takes: {}", file.display(), known.join(", ")));
        };
        let bad = |what: &str| format!("{}: [{section}] {key}: {what}", file.display());
        let scalar = |v: &toml::Value| -> Result<String, String> {
            match v {
                toml::Value::String(s) => Ok(s.clone()),
                toml::Value::Integer(i) => Ok(i.to_string()),
                toml::Value::Float(f) => Ok(f.to_string()),
                toml::Value::Boolean(_) => Err(bad("expected a value, got true/false")),
                _ => Err(bad("expected a string or a number")),
            }
        };
        match (flag.takes_value, value) {
            (false, toml::Value::Boolean(true)) => args.push(format!("--{long}")),
            (false, toml::Value::Boolean(false)) => {}
            (false, _) => return Err(bad("a switch: expected true or false")),
            (true, toml::Value::Array(items)) => {
                for item in items {
                    args.push(format!("--{long}"));
                    args.push(scalar(item)?);
                }
            }
            (true, v) => {
                args.push(format!("--{long}"));
                args.push(scalar(v)?);
            }
        }
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags() -> Vec<Flag> {
        [("model", true), ("port", true), ("cache-dir", true), ("alias", true), ("strict-model", false), ("no-trace", false)]
            .into_iter()
            .map(|(l, v)| Flag { long: l.into(), takes_value: v })
            .collect()
    }

    #[test]
    fn keys_become_flags_and_mistakes_name_the_key() {
        let f = Path::new("/c.toml");
        let text = "[serve]\nmodel = \"m\"\nport = 9000\ncache_dir = \"auto\"\nalias = [\"a\", \"b\"]\nstrict-model = true\nno_trace = false\n[claude]\nmodel = \"x\"\n";
        assert_eq!(
            to_args(text, f, "serve", &flags()).unwrap(),
            ["--model", "m", "--port", "9000", "--cache-dir", "auto", "--alias", "a", "--alias", "b", "--strict-model"]
        );
        assert_eq!(to_args(text, f, "claude", &flags()).unwrap(), ["--model", "x"]);
        assert_eq!(to_args("", f, "serve", &flags()).unwrap(), Vec::<String>::new());
        let e = to_args("[serve]\nprot = 1\n", f, "serve", &flags()).unwrap_err();
        assert!(e.contains("[serve] has an unknown key 'prot'") && e.contains("takes: model, port"), "{e}");
        let e = to_args("port = 1\n", f, "serve", &flags()).unwrap_err();
        assert!(e.contains("key 'port' is outside a section"), "{e}");
        let e = to_args("[server]\nport = 1\n", f, "serve", &flags()).unwrap_err();
        assert!(e.contains("unknown section [server]"), "{e}");
        let e = to_args("[serve]\nstrict_model = \"yes\"\n", f, "serve", &flags()).unwrap_err();
        assert!(e.contains("strict_model: a switch"), "{e}");
        let e = to_args("[serve]\nport = true\n", f, "serve", &flags()).unwrap_err();
        assert!(e.contains("port: expected a value"), "{e}");
        let e = to_args("[serve\n", f, "serve", &flags()).unwrap_err();
        assert!(e.starts_with("/c.toml: not valid TOML"), "{e}");
    }
}
