//! The kvserve command line.
#![deny(unsafe_code)]

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use kvserve::engine::generate::{generate, GenerateOptions};
use kvserve::engine::sampler::SamplingParams;
use kvserve::model::config::QuantSpec;
use kvserve::model::{gguf, source};
use kvserve::text::template::TemplateInput;

/// kvserve: local LLM inference over MLX with a prompt cache.
#[derive(Parser)]
#[command(version, about, args_override_self = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Read flags for `serve` and `claude` from this TOML file (default:
    /// ~/.config/kvserve/config.toml when it exists); flags given here win.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Show the MLX runtime kvserve is linked against: version, which BLAS
    /// serves matrix products, and a quick GEMM check.
    Info,
    /// Check a group of machines over MLX's ring backend before splitting a
    /// model over them: join as one rank (start one per hostfile entry, or
    /// all through `mlx.launch --hostfile F -- kvserve ring`), verify an
    /// all_sum, and measure the step latency and all_sum bandwidth.
    Ring {
        /// MLX's ring hostfile: a JSON list, per rank a list of "host:port"
        /// (default: MLX_HOSTFILE, as mlx.launch sets it).
        #[arg(long, env = "MLX_HOSTFILE")]
        hostfile: PathBuf,
        /// This process's rank (default: MLX_RANK, as mlx.launch sets it).
        #[arg(long)]
        rank: Option<usize>,
        /// Seconds to wait for every neighbour to join.
        #[arg(long, default_value_t = 30.0)]
        timeout: f64,
        /// Bytes per rank in the bandwidth measurement.
        #[arg(long, default_value_t = 4 << 20)]
        bytes: usize,
    },
    /// Generate text for one prompt (chat template applied) and print speeds.
    Generate {
        /// An MLX-format directory, a .gguf file, or a Hugging Face repo id in the local cache.
        #[arg(long)]
        model: String,
        #[arg(long)]
        prompt: String,
        /// System message.
        #[arg(long)]
        system: Option<String>,
        #[arg(long, default_value_t = 256)]
        max_tokens: usize,
        /// Sampling temperature; 0 is greedy.
        #[arg(long, default_value_t = 0.0)]
        temp: f32,
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        #[arg(long, default_value_t = 0.0)]
        min_p: f32,
        #[arg(long, default_value_t = 1.0)]
        repetition_penalty: f32,
        /// Seed for sampling (default: a fresh random one).
        #[arg(long)]
        seed: Option<u64>,
        /// Feed the prompt as is, without the chat template.
        #[arg(long)]
        raw: bool,
        /// Split the model by layers over the ranks of this MLX ring hostfile
        /// (pipeline parallelism; greedy only): start one process per rank,
        /// each loading only its layers; rank 0 prints the answer.
        #[arg(long)]
        hostfile: Option<PathBuf>,
        /// This process's rank with --hostfile (default: MLX_RANK).
        #[arg(long)]
        rank: Option<usize>,
    },
    /// Serve the OpenAI and Anthropic APIs for one model, with the prompt cache.
    #[command(args_override_self = true)]
    Serve(ServeArgs),
    /// Run Claude Code against a local model: starts the server (or uses
    /// --url), runs `claude` with the environment set, stops the server after.
    #[command(args_override_self = true)]
    Claude {
        /// The model to serve (not needed with --url).
        #[arg(long)]
        model: Option<String>,
        /// Use a kvserve already running at this address instead of starting one.
        #[arg(long)]
        url: Option<String>,
        /// Front another OpenAI-compatible server (LM Studio, mlx-lm, llama.cpp)
        /// instead of running a model; --model names the model there.
        #[arg(long, conflicts_with = "url")]
        proxy: Option<String>,
        /// Context length for the started server (Claude Code's prompt is
        /// about 12K-24K tokens; a smaller model needs an override).
        #[arg(long)]
        context: Option<usize>,
        /// Snapshot folder for the started server (default: the per-user
        /// folder, ~/.cache/kvserve/kv/<model key>, so every launch reads
        /// what the last one computed).
        #[arg(long)]
        cache_dir: Option<PathBuf>,
        /// Keep the started server's snapshots in memory only (wins over --cache-dir).
        #[arg(long)]
        no_cache_dir: bool,
        /// Most disk the snapshot files may take (bytes or K/M/G; default:
        /// 10% of the free space there, at most 50G).
        #[arg(long, value_parser = parse_bytes)]
        cache_disk_bytes: Option<usize>,
        /// Arguments for Claude Code, after `--` (e.g. -- -p "hello").
        #[arg(last = true)]
        claude_args: Vec<String>,
    },
    /// The first thing to run: MLX, BLAS, the model, its template, a
    /// generation, a cache hit, both APIs over HTTP, Claude Code.
    Check {
        #[arg(long)]
        model: String,
    },
    /// What the traces say about the cache: hit rates, token totals, time to
    /// first token for cold and warm requests, the slowest requests.
    Report {
        /// Trace folder (default: the server's default).
        #[arg(long)]
        trace_dir: Option<PathBuf>,
        /// Only requests since then: 30m, 2h, 1d, or unix seconds.
        #[arg(long)]
        since: Option<String>,
        /// List every request too.
        #[arg(long)]
        detail: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Also draw a chart into this file (.svg or .png): time to first
        /// token per request, cold and warm, and each prompt's tokens read
        /// from the cache and computed.
        #[arg(long)]
        plot: Option<PathBuf>,
    },
    /// The per-user snapshot folder (`--cache-dir auto`, kvserve claude's
    /// default): list it, remove one model's snapshots, or all of them.
    Cache {
        #[command(subcommand)]
        action: CacheAction,
        /// The root to look in (default: $XDG_CACHE_HOME/kvserve/kv or ~/.cache/kvserve/kv).
        #[arg(long, global = true)]
        cache_dir: Option<PathBuf>,
    },
    /// Convert a GGUF file into an MLX-format directory that mlx-lm can load.
    Convert {
        input: PathBuf,
        output: PathBuf,
        /// Re-quantize every matrix to this many bits (default: keep the file's own blocks).
        #[arg(long)]
        q_bits: Option<i32>,
        /// Group size when re-quantizing.
        #[arg(long, default_value_t = 64)]
        q_group_size: i32,
    },
}

