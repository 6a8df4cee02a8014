//! fp32 GEMM (BLAS through MLX) and 4-bit matmul (MLX's quantized kernel, and
//! dequantize + GEMM, the CPU prefill path) at a few sizes.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kvserve::mlx::{Array, QuantizedMatrix};

fn random(shape: &[i32]) -> Array {
    let a = mlx_rs::random::normal::<f32>(shape, None, None, None).unwrap();
    a.eval().unwrap();
    a
}

fn gemm(c: &mut Criterion) {
    let mut group = c.benchmark_group("fp32_gemm");
    group.sample_size(10);
    for n in [256, 1024, 2048] {
        let a = random(&[n, n]);
        let b = random(&[n, n]);
        group.throughput(Throughput::Elements(2 * (n as u64).pow(3)));
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |bench, _| {
            bench.iter(|| a.matmul(&b).unwrap().eval().unwrap())
        });
    }
    group.finish();
}

fn quantized(c: &mut Criterion) {
    let (k, n) = (2048, 2048);
    let w = QuantizedMatrix::quantize(&random(&[n, k]), 64, 4).unwrap();
    w.packed.eval().unwrap();
    let mut group = c.benchmark_group("q4_matmul_2048x2048");
    group.sample_size(10);
    for m in [1, 32, 512] {
        let x = random(&[m, k]);
        group.throughput(Throughput::Elements(2 * m as u64 * k as u64 * n as u64));
        group.bench_with_input(BenchmarkId::new("quantized_matmul", m), &m, |bench, _| {
            bench.iter(|| w.matmul(&x).unwrap().eval().unwrap())
        });
        if m > 1 {
            group.bench_with_input(BenchmarkId::new("dequantize_gemm", m), &m, |bench, _| {
                bench.iter(|| {
                    let dense = w.dequantize().unwrap();
                    x.matmul(dense.t()).unwrap().eval().unwrap()
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, gemm, quantized);
criterion_main!(benches);
