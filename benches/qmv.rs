//! Our quantized matrix-vector kernels (src/kernels/qmv) vs MLX's
//! `quantized_matmul`, at SmolLM2-135M's decode shapes (affine, group size
//! 32, f32 scales, as the Q4_1 / Q8_0 GGUF maps), m = 1 and 8 activation
//! rows. First prints a table (median time, GB/s of weight bytes: packed +
//! scales + biases) beside this machine's memory bandwidth, then runs the
//! same pairs under criterion. `cargo bench --bench qmv`; set
//! `QMV_TABLE_ONLY=1` to skip the criterion part.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use kvserve::kernels::{available_isas, qmv, qmv_with, selected_isa, Isa, QuantMatrix, Scales};
use mlx_rs::Array;

const GROUP: i32 = 32;

/// (name, rows, cols, bits)
const SHAPES: [(&str, usize, usize, u32); 5] = [
    ("q/o 576x576", 576, 576, 4),
    ("k/v 192x576", 192, 576, 4),
    ("up/gate 1536x576", 1536, 576, 4),
    ("down 576x1536", 576, 1536, 4),
    ("lm_head 49152x576 q8", 49152, 576, 8),
];

/// One quantized matrix as MLX holds it, with host copies for our kernel.
struct Case {
    name: &'static str,
    rows: usize,
    cols: usize,
    bits: u32,
    packed: Array,
    scales: Array,
    biases: Array,
    packed_v: Vec<u32>,
    scales_v: Vec<f32>,
    biases_v: Vec<f32>,
}

impl Case {
    fn new(name: &'static str, rows: usize, cols: usize, bits: u32) -> Self {
        let key = mlx_rs::random::key(rows as u64 * 7 + cols as u64).unwrap();
        let w = mlx_rs::random::normal::<f32>(&[rows as i32, cols as i32], None, None, &key).unwrap();
        let (packed, scales, biases) = mlx_rs::ops::quantize(&w, GROUP, bits as i32).unwrap();
        mlx_rs::transforms::eval([&packed, &scales, &biases]).unwrap();
        let (packed_v, scales_v, biases_v) =
            (packed.as_slice::<u32>().to_vec(), scales.as_slice::<f32>().to_vec(), biases.as_slice::<f32>().to_vec());
        Case { name, rows, cols, bits, packed, scales, biases, packed_v, scales_v, biases_v }
    }

    fn view(&self) -> QuantMatrix<'_> {
        QuantMatrix {
            packed: &self.packed_v,
            scales: Scales::F32(&self.scales_v),
            biases: Scales::F32(&self.biases_v),
            rows: self.rows,
            cols: self.cols,
            group_size: GROUP as usize,
            bits: self.bits,
        }
    }

    fn mlx(&self, x: &Array) {
        let y =
            mlx_rs::ops::quantized_matmul(x, &self.packed, &self.scales, &self.biases, true, GROUP, self.bits as i32)
                .unwrap();
        y.eval().unwrap();
    }
}