#[derive(Subcommand)]
enum CacheAction {
    /// Each model's folder: its key, model, snapshots, bytes, last use.
    Ls,
    /// Remove the folders whose key starts with WHICH or whose model path contains it.
    Rm { which: String },
    /// Remove every model's snapshots.
    Clear,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// An MLX-format directory, a .gguf file, or a Hugging Face repo id in the local cache.
    #[arg(long, required_unless_present = "proxy")]
    model: Option<String>,
    /// Forward generation to this OpenAI-compatible server instead of running
    /// a model (Anthropic requests are translated; OpenAI ones pass through).
    #[arg(long, conflicts_with = "model")]
    proxy: Option<String>,
    /// With --proxy: the model name to send upstream (default: the request's).
    #[arg(long, requires = "proxy")]
    upstream_model: Option<String>,
    /// With --proxy: seconds allowed to connect and get an answer started.
    #[arg(long, default_value_t = 30)]
    upstream_timeout: u64,
    /// With --proxy: the longest pause, in seconds, allowed in a streamed answer.
    #[arg(long, default_value_t = 600)]
    upstream_idle: u64,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free port).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Require this key as `Authorization: Bearer KEY` or `x-api-key: KEY`
    /// (default: any token is accepted).
    #[arg(long, env = "KVSERVE_API_KEY")]
    api_key: Option<String>,
    /// Memory for prompt-cache snapshots: bytes, or with K/M/G suffix
    /// (default: a quarter of RAM, at most 16G).
    #[arg(long, value_parser = parse_bytes)]
    cache_bytes: Option<usize>,
    /// Keep snapshots in this folder so they survive restarts; `auto`: the
    /// per-user folder ($XDG_CACHE_HOME/kvserve/kv or ~/.cache/kvserve/kv),
    /// one folder per model under it.
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Most disk the snapshot files may take (bytes or K/M/G), the least
    /// recently used deleted beyond it (default: 10% of the free space
    /// there, at most 50G).
    #[arg(long, value_parser = parse_bytes)]
    cache_disk_bytes: Option<usize>,
    /// Most memory MLX keeps in freed buffers for reuse (bytes or K/M/G);
    /// beyond it, freed buffers are returned to the system.
    #[arg(long, value_parser = parse_bytes, default_value = "256M")]
    mlx_cache_limit: usize,
    /// Requests computed at once (their decode steps batched); more wait in the queue.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=64))]
    parallel: u16,
    /// Keep prompt-cache snapshots quantized to 8 (or 4) bits, as mlx-lm's
    /// quantized KV cache: about half (a quarter) of f16's memory, unpacked
    /// to f16 when a request reads one.
    #[arg(long, value_parser = parse_kv_bits)]
    kv_bits: Option<u8>,
    /// Requests that may wait for the engine beyond those running; more get 429 / 529.
    #[arg(long, default_value_t = 32)]
    queue: usize,
    /// Largest request body, bytes or with K/M/G suffix.
    #[arg(long, value_parser = parse_bytes, default_value = "32M")]
    max_body: usize,
    /// Seconds a client has to send a request's headers; slower connections are closed.
    #[arg(long, default_value_t = 30.0)]
    header_timeout: f64,
    /// Seconds a client may read nothing of an answer before its connection
    /// is closed (a streamed answer's generation stops with it).
    #[arg(long, default_value_t = 120.0)]
    stall_timeout: f64,
    /// Open connections at most; one more is answered 503 and closed.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    max_connections: u32,
    /// The most prompt tokens computed in one step (smaller chunks are
    /// chosen while other requests decode). Default: 512 on the CPU, 2048 on
    /// a GPU (mlx-lm's prefill step; 512 made a cold 13.5K-token prompt 1.7x
    /// slower than mlx-lm's on an H100).
    #[arg(long)]
    prefill_chunk: Option<usize>,
    /// Another model name to answer to and list in /v1/models (repeatable).
    #[arg(long, value_name = "NAME")]
    alias: Vec<String>,
    /// Refuse (404) model names other than the model's own and the aliases;
    /// without it, every name is answered by the served model.
    #[arg(long)]
    strict_model: bool,
    /// Accept prompts up to this many tokens instead of the model's own
    /// context length (past what it was trained on, answers may be poor).
    #[arg(long)]
    context: Option<usize>,
    /// Write one JSON line per request here (default: ~/.local/share/kvserve/traces).
    #[arg(long)]
    trace_dir: Option<PathBuf>,
    /// Write no traces.
    #[arg(long, conflicts_with = "trace_dir")]
    no_trace: bool,
    /// Also trace request bodies and response text (API keys are redacted).
    #[arg(long)]
    trace_bodies: bool,
    /// Split the model by layers over the ranks of this MLX ring hostfile
    /// (pipeline parallelism): start `kvserve serve` once per rank with the
    /// same --model and hostfile (or through `mlx.launch --hostfile F --`);
    /// rank 0 serves HTTP, the others hold their layers and follow it.
    /// `mlx.launch` sets MLX_HOSTFILE, which is read when this is not given.
    #[arg(long, env = "MLX_HOSTFILE", conflicts_with = "proxy")]
    hostfile: Option<PathBuf>,
    /// This process's rank with --hostfile (default: MLX_RANK, as mlx.launch sets it).
    #[arg(long, requires = "hostfile")]
    rank: Option<usize>,
    /// With --hostfile: seconds every rank waits for the others to join.
    #[arg(long, default_value_t = 120.0, requires = "hostfile")]
    join_timeout: f64,
    /// With --hostfile: `pipeline` (each rank holds a range of layers) or
    /// `tensor` (each holds a share of every layer's heads and MLP columns,
    /// joined by all_sums; dense llama/qwen2/qwen3 models whose heads
    /// divide by the ranks). Default: pipeline, which fits every model and
    /// sends least per token. Every rank must be given the same.
    #[arg(long, value_parser = parse_split, requires = "hostfile")]
    split: Option<kvserve::pipeline::Split>,
    /// With --hostfile: seconds the other ranks may take to answer one step
    /// (a prompt chunk or a decode step) before rank 0 counts a rank as gone
    /// (a machine that vanished without closing its connections) and exits 69.
    #[arg(long, default_value_t = 600.0, requires = "hostfile")]
    step_timeout: f64,
}

