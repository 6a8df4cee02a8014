//! MLX's active-memory counter is process-wide, so this test has a test
//! binary of its own: no other test allocates while it measures.

use kvserve::mlx::{self, Array};
use mlx_rs::ops;

#[test]
fn ten_thousand_ops_leave_active_memory_unchanged() {
    let a = Array::from_slice(&[1.5f32; 4096], &[64, 64]);
    let b = Array::from_slice(&[0.5f32; 4096], &[64, 64]);
    // Warm up once so allocator bookkeeping is settled before measuring.
    let warm = ops::add(&a, &b).unwrap().matmul(&b).unwrap();
    warm.eval().unwrap();
    drop(warm);
    let before = mlx::active_memory().unwrap();
    for _ in 0..10_000 {
        let c = ops::add(&a, &b).unwrap().matmul(&b).unwrap();
        c.eval().unwrap();
    }
    let after = mlx::active_memory().unwrap();
    assert_eq!(after, before, "active memory grew from {before} to {after} bytes");
    // And the loop did allocate: one live result is visible in the counter.
    let c = ops::add(&a, &b).unwrap();
    c.eval().unwrap();
    assert!(mlx::active_memory().unwrap() >= before + 4096 * 4);
}