/// Median seconds per call over ~`budget` (at least 5 calls) after a warm-up.
fn median(budget: Duration, mut f: impl FnMut()) -> f64 {
    for _ in 0..3 {
        f();
    }
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < 5 || (start.elapsed() < budget && times.len() < 20_000) {
        let t = Instant::now();
        f();
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// GB/s reading a 256 MB f32 buffer (summing it) on `threads` threads; best of 5.
fn bandwidth(threads: usize) -> f64 {
    let data: Vec<f32> = (0..64 << 20).map(|i| (i % 7) as f32).collect();
    let chunk = data.len() / threads;
    let sum_chunk = |c: &[f32]| {
        // 16 independent lanes so the compiler vectorizes the adds.
        let mut acc = [0.0f32; 16];
        for v in c.chunks_exact(16) {
            for k in 0..16 {
                acc[k] += v[k];
            }
        }
        acc.iter().sum::<f32>()
    };
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        let total: f32 = std::thread::scope(|s| {
            let hs: Vec<_> = data.chunks(chunk).map(|c| s.spawn(move || sum_chunk(c))).collect();
            hs.into_iter().map(|h| h.join().unwrap()).sum()
        });
        black_box(total);
        best = best.min(t.elapsed().as_secs_f64());
    }
    (data.len() * 4) as f64 / best / 1e9
}

fn table(cases: &[Case]) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let bw1 = bandwidth(1);
    let bwn = bandwidth(cpus);
    println!("memory bandwidth (sum of a 256 MB f32 buffer): {bw1:.1} GB/s on 1 thread, {bwn:.1} GB/s on {cpus}");
    println!("dispatched: {:?} (available: {:?})", selected_isa(), available_isas());
    let budget = Duration::from_millis(300);
    let has_avx2 = available_isas().contains(&Isa::Avx2);
    println!(
        "{:<22} {:>2} {:>7} | {:>9} {:>6} | {:>9} {:>6} | {:>9} {:>9} {:>9} | {:>6}",
        "shape",
        "m",
        "MB",
        "mlx us",
        "GB/s",
        "ours us",
        "GB/s",
        "1 thread",
        format!("{cpus} threads"),
        "avx2 1t",
        "x mlx"
    );
    for c in cases {
        let w = c.view();
        let bytes = w.weight_bytes() as f64;
        for m in [1usize, 8] {
            let key = mlx_rs::random::key(m as u64).unwrap();
            let x = mlx_rs::random::normal::<f32>(&[m as i32, c.cols as i32], None, None, &key).unwrap();
            x.eval().unwrap();
            let xv = x.as_slice::<f32>().to_vec();
            let mut y = vec![0.0f32; m * c.rows];
            let t_mlx = median(budget, || c.mlx(&x));
            let t_ours = median(budget, || qmv(&w, &xv, m, &mut y).unwrap());
            let t_1 = median(budget, || qmv_with(selected_isa(), 1, &w, &xv, m, &mut y).unwrap());
            let t_n = median(budget, || qmv_with(selected_isa(), cpus, &w, &xv, m, &mut y).unwrap());
            let t_avx2 = if has_avx2 {
                median(budget, || qmv_with(Isa::Avx2, 1, &w, &xv, m, &mut y).unwrap())
            } else {
                f64::NAN
            };
            let gbs = |t: f64| bytes / t / 1e9;
            println!(
                "{:<22} {:>2} {:>7.3} | {:>9.1} {:>6.2} | {:>9.1} {:>6.2} | {:>9.1} {:>9.1} {:>9.1} | {:>5.1}x",
                c.name,
                m,
                bytes / 1e6,
                t_mlx * 1e6,
                gbs(t_mlx),
                t_ours * 1e6,
                gbs(t_ours),
                t_1 * 1e6,
                t_n * 1e6,
                t_avx2 * 1e6,
                t_mlx / t_ours
            );
        }
    }
    // What handing a small product to the thread pool costs (or gains).
    let small = &cases[1];
    let (w, xv) = (small.view(), vec![0.5f32; small.cols]);
    let mut y = vec![0.0f32; small.rows];
    let t1 = median(budget, || qmv_with(selected_isa(), 1, &w, &xv, 1, &mut y).unwrap());
    let t2 = median(budget, || qmv_with(selected_isa(), 2, &w, &xv, 1, &mut y).unwrap());
    println!("pool: {} m=1 on 1 thread {:.1} us, on the pool (2 threads) {:.1} us", small.name, t1 * 1e6, t2 * 1e6);
    let one = Case::new("scalar check", 576, 576, 4);
    let (w, xv) = (one.view(), vec![0.5f32; 576]);
    let mut y = vec![0.0f32; 576];
    let t = median(budget, || qmv_with(Isa::Scalar, 1, &w, &xv, 1, &mut y).unwrap());
    println!("scalar reference, 576x576 4-bit m=1: {:.1} us ({:.2} GB/s)", t * 1e6, w.weight_bytes() as f64 / t / 1e9);
}