fn parse_split(s: &str) -> Result<kvserve::pipeline::Split, String> {
    match s.trim() {
        "pipeline" => Ok(kvserve::pipeline::Split::Layers),
        "tensor" => Ok(kvserve::pipeline::Split::Heads),
        other => Err(format!("'{other}': --split takes pipeline or tensor")),
    }
}

fn parse_kv_bits(s: &str) -> Result<u8, String> {
    match s.trim() {
        "8" => Ok(8),
        "4" => Ok(4),
        other => Err(format!("'{other}': --kv-bits takes 8 or 4")),
    }
}

/// "4G", "512M", "64K" or a plain number of bytes.
fn parse_bytes(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: usize = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                _ => return Err(format!("'{s}': the suffix must be K, M or G")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: f64 = num.trim().parse().map_err(|_| format!("'{s}' is not a size (examples: 4G, 512M, 1048576)"))?;
    if n.is_nan() || n < 0.0 {
        return Err(format!("'{s}' is negative"));
    }
    Ok((n * mult as f64) as usize)
}

async fn shutdown_signal() {
    // Ctrl-C or SIGTERM: stop accepting, finish, write snapshots.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
    }
    tracing::info!("shutting down");
}

/// The per-client limits, checked.
fn limits(args: &ServeArgs) -> Result<kvserve::server::Limits> {
    let secs = |v: f64, flag: &str| {
        if v > 0.0 && v <= 86_400.0 {
            Ok(std::time::Duration::from_secs_f64(v))
        } else {
            Err(anyhow::anyhow!("--{flag} is {v}; it must be a number of seconds above 0, at most 86400"))
        }
    };
    Ok(kvserve::server::Limits {
        header_timeout: secs(args.header_timeout, "header-timeout")?,
        stall_timeout: secs(args.stall_timeout, "stall-timeout")?,
        max_connections: args.max_connections as usize,
    })
}

/// Said at start (stderr and the log) when the port is reachable from
/// other machines and no key is required.
fn warn_if_open(local: std::net::SocketAddr, api_key: Option<&str>) {
    if !local.ip().is_loopback() && api_key.is_none() {
        let msg = format!(
            "WARNING: listening on {local}, reachable beyond this machine, without --api-key: anyone who can reach this port can use the model \
             and see the dashboard's recent requests. Give --api-key KEY (or KVSERVE_API_KEY), or --host 127.0.0.1"
        );
        eprintln!("{msg}");
        tracing::warn!("{msg}");
    }
}

fn serve_proxy(args: &ServeArgs, upstream: &str) -> Result<()> {
    use kvserve::server::{self, proxy};
    let state = proxy::ProxyState::new(proxy::ProxyConfig {
        upstream: upstream.to_string(),
        model: args.upstream_model.clone(),
        connect_timeout: std::time::Duration::from_secs(args.upstream_timeout.max(1)),
        idle_timeout: std::time::Duration::from_secs(args.upstream_idle.max(1)),
        max_body_bytes: args.max_body,
        api_key: args.api_key.clone(),
        limits: limits(args)?,
    })
    .map_err(|e| anyhow::anyhow!("--proxy: {e}"))?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async {
        let addr: std::net::SocketAddr = format!("{}:{}", args.host, args.port).parse().context("not a valid address")?;
        let listener = server::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
        let local = listener.local_addr()?;
        warn_if_open(local, args.api_key.as_deref());
        println!("kvserve listening on http://{local}");
        println!("model: {} (proxy to {upstream})", args.upstream_model.as_deref().unwrap_or("as requested"));
        println!("prompt cache: the upstream's (its cached_tokens are reported as cache reads)");
        println!("Claude Code: ANTHROPIC_BASE_URL=http://{local} ANTHROPIC_AUTH_TOKEN=kvserve claude");
        let _ = std::io::stdout().flush();
        proxy::serve(listener, state, shutdown_signal()).await;
        Ok::<(), anyhow::Error>(())
    })
}

