//! Joining a group of kvserve processes over MLX's ring backend (what
//! `mlx.launch` starts: `MLX_RANK` and `MLX_HOSTFILE`), and measuring the
//! links: `kvserve ring` checks a hostfile before a model is split over it.
//!
//! The hostfile is MLX's: a JSON list with one entry per rank, each a list
//! of `"host:port"` addresses (`[["10.0.0.1:5000"], ["10.0.0.2:5000"]]`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mlx_rs::{Array, Dtype};

use crate::mlx::distributed::Group;

/// A parsed, checked ring hostfile.
#[derive(Debug, Clone, PartialEq)]
pub struct Hostfile {
    pub path: PathBuf,
    /// Each rank's addresses.
    pub ranks: Vec<Vec<String>>,
}

impl Hostfile {
    /// Read and check `path`; every problem is named with the rank and entry.
    pub fn read(path: &Path) -> Result<Hostfile, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Hostfile, String> {
        let at = path.display();
        let v: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("{at}: not valid JSON: {e}"))?;
        let list = v.as_array().ok_or_else(|| format!("{at}: expected a list with one list of \"host:port\" addresses per rank, got {}", type_name(&v)))?;
        if list.is_empty() {
            return Err(format!("{at}: lists no ranks"));
        }
        let mut ranks = Vec::with_capacity(list.len());
        let mut seen = std::collections::HashSet::new();
        for (r, entry) in list.iter().enumerate() {
            let addrs = entry.as_array().ok_or_else(|| format!("{at}: rank {r}: expected a list of \"host:port\" addresses, got {}", type_name(entry)))?;
            if addrs.is_empty() {
                return Err(format!("{at}: rank {r} has no address"));
            }
            let mut out = Vec::with_capacity(addrs.len());
            for (i, a) in addrs.iter().enumerate() {
                let s = a.as_str().ok_or_else(|| format!("{at}: rank {r}, address {i}: expected a \"host:port\" string, got {}", type_name(a)))?;
                let (host, port) = s.rsplit_once(':').ok_or_else(|| format!("{at}: rank {r}, address {i}: '{s}' has no port (host:port)"))?;
                if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
                    return Err(format!("{at}: rank {r}, address {i}: '{s}' is not host:port with a port from 1 to 65535"));
                }
                if !seen.insert(s.to_string()) {
                    return Err(format!("{at}: rank {r}, address {i}: '{s}' is listed twice"));
                }
                out.push(s.to_string());
            }
            ranks.push(out);
        }
        Ok(Hostfile { path: path.to_path_buf(), ranks })
    }

    pub fn size(&self) -> usize {
        self.ranks.len()
    }
}

fn type_name(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "a list",
        serde_json::Value::Object(_) => "an object",
    }
}

/// This process's rank: `rank` if given, else `MLX_RANK` (as `mlx.launch` sets it).
pub fn rank_of(rank: Option<usize>, hosts: &Hostfile) -> Result<usize, String> {
    let r = match rank {
        Some(r) => r,
        None => {
            let v = std::env::var("MLX_RANK").map_err(|_| "no rank: give --rank N or set MLX_RANK (mlx.launch sets it)".to_string())?;
            v.trim().parse().map_err(|_| format!("MLX_RANK is '{v}', not a rank number"))?
        }
    };
    if r >= hosts.size() {
        return Err(format!("rank {r} is not in {}, which lists {} ranks (0 to {})", hosts.path.display(), hosts.size(), hosts.size() - 1));
    }
    Ok(r)
}