/// A decode step's matrix products in order, with distinct weights per layer
/// (SmolLM2-135M: 30 layers of q, k, v, o, gate, up, down, then the tied
/// 8-bit head), so the weights stream from L3 / memory as in a real decode.
fn decode_step(head: &Case) {
    let layer: [(&str, usize, usize); 7] = [
        ("q", 576, 576),
        ("k", 192, 576),
        ("v", 192, 576),
        ("o", 576, 576),
        ("gate", 1536, 576),
        ("up", 1536, 576),
        ("down", 576, 1536),
    ];
    let cases: Vec<Case> = (0..30).flat_map(|_| layer.iter().map(|&(n, r, c)| Case::new(n, r, c, 4))).collect();
    let bytes: usize = cases.iter().chain([head]).map(|c| c.view().weight_bytes()).sum();
    let xs: Vec<(Array, Vec<f32>)> = [576, 1536]
        .iter()
        .map(|&n| {
            let x = mlx_rs::random::normal::<f32>(&[1, n], None, None, None).unwrap();
            x.eval().unwrap();
            let v = x.as_slice::<f32>().to_vec();
            (x, v)
        })
        .collect();
    let x_for = |cols: usize| if cols == 576 { &xs[0] } else { &xs[1] };
    let mut y = vec![0.0f32; 49152];
    let ours = median(Duration::from_secs(2), || {
        for c in cases.iter().chain([head]) {
            qmv(&c.view(), &x_for(c.cols).1, 1, &mut y[..c.rows]).unwrap();
        }
    });
    let ours_1t = median(Duration::from_secs(2), || {
        for c in cases.iter().chain([head]) {
            qmv_with(selected_isa(), 1, &c.view(), &x_for(c.cols).1, 1, &mut y[..c.rows]).unwrap();
        }
    });
    let mlx = median(Duration::from_secs(2), || {
        for c in cases.iter().chain([head]) {
            c.mlx(&x_for(c.cols).0);
        }
    });
    println!(
        "decode step, all {} products at m=1 ({:.1} MB of weights): ours {:.2} ms ({:.1} GB/s, {:.0} tok/s bound), ours 1 thread {:.2} ms ({:.1} GB/s), mlx {:.2} ms ({:.1} GB/s)",
        cases.len() + 1,
        bytes as f64 / 1e6,
        ours * 1e3,
        bytes as f64 / ours / 1e9,
        1.0 / ours,
        ours_1t * 1e3,
        bytes as f64 / ours_1t / 1e9,
        mlx * 1e3,
        bytes as f64 / mlx / 1e9
    );
}

fn criterion_part(c: &mut Criterion, cases: &[Case]) {
    let mut group = c.benchmark_group("qmv");
    group.sample_size(20).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(1));
    for case in cases {
        let w = case.view();
        group.throughput(Throughput::Bytes(w.weight_bytes() as u64));
        for m in [1usize, 8] {
            let x = mlx_rs::random::normal::<f32>(&[m as i32, case.cols as i32], None, None, None).unwrap();
            x.eval().unwrap();
            let xv = x.as_slice::<f32>().to_vec();
            let mut y = vec![0.0f32; m * case.rows];
            let id = format!("{} m={m}", case.name);
            group.bench_function(BenchmarkId::new("mlx", &id), |b| b.iter(|| case.mlx(&x)));
            group.bench_function(BenchmarkId::new("ours", &id), |b| b.iter(|| qmv(&w, &xv, m, &mut y).unwrap()));
        }
    }
    group.finish();
}

fn main() {
    let cases: Vec<Case> = SHAPES.iter().map(|&(n, r, c, b)| Case::new(n, r, c, b)).collect();
    table(&cases);
    decode_step(&cases[4]);
    if std::env::var_os("QMV_TABLE_ONLY").is_none() {
        let mut c = Criterion::default().configure_from_args();
        criterion_part(&mut c, &cases);
        c.final_summary();
    }
}