fn serve(args: ServeArgs) -> Result<()> {
    use kvserve::engine::worker::{default_cache_bytes, Engine, EngineConfig};
    use kvserve::server::{self, ServerConfig, State};
    kvserve::launch::stop_with_launcher();
    if let Some(upstream) = args.proxy.clone() {
        return serve_proxy(&args, &upstream);
    }
    let limits = limits(&args)?;
    let cache_bytes = args.cache_bytes.unwrap_or_else(default_cache_bytes);
    let (cache_dir, cache_disk) = cache_folder(args.cache_dir.as_deref(), args.cache_disk_bytes)?;
    kvserve::mlx::set_cache_limit(args.mlx_cache_limit).context("cannot set MLX's cache limit")?;
    let pipeline = match &args.hostfile {
        None => None,
        Some(hostfile) => {
            if !(args.join_timeout > 0.0 && args.join_timeout <= 86_400.0) {
                bail!("--join-timeout is {}; it must be a number of seconds above 0, at most 86400", args.join_timeout);
            }
            let hosts = kvserve::ring::Hostfile::read(hostfile).map_err(anyhow::Error::msg)?;
            let rank = kvserve::ring::rank_of(args.rank, &hosts).map_err(anyhow::Error::msg)?;
            let join_timeout = std::time::Duration::from_secs_f64(args.join_timeout);
            if !(args.step_timeout > 0.0 && args.step_timeout <= 86_400.0) {
                bail!("--step-timeout is {}; it must be a number of seconds above 0, at most 86400", args.step_timeout);
            }
            let step_timeout = std::time::Duration::from_secs_f64(args.step_timeout);
            if rank > 0 {
                let cache = cache_dir.as_deref().map(|d| (d, &cache_disk));
                follow_pipeline(args.model.as_deref().expect("clap requires --model without --proxy"), hostfile, rank, join_timeout, args.split, cache);
            }
            Some(kvserve::engine::worker::PipelineConfig { hostfile: hostfile.clone(), join_timeout, split: args.split, step_timeout })
        }
    };
    let cfg = EngineConfig {
        model: args.model.clone().expect("clap requires --model without --proxy"),
        cache_bytes,
        cache_dir,
        cache_disk,
        queue: args.queue,
        prefill_chunk: args.prefill_chunk.unwrap_or(if kvserve::model::on_cpu() { 512 } else { 2048 }),
        parallel: args.parallel as usize,
        kv_bits: args.kv_bits,
        context_override: args.context,
        pipeline,
    };
    let t0 = std::time::Instant::now();
    let engine = Engine::start(cfg).map_err(anyhow::Error::msg)?;
    let info = engine.info.clone();
    tracing::info!("loaded {} ({} tokens of context) in {:.1}s", info.path.display(), info.context, t0.elapsed().as_secs_f64());
    // Prompt rendering and tokenizing run on a small blocking pool.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).max_blocking_threads(8).enable_all().build()?;
    rt.block_on(async move {
        let addr: std::net::SocketAddr = format!("{}:{}", args.host, args.port)
            .parse()
            .with_context(|| format!("'{}:{}' is not a valid address", args.host, args.port))?;
        let listener = server::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
        let local = listener.local_addr()?;
        let trace = kvserve::server::trace::TraceConfig {
            dir: if args.no_trace { None } else { args.trace_dir.clone().or_else(kvserve::server::trace::default_dir) },
            bodies: args.trace_bodies,
            max_file_bytes: 16 << 20,
            redact: args.api_key.iter().cloned().collect(),
        };
        let trace_dir = trace.dir.clone();
        let state = State::new(engine, ServerConfig {
            api_key: args.api_key.clone(),
            max_body_bytes: args.max_body,
            trace,
            aliases: args.alias.clone(),
            strict_model: args.strict_model,
            limits,
        });
        warn_if_open(local, args.api_key.as_deref());
        println!("kvserve listening on http://{local}");
        println!("model: {} ({})", info.name, info.path.display());
        println!(
            "prompt cache: {:.1} GB in memory{}",
            cache_bytes as f64 / 1e9,
            info.snapshot_dir.as_ref().map(|d| format!(", persisted in {}", d.display())).unwrap_or_default()
        );
        println!(
            "Claude Code: ANTHROPIC_BASE_URL=http://{local} ANTHROPIC_AUTH_TOKEN={} ANTHROPIC_MODEL={} claude",
            args.api_key.as_deref().unwrap_or("kvserve"),
            info.name
        );
        if let Some(d) = &trace_dir {
            println!("traces: {} (kvserve report reads them)", d.display());
        }
        let _ = std::io::stdout().flush();
        server::serve(listener, state, shutdown_signal()).await;
        Ok::<(), anyhow::Error>(())
    })
}

