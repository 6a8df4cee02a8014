use anyhow::Result;
use clap::{Parser, Subcommand};

/// kvserve: local LLM inference over MLX with a prompt cache.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show the MLX runtime kvserve is linked against: version, library paths,
    /// which BLAS serves matrix products, and a quick GEMM check.
    Info,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Info => info(),
    }
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
    println!(
        "fp32 GEMM {n}x{n}x{n}: {:.1} ms, {:.1} GFLOPS",
        secs * 1e3,
        2.0 * (n as f64).powi(3) / secs / 1e9
    );
    Ok(())
}
