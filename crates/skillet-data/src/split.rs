//! Train/validation split by fraction with a fixed seed.

use skillet_models::Rng;

/// Splits `0..n` into (train, validation) indices: `fraction` of them (at
/// least one when `fraction > 0` and `n > 1`) go to validation, chosen by a
/// seeded shuffle; both lists keep file order.
pub fn split_fraction(n: usize, fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = Rng::new(seed);
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    let k = if fraction <= 0.0 || n < 2 {
        0
    } else {
        ((n as f64 * fraction).round() as usize).clamp(1, n - 1)
    };
    let mut val: Vec<usize> = order[..k].to_vec();
    let mut train: Vec<usize> = order[k..].to_vec();
    val.sort_unstable();
    train.sort_unstable();
    (train, val)
}

#[cfg(test)]
mod tests {
    #[test]
    fn split_is_seeded_disjoint_and_complete() {
        let (t, v) = super::split_fraction(100, 0.2, 7);
        assert_eq!(v.len(), 20);
        assert_eq!(t.len(), 80);
        let mut all = [t.clone(), v.clone()].concat();
        all.sort_unstable();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
        assert_eq!(super::split_fraction(100, 0.2, 7), (t, v.clone()));
        assert_ne!(super::split_fraction(100, 0.2, 8).1, v);
    }
}