/// A rank but 0 of `kvserve serve --hostfile`: join, load this rank's
/// layers, check every rank has the same model, then follow rank 0's steps
/// until it stops (exit 0) or a link is lost (exit 69, every rank alike).
fn follow_pipeline(
    spec: &str,
    hostfile: &std::path::Path,
    rank: usize,
    timeout: std::time::Duration,
    split: Option<kvserve::pipeline::Split>,
    cache: Option<(&std::path::Path, &kvserve::engine::worker::CacheDisk)>,
) -> ! {
    use kvserve::{pipeline, ring};
    let fail = |code: i32, why: String| -> ! {
        tracing::error!("{why}");
        eprintln!("kvserve: {why}");
        kvserve::mlx::exit(code)
    };
    // A model or split that cannot be served this way is refused before waiting for the others.
    let hosts = ring::Hostfile::read(hostfile).unwrap_or_else(|e| fail(1, e));
    let n = hosts.size();
    let (total, split) = pipeline::plan(spec, n, split).unwrap_or_else(|e| fail(1, e));
    let group = ring::join(&hosts, rank, timeout, split == pipeline::Split::Layers).unwrap_or_else(|e| fail(1, e));
    let group = std::sync::Arc::new(group);
    let t0 = std::time::Instant::now();
    let (m, range) = pipeline::load_share(spec, &group, total, split).unwrap_or_else(|e| fail(1, e));
    // The folder is opened first: a rank that cannot keep its shares must
    // not let rank 0 write files no snapshot could be read back from.
    let shares = cache.and_then(|(root, disk)| pipeline::share_store(root, disk, &m, rank, n, split, &range));
    pipeline::handshake(&group, &m.model, split, &range, shares.is_some()).unwrap_or_else(|e| fail(1, e));
    match split {
        pipeline::Split::Layers => eprintln!("rank {rank} of {n}: layers {}..{} of {total} loaded in {:.1}s; following rank 0", range.start, range.end, t0.elapsed().as_secs_f64()),
        pipeline::Split::Heads => eprintln!("rank {rank} of {n}: {} attention heads of each of {total} layers loaded in {:.1}s; following rank 0", m.model.config.num_heads, t0.elapsed().as_secs_f64()),
    }
    match pipeline::follow(&group, &m.model, shares.as_ref()) {
        Ok(done) => {
            eprintln!(
                "rank {rank}: rank 0 stopped; {} steps, {} tokens computed here; {} snapshots kept quantized; {:.2} s working on rank 0's messages, {:.2} s waiting for them",
                done.steps,
                done.tokens,
                done.packed,
                done.working.as_secs_f64(),
                done.waiting.as_secs_f64()
            );
            drop(m);
            kvserve::mlx::exit(0)
        }
        Err(e) => fail(pipeline::EXIT_RANK_LOST, format!("{e}; exiting with status {} so that a supervisor restarts the group", pipeline::EXIT_RANK_LOST)),
    }
}

/// `--cache-dir` as the engine takes it: `auto` is the per-user root, one
/// folder per model under it.
fn cache_folder(dir: Option<&std::path::Path>, disk_bytes: Option<usize>) -> Result<(Option<PathBuf>, kvserve::engine::worker::CacheDisk)> {
    use kvserve::engine::worker::CacheDisk;
    let bound_bytes = disk_bytes.map(|b| b as u64);
    match dir {
        Some(d) if d.as_os_str() == "auto" => {
            let Some(root) = kvserve::cache::disk::user_root() else { bail!("--cache-dir auto: neither XDG_CACHE_HOME nor HOME is set; give a folder") };
            Ok((Some(root), CacheDisk { per_model: true, bound_bytes }))
        }
        d => Ok((d.map(PathBuf::from), CacheDisk { per_model: false, bound_bytes })),
    }
}

fn claude(
    model: Option<String>,
    url: Option<String>,
    proxy: Option<String>,
    context: Option<usize>,
    cache_dir: Option<PathBuf>,
    cache_disk_bytes: Option<usize>,
    args: &[String],
) -> Result<i32> {
    use kvserve::launch;
    let Some(exe) = launch::find_claude() else {
        bail!(
            "Claude Code is not installed: run `make claude-code` (installs it into {}) or `npm install -g @anthropic-ai/claude-code`",
            launch::LOCAL_CLAUDE
        );
    };
    let (server, url, name) = match url {
        Some(u) => {
            let name = launch::served_model(&u)?;
            (None, u, name)
        }
        None if proxy.is_some() => {
            let Some(model) = model else { bail!("with --proxy, give --model NAME: the model the upstream serves") };
            let serve_args = vec!["--proxy".to_string(), proxy.unwrap_or_default(), "--upstream-model".to_string(), model];
            let s = launch::start_server(&serve_args)?;
            let (u, n) = (s.url.clone(), s.model.clone());
            (Some(s), u, n)
        }
        None => {
            let Some(model) = model else { bail!("give --model M (or --url of a running kvserve)") };
            let mut serve_args = vec!["--model".to_string(), model];
            if let Some(c) = context {
                eprintln!("context override: {c} tokens (Claude Code's prompt may not fit the model's own context)");
                serve_args.extend(["--context".to_string(), c.to_string()]);
            }
            if let Some(d) = cache_dir {
                serve_args.extend(["--cache-dir".to_string(), d.display().to_string()]);
            }
            if let Some(b) = cache_disk_bytes {
                serve_args.extend(["--cache-disk-bytes".to_string(), b.to_string()]);
            }
            let s = launch::start_server(&serve_args)?;
            let (u, n) = (s.url.clone(), s.model.clone());
            (Some(s), u, n)
        }
    };
    // The window Claude Code is told: --context, else what the server reports
    // (kvserve: the model's own; an upstream behind --proxy, where it says).
    let window = match context {
        Some(c) => c,
        None => match launch::served_context(&url, Some(&name))? {
            Some(c) => c,
            None => bail!("{url} does not report the model's context window; give --context N (its window in tokens)"),
        },
    };
    eprintln!("running {} against {url} (model {name}, {window} tokens of context)", exe.display());
    let code = launch::run_claude(&exe, &url, &name, "kvserve", window, args)?;
    drop(server);
    Ok(code)
}