/// Join the ring `hosts` describes as `rank`, waiting at most `timeout` for
/// every neighbour. On a timeout the joining thread is left behind: the
/// caller reports the error and exits.
///
/// `idle_sockets`: put the ring's socket threads in Linux's idle scheduling
/// class. They wait for data by polling their socket without sleeping, so
/// a rank waiting for the next message keeps one core busy; in the idle
/// class they yield to any other work. Right for a pipeline, whose ranks
/// wait for each other in turn (2 ranks sharing 2 cores: 25.0 -> 12.5 ms a
/// decode step); wrong for ranks split by heads that outnumber the cores,
/// where a rank's all_sum then waits for the others' compute (3 ranks on 2
/// cores: 276 -> 861 ms).
pub fn join(hosts: &Hostfile, rank: usize, timeout: Duration, idle_sockets: bool) -> Result<Group, String> {
    if !Group::available("ring") {
        return Err("this MLX build has no ring backend".into());
    }
    // MLX reads the ring's setup from the environment (as mlx.launch sets it).
    std::env::set_var("MLX_HOSTFILE", &hosts.path);
    std::env::set_var("MLX_RANK", rank.to_string());
    // MLX's own threads (its streams') start before the ring's, so that
    // only the ring's are new below.
    let warm = mlx_rs::ops::add(&Array::from_slice(&[1.0f32], &[1]), &Array::from_slice(&[1.0f32], &[1]));
    if let Err(e) = warm.and_then(|a| a.eval()) {
        return Err(format!("MLX does not compute: {e}"));
    }
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let before = crate::mlx::os::thread_ids();
        let group = Group::init("ring").map_err(|e| e.message);
        if idle_sockets {
            let me = crate::mlx::os::this_thread_id();
            let new: Vec<i32> = crate::mlx::os::thread_ids().into_iter().filter(|t| *t != me && !before.contains(t)).collect();
            let idle = new.iter().filter(|t| crate::mlx::os::make_thread_idle(**t)).count();
            tracing::debug!("the ring started {} threads; {idle} now in the idle scheduling class", new.len());
        }
        let _ = tx.send(group);
    });
    let n = hosts.size();
    let group = match rx.recv_timeout(timeout) {
        Ok(Ok(g)) => g,
        Ok(Err(e)) => return Err(format!("rank {rank} of {n} could not join the ring: {e}")),
        Err(_) => {
            return Err(format!(
                "rank {rank} of {n} could not join the ring within {:.0} s: every rank must be started with the same hostfile ({}), and this one must reach its neighbours at {}",
                timeout.as_secs_f64(),
                hosts.path.display(),
                neighbours(hosts, rank).join(", "),
            ))
        }
    };
    if group.size() != n || group.rank() != rank {
        return Err(format!("MLX joined rank {} of {}, the hostfile says rank {rank} of {n}", group.rank(), group.size()));
    }
    Ok(group)
}

/// The addresses of `rank`'s neighbours in the ring (each once).
fn neighbours(hosts: &Hostfile, rank: usize) -> Vec<String> {
    let n = hosts.size();
    let mut out: Vec<String> = vec![];
    for r in [(rank + n - 1) % n, (rank + 1) % n] {
        if r != rank {
            for a in &hosts.ranks[r] {
                if !out.contains(a) {
                    out.push(a.clone());
                }
            }
        }
    }
    out
}

/// Read the hostfile at `path`, settle this process's rank (`rank`, else
/// `MLX_RANK`) and join the ring: the hostfile and the group.
pub fn connect(path: &Path, rank: Option<usize>, timeout: Duration, idle_sockets: bool) -> Result<(Hostfile, Group), String> {
    let hosts = Hostfile::read(path)?;
    let rank = rank_of(rank, &hosts)?;
    let group = join(&hosts, rank, timeout, idle_sockets)?;
    Ok((hosts, group))
}

/// What `kvserve ring` measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Measured {
    pub rank: usize,
    pub size: usize,
    /// The all_sum of every rank's `rank + 1` (checked against `n (n + 1) / 2`).
    pub sum: f32,
    /// Median seconds of an all_sum of one f32 (the ring's per-step latency).
    pub latency_s: f64,
    /// Bytes per second of an all_sum of `bytes` f32 data (each rank's share).
    pub bytes: usize,
    pub all_sum_bytes_per_s: f64,
}