fn main() {
    let code = match run() {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("Error: {e:?}");
            1
        }
    };
    kvserve::mlx::exit(code)
}

fn run() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("KVSERVE_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let (argv, config) = with_config(std::env::args_os().collect())?;
    let cli = Cli::parse_from(argv);
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Ring { hostfile, rank, timeout, bytes } => {
            use kvserve::ring;
            // Bounded: Duration::from_secs_f64 panics on a value past its range.
            if !(timeout > 0.0 && timeout <= 86_400.0) {
                bail!("--timeout is {timeout}; it must be a number of seconds above 0, at most 86400");
            }
            if bytes == 0 || bytes > 1 << 30 {
                bail!("--bytes is {bytes}; it must be from 1 to 1073741824 (1 GiB)");
            }
            let (_, group) = ring::connect(&hostfile, rank, std::time::Duration::from_secs_f64(timeout), false).map_err(anyhow::Error::msg)?;
            let m = ring::measure(&group, bytes).map_err(anyhow::Error::msg)?;
            println!(
                "rank {} of {}: all_sum checked ({}); step latency {:.0} us; all_sum of {:.1} MB per rank at {:.2} GB/s",
                m.rank,
                m.size,
                m.sum,
                m.latency_s * 1e6,
                m.bytes as f64 / 1e6,
                m.all_sum_bytes_per_s / 1e9
            );
            println!("{}", serde_json::to_string(&m)?);
            Ok(())
        }
        Command::Check { model } => kvserve::mlx::exit(if kvserve::check::run(&model, config.as_deref()) { 0 } else { 1 }),
        Command::Report { trace_dir, since, detail, json, plot } => {
            use kvserve::{report, server::trace};
            let Some(dir) = trace_dir.or_else(trace::default_dir) else { bail!("give --trace-dir") };
            let records = trace::read_all(&dir).with_context(|| format!("cannot read traces in {}", dir.display()))?;
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs_f64();
            let since = match since {
                Some(s) => report::parse_since(&s, now).map_err(anyhow::Error::msg)?,
                None => 0.0,
            };
            let summary = report::summarize(&records, since);
            if let Some(p) = &plot {
                let n = report::plot::plot(&records, since, p).map_err(anyhow::Error::msg)?;
                eprintln!("wrote {} ({n} requests)", p.display());
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&summary)?);
            } else {
                print!("{}", report::render(&summary, &records, detail, since));
            }
            Ok(())
        }
        Command::Claude { model, url, proxy, context, cache_dir, no_cache_dir, cache_disk_bytes, claude_args } => {
            // The started server persists its snapshots by default: every launch reads what the last computed.
            let cache_dir = if no_cache_dir { None } else { Some(cache_dir.unwrap_or_else(|| PathBuf::from("auto"))) };
            let code = claude(model, url, proxy, context, cache_dir, cache_disk_bytes, &claude_args)?;
            kvserve::mlx::exit(code);
        }
        Command::Info => info(),
        Command::Generate { model, prompt, system, max_tokens, temp, top_p, top_k, min_p, repetition_penalty, seed, raw, hostfile, rank } => {
            let sampling = SamplingParams { temperature: temp, top_p, top_k, min_p, repetition_penalty, seed, ..Default::default() };
            match hostfile {
                Some(h) => {
                    if !sampling.is_greedy() {
                        bail!("--hostfile generates greedily: leave out --temp and the other sampling flags");
                    }
                    run_pipeline_generate(&model, &prompt, system.as_deref(), max_tokens, raw, &h, rank)
                }
                None => run_generate(&model, &prompt, system.as_deref(), max_tokens, sampling, raw),
            }
        }
        Command::Cache { action, cache_dir } => cache_command(action, cache_dir),
        Command::Convert { input, output, q_bits, q_group_size } => {
            let requant = q_bits.map(|bits| QuantSpec { group_size: q_group_size, bits });
            let c = gguf::convert(&input, requant)?;
            gguf::write_dir(&c, &output)?;
            eprintln!("wrote {}", output.display());
            Ok(())
        }
    }
}

/// The command line with the config file's flags for its command put
/// right after the command's name, and the file read: `--config FILE`
/// (which must exist), else the default path if it exists. A key whose flag
/// the command line gives (or a conflicting one, or whose environment
/// variable is set) is left out, so the command line and the environment win.
fn with_config(argv: Vec<std::ffi::OsString>) -> Result<(Vec<std::ffi::OsString>, Option<PathBuf>)> {
    use clap::CommandFactory;
    use kvserve::config;
    let text: Vec<String> = argv.iter().map(|a| a.to_string_lossy().into_owned()).collect();
    // Flags end at `--` (what follows is Claude Code's).
    let end = text.iter().position(|a| a == "--").unwrap_or(text.len());
    let own = &text[..end];
    let given = own
        .iter()
        .position(|a| a == "--config")
        .and_then(|i| own.get(i + 1).cloned())
        .or_else(|| own.iter().find_map(|a| a.strip_prefix("--config=").map(str::to_string)));
    let file = match given {
        Some(f) => {
            let p = PathBuf::from(f);
            if !p.is_file() {
                bail!("--config {}: no such file", p.display());
            }
            Some(p)
        }
        // The server `kvserve claude` starts takes only the flags it is given ([claude] applies there).
        None if std::env::var_os(kvserve::launch::NO_CONFIG).is_some() => None,
        None => config::default_path().filter(|p| p.is_file()),
    };
    let Some(file) = file else { return Ok((argv, None)) };
    let body = std::fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?;
    // The command: the first word that is not an option (or --config's value).
    let mut at = None;
    let mut i = 1;
    while i < end {
        if text[i] == "--config" {
            i += 2;
            continue;
        }
        if !text[i].starts_with('-') {
            at = Some(i);
            break;
        }
        i += 1;
    }
    let Some(at) = at.filter(|&i| config::SECTIONS.contains(&text[i].as_str())) else {
        // Other commands read no flags from it, but a broken file is still said.
        config::to_args(&body, &file, "", &[]).map_err(anyhow::Error::msg)?;
        return Ok((argv, Some(file)));
    };
    let cmd = Cli::command();
    let sub = cmd.find_subcommand(&text[at]).expect("sections are subcommands");
    let flags: Vec<config::Flag> = sub
        .get_arguments()
        .filter_map(|a| a.get_long().map(|l| config::Flag { long: l.to_string(), takes_value: a.get_action().takes_values() }))
        .collect();
    // Flags the command line gives, and those their presence rules out.
    let on_line = |long: &str| own[at + 1..].iter().any(|a| a == &format!("--{long}") || a.starts_with(&format!("--{long}=")));
    let conflicts: &[(&str, &str)] = &[("model", "proxy"), ("trace-dir", "no-trace"), ("cache-dir", "no-cache-dir")];
    let overridden = |long: &str| {
        on_line(long)
            || conflicts.iter().any(|&(a, b)| (long == a && on_line(b)) || (long == b && on_line(a)))
            || sub.get_arguments().any(|a| a.get_long() == Some(long) && a.get_env().is_some_and(|e| std::env::var_os(e).is_some()))
    };
    let extra = config::to_args(&body, &file, &text[at], &flags).map_err(anyhow::Error::msg)?;
    let mut kept = vec![];
    let mut j = 0;
    while j < extra.len() {
        let long = extra[j].trim_start_matches("--").to_string();
        let takes = flags.iter().any(|f| f.long == long && f.takes_value);
        let n = if takes { 2 } else { 1 };
        if !overridden(&long) {
            kept.extend_from_slice(&extra[j..j + n]);
        }
        j += n;
    }
    let mut out: Vec<std::ffi::OsString> = argv[..=at].to_vec();
    out.extend(kept.into_iter().map(Into::into));
    out.extend(argv[at + 1..].iter().cloned());
    Ok((out, Some(file)))
}

fn cache_command(action: CacheAction, root: Option<PathBuf>) -> Result<()> {
    use kvserve::cache::disk;
    let Some(root) = root.or_else(disk::user_root) else { bail!("neither XDG_CACHE_HOME nor HOME is set; give --cache-dir") };
    let gb = |b: u64| b as f64 / 1e9;
    match action {
        CacheAction::Ls => {
            let folders = disk::folders(&root);
            println!("{}", root.display());
            if folders.is_empty() {
                println!("  (no snapshots)");
            }
            let now = std::time::SystemTime::now();
            for f in &folders {
                let ago = f.last_used.and_then(|t| now.duration_since(t).ok()).map(|d| format!("{:.0} min ago", d.as_secs_f64() / 60.0)).unwrap_or("-".into());
                println!("  {}  {} snapshots, {:.3} GB, last used {}  {}", f.key, f.snapshots, gb(f.bytes), ago, f.model.as_deref().unwrap_or("(model unknown)"));
            }
            let total: u64 = folders.iter().map(|f| f.bytes).sum();
            println!("total {:.3} GB", gb(total));
        }
        CacheAction::Rm { which } => {
            for f in disk::remove_matching(&root, &which).map_err(anyhow::Error::msg)? {
                println!("removed {} ({} snapshots, {:.3} GB) {}", f.path.display(), f.snapshots, gb(f.bytes), f.model.as_deref().unwrap_or(""));
            }
        }
        CacheAction::Clear => {
            let folders = disk::folders(&root);
            let (mut n, mut bytes) = (0, 0);
            for f in folders {
                if f.key == "." {
                    for s in disk::snapshot_files(&root).into_iter().filter(|s| s.path.parent() == Some(root.as_path())) {
                        std::fs::remove_file(&s.path).with_context(|| format!("cannot remove {}", s.path.display()))?;
                    }
                } else {
                    std::fs::remove_dir_all(&f.path).with_context(|| format!("cannot remove {}", f.path.display()))?;
                }
                n += f.snapshots;
                bytes += f.bytes;
            }
            println!("removed {n} snapshots ({:.3} GB) from {}", gb(bytes), root.display());
        }
    }
    Ok(())
}