/// Check the ring (an all_sum every rank can verify) and measure it.
pub fn measure(group: &Group, bytes: usize) -> Result<Measured, String> {
    let e = |e: crate::mlx::MlxError| e.message;
    let (rank, size) = (group.rank(), group.size());
    let s = group.all_sum(&Array::from_slice(&[(rank + 1) as f32], &[1])).map_err(e)?;
    s.eval().map_err(|x| x.to_string())?;
    let sum = s.as_slice::<f32>()[0];
    let want = (size * (size + 1) / 2) as f32;
    if sum != want {
        return Err(format!("the ring's all_sum gave {sum}, expected {want}"));
    }
    let mut times = vec![];
    for _ in 0..50 {
        let t = Instant::now();
        group.all_sum(&Array::from_slice(&[1.0f32], &[1])).map_err(e)?.eval().map_err(|x| x.to_string())?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let n = (bytes / 4).max(1) as i32;
    let big = mlx_rs::ops::ones::<f32>(&[n]).map_err(|x| x.to_string())?;
    big.eval().map_err(|x| x.to_string())?;
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        let r = group.all_sum(&big).map_err(e)?;
        r.eval().map_err(|x| x.to_string())?;
        best = best.min(t.elapsed().as_secs_f64());
        if r.dtype() != Dtype::Float32 {
            return Err("all_sum changed the dtype".into());
        }
    }
    Ok(Measured { rank, size, sum, latency_s: times[times.len() / 2], bytes: n as usize * 4, all_sum_bytes_per_s: (n as f64 * 4.0) / best })
}

/// The decoder layers rank `rank` of `size` holds in a pipeline over
/// `layers` layers: a contiguous share, the first ranks taking one more when
/// they do not divide evenly.
pub fn pipeline_range(layers: i32, rank: usize, size: usize) -> std::ops::Range<i32> {
    let (n, r) = (size as i32, rank as i32);
    let (per, extra) = (layers / n, layers % n);
    let start = r * per + r.min(extra);
    start..start + per + i32::from(r < extra)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Hostfile, String> {
        Hostfile::parse(s, Path::new("hosts.json"))
    }

    #[test]
    fn hostfiles_are_checked_and_problems_named() {
        let h = parse(r#"[["127.0.0.1:5000"], ["127.0.0.1:5001", "10.0.0.2:5001"]]"#).unwrap();
        assert_eq!(h.size(), 2);
        assert_eq!(h.ranks[1][1], "10.0.0.2:5001");
        for (text, says) in [
            ("{", "not valid JSON"),
            (r#"{"a": 1}"#, "expected a list with one list"),
            ("[]", "lists no ranks"),
            (r#"[["127.0.0.1:5000"], "x"]"#, "rank 1: expected a list"),
            (r#"[["127.0.0.1:5000"], []]"#, "rank 1 has no address"),
            (r#"[["127.0.0.1"]]"#, "has no port"),
            (r#"[["127.0.0.1:0"]]"#, "port from 1 to 65535"),
            (r#"[["127.0.0.1:99999"]]"#, "port from 1 to 65535"),
            (r#"[[5000]]"#, "expected a \"host:port\" string, got a number"),
            (r#"[["127.0.0.1:5000"], ["127.0.0.1:5000"]]"#, "listed twice"),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.contains(says) && e.contains("hosts.json"), "{text}: {e}");
        }
    }

    #[test]
    fn pipeline_ranges_cover_every_layer_once() {
        assert_eq!(pipeline_range(30, 0, 2), 0..15);
        assert_eq!(pipeline_range(30, 1, 2), 15..30);
        assert_eq!((0..3).map(|r| pipeline_range(10, r, 3)).collect::<Vec<_>>(), vec![0..4, 4..7, 7..10]);
    }

    #[test]
    fn the_rank_must_be_in_the_hostfile() {
        let h = parse(r#"[["127.0.0.1:5000"], ["127.0.0.1:5001"]]"#).unwrap();
        assert_eq!(rank_of(Some(1), &h), Ok(1));
        let e = rank_of(Some(2), &h).unwrap_err();
        assert!(e.contains("rank 2 is not in hosts.json, which lists 2 ranks (0 to 1)"), "{e}");
    }
}