/// The prompt's token ids: `prompt` through the model's chat template (with
/// `system` first), or as is with `raw`.
fn prompt_ids(m: &source::LoadedModel, prompt: &str, system: Option<&str>, raw: bool) -> Result<Vec<u32>> {
    let text = if raw {
        prompt.to_string()
    } else {
        let Some(template) = &m.template else { bail!("{} has no chat template; use --raw", m.path.display()) };
        let mut messages = vec![];
        if let Some(s) = system {
            messages.push(serde_json::json!({"role": "system", "content": s}));
        }
        messages.push(serde_json::json!({"role": "user", "content": prompt}));
        let messages = serde_json::Value::Array(messages);
        template.render(&TemplateInput {
            messages: &messages,
            add_generation_prompt: true,
            bos_token: m.tokenizer.bos_token.as_deref().unwrap_or(""),
            eos_token: m.tokenizer.eos_token.as_deref().unwrap_or(""),
            ..Default::default()
        })?
    };
    let ids = m.tokenizer.encode(&text)?;
    if ids.is_empty() {
        bail!("the prompt is empty after tokenization");
    }
    Ok(ids)
}

/// `kvserve generate --hostfile`: the model split by layers over the ring,
/// as `serve --hostfile` splits it: rank 0 generates (greedily) and prints
/// the answer, every other rank follows its steps until it stops.
fn run_pipeline_generate(spec: &str, prompt: &str, system: Option<&str>, max_tokens: usize, raw: bool, hostfile: &std::path::Path, rank: Option<usize>) -> Result<()> {
    use kvserve::{pipeline, ring};
    let timeout = std::time::Duration::from_secs(60);
    let hosts = ring::Hostfile::read(hostfile).map_err(anyhow::Error::msg)?;
    let rank = ring::rank_of(rank, &hosts).map_err(anyhow::Error::msg)?;
    if rank > 0 {
        follow_pipeline(spec, hostfile, rank, timeout, Some(pipeline::Split::Layers), None);
    }
    let planned = pipeline::plan(spec, hosts.size(), Some(pipeline::Split::Layers)).map_err(anyhow::Error::msg)?;
    let group = ring::join(&hosts, rank, timeout, true).map_err(anyhow::Error::msg)?;
    let t0 = std::time::Instant::now();
    let m = pipeline::lead(spec, std::sync::Arc::new(group), planned, false).map_err(anyhow::Error::msg)?;
    eprintln!("rank 0 of {}: loaded in {:.1}s", hosts.size(), t0.elapsed().as_secs_f64());
    let done = generate_with(&m, prompt, system, max_tokens, SamplingParams::default(), raw);
    if let Some(stage) = m.model.stage() {
        stage.stop().context("stopping the other ranks")?;
    }
    done
}

fn run_generate(spec: &str, prompt: &str, system: Option<&str>, max_tokens: usize, sampling: SamplingParams, raw: bool) -> Result<()> {
    let t0 = std::time::Instant::now();
    let m = source::load(spec)?;
    eprintln!("loaded {} in {:.1}s", m.path.display(), t0.elapsed().as_secs_f64());
    generate_with(&m, prompt, system, max_tokens, sampling, raw)
}

/// Generate from `prompt` with a loaded model, streaming the text to stdout.
fn generate_with(m: &source::LoadedModel, prompt: &str, system: Option<&str>, max_tokens: usize, sampling: SamplingParams, raw: bool) -> Result<()> {
    let ids = prompt_ids(m, prompt, system, raw)?;
    let ctx = m.model.config.context_length as usize;
    if ids.len() + max_tokens > ctx {
        bail!("prompt is {} tokens plus {max_tokens} to generate; model context is {ctx}", ids.len());
    }
    let opts = GenerateOptions { sampling, max_tokens, eos_ids: m.eos_ids.clone(), ..Default::default() };
    let mut cache = kvserve::cache::kv::new_cache(m.model.num_layers());
    let mut out = std::io::stdout().lock();
    let stats = generate(&m.model, &m.tokenizer, &mut cache, &ids, &opts, &mut |t| {
        let _ = out.write_all(t.as_bytes());
        let _ = out.flush();
        true
    })
    .context("generation failed")?;
    println!();
    eprintln!(
        "prompt: {} tokens, {:.1} tokens/s | generation: {} tokens, {:.1} tokens/s | peak memory {:.1} MB | finish {:?}",
        stats.prompt_tokens,
        stats.prompt_tps(),
        stats.generated_tokens,
        stats.generation_tps(),
        stats.peak_memory as f64 / 1e6,
        stats.finish
    );
    Ok(())
}

fn info() -> Result<()> {
    use kvserve::mlx;
    println!("kvserve {}", env!("CARGO_PKG_VERSION"));
    println!("MLX {}", mlx::version()?);
    match mlx::blas_provider() {
        Some(path) => println!("cblas_sgemm from {}", path.display()),
        None => println!("cblas_sgemm: not loaded"),
    }
    let n = 1024;
    let a = mlx_rs::random::normal::<f32>(&[n, n], None, None, None)?;
    let b = mlx_rs::random::normal::<f32>(&[n, n], None, None, None)?;
    a.eval()?;
    b.eval()?;
    let start = std::time::Instant::now();
    let c = a.matmul(&b)?;
    c.eval()?;
    let secs = start.elapsed().as_secs_f64();
    println!("fp32 GEMM {n}x{n}x{n}: {:.1} ms, {:.1} GFLOPS", secs * 1e3, 2.0 * (n as f64).powi(3) / secs / 1e9);
    Ok(())
}
