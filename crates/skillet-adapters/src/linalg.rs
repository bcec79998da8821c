//! Small dense linear algebra in f64 for combining adapters: a thin
//! Householder QR and a one-sided Jacobi SVD. The matrices are an
//! adapter's factors (one side a few ranks wide), so plain loops suffice.

/// A row-major matrix.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Mat {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f64>,
}

impl Mat {
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Self {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        }
    }

    pub fn at(&self, r: usize, c: usize) -> f64 {
        self.data[r * self.cols + c]
    }

    fn set(&mut self, r: usize, c: usize, v: f64) {
        self.data[r * self.cols + c] = v;
    }

    pub fn transpose(&self) -> Self {
        let mut t = Self::zeros(self.cols, self.rows);
        for r in 0..self.rows {
            for c in 0..self.cols {
                t.set(c, r, self.at(r, c));
            }
        }
        t
    }

    pub fn matmul(&self, other: &Self) -> Self {
        assert_eq!(self.cols, other.rows, "matmul shapes");
        let mut out = Self::zeros(self.rows, other.cols);
        for r in 0..self.rows {
            for k in 0..self.cols {
                let a = self.at(r, k);
                if a == 0.0 {
                    continue;
                }
                let row = &other.data[k * other.cols..(k + 1) * other.cols];
                let dst = &mut out.data[r * other.cols..(r + 1) * other.cols];
                for (d, &b) in dst.iter_mut().zip(row) {
                    *d += a * b;
                }
            }
        }
        out
    }
}

/// The thin QR of `m` (`rows × cols`): `Q` (`rows × k`, orthonormal
/// columns) and `R` (`k × cols`, upper triangular), `k = min(rows, cols)`.
pub(crate) fn qr(m: &Mat) -> (Mat, Mat) {
    let (rows, cols) = (m.rows, m.cols);
    let k = rows.min(cols);
    let mut a = m.clone();
    let mut reflectors: Vec<Vec<f64>> = Vec::with_capacity(k);
    for j in 0..k {
        let norm = (j..rows).map(|i| a.at(i, j).powi(2)).sum::<f64>().sqrt();
        if norm == 0.0 {
            reflectors.push(Vec::new());
            continue;
        }
        let alpha = if a.at(j, j) > 0.0 { -norm } else { norm };
        let mut v: Vec<f64> = (j..rows).map(|i| a.at(i, j)).collect();
        v[0] -= alpha;
        let vn = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        v.iter_mut().for_each(|x| *x /= vn);
        reflect(&mut a, &v, j, j);
        reflectors.push(v);
    }
    let mut r = Mat::zeros(k, cols);
    for i in 0..k {
        for c in i..cols {
            r.set(i, c, a.at(i, c));
        }
    }
    let mut q = Mat::zeros(rows, k);
    for i in 0..k {
        q.set(i, i, 1.0);
    }
    for (j, v) in reflectors.iter().enumerate().rev() {
        if !v.is_empty() {
            reflect(&mut q, v, j, 0);
        }
    }
    (q, r)
}

/// Applies `I − 2vvᵀ` to rows `from..` of `m`, columns `col..`.
fn reflect(m: &mut Mat, v: &[f64], from: usize, col: usize) {
    for c in col..m.cols {
        let dot: f64 = v
            .iter()
            .enumerate()
            .map(|(i, x)| x * m.at(from + i, c))
            .sum();
        for (i, x) in v.iter().enumerate() {
            let cur = m.at(from + i, c);
            m.set(from + i, c, cur - 2.0 * x * dot);
        }
    }
}

/// The SVD of `m` (`rows × cols`) by one-sided Jacobi rotations:
/// `U` (`rows × cols`), the singular values (descending) and `V`
/// (`cols × cols`), with `m = U·diag(s)·Vᵀ`. Columns of `U` for zero
/// singular values are zero.
pub(crate) fn svd(m: &Mat) -> (Mat, Vec<f64>, Mat) {
    let (rows, cols) = (m.rows, m.cols);
    let mut w = m.clone();
    let mut v = Mat::zeros(cols, cols);
    for i in 0..cols {
        v.set(i, i, 1.0);
    }
    for _sweep in 0..80 {
        let mut rotated = false;
        for p in 0..cols {
            for q in p + 1..cols {
                let (mut alpha, mut beta, mut gamma) = (0.0, 0.0, 0.0);
                for i in 0..rows {
                    let (x, y) = (w.at(i, p), w.at(i, q));
                    alpha += x * x;
                    beta += y * y;
                    gamma += x * y;
                }
                if gamma == 0.0 || gamma.abs() <= 1e-15 * (alpha * beta).sqrt() {
                    continue;
                }
                rotated = true;
                let zeta = (beta - alpha) / (2.0 * gamma);
                let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                let c = 1.0 / (1.0 + t * t).sqrt();
                let s = c * t;
                for mat in [&mut w, &mut v] {
                    for i in 0..mat.rows {
                        let (x, y) = (mat.at(i, p), mat.at(i, q));
                        mat.set(i, p, c * x - s * y);
                        mat.set(i, q, s * x + c * y);
                    }
                }
            }
        }
        if !rotated {
            break;
        }
    }
    let norms: Vec<f64> = (0..cols)
        .map(|c| (0..rows).map(|i| w.at(i, c).powi(2)).sum::<f64>().sqrt())
        .collect();
    let mut order: Vec<usize> = (0..cols).collect();
    order.sort_by(|&a, &b| norms[b].total_cmp(&norms[a]));
    let mut u = Mat::zeros(rows, cols);
    let mut vs = Mat::zeros(cols, cols);
    let mut s = Vec::with_capacity(cols);
    for (k, &c) in order.iter().enumerate() {
        s.push(norms[c]);
        for i in 0..rows {
            let x = if norms[c] > 0.0 {
                w.at(i, c) / norms[c]
            } else {
                0.0
            };
            u.set(i, k, x);
        }
        for i in 0..cols {
            vs.set(i, k, v.at(i, c));
        }
    }
    (u, s, vs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(rows: usize, cols: usize, seed: u64) -> Mat {
        let mut x = seed;
        let data = (0..rows * cols)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
            })
            .collect();
        Mat { rows, cols, data }
    }

    fn max_diff(a: &Mat, b: &Mat) -> f64 {
        a.data
            .iter()
            .zip(&b.data)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    }

    fn identity(n: usize) -> Mat {
        let mut m = Mat::zeros(n, n);
        (0..n).for_each(|i| m.set(i, i, 1.0));
        m
    }

    #[test]
    fn qr_reconstructs_with_orthonormal_q() {
        for (rows, cols) in [(9, 4), (4, 9), (6, 6)] {
            let m = sample(rows, cols, 3);
            let (q, r) = qr(&m);
            assert!(max_diff(&q.matmul(&r), &m) < 1e-12);
            let k = rows.min(cols);
            assert!(max_diff(&q.transpose().matmul(&q), &identity(k)) < 1e-12);
            for i in 0..k {
                for c in 0..i.min(cols) {
                    assert_eq!(r.at(i, c), 0.0);
                }
            }
        }
    }

    #[test]
    fn svd_reconstructs_and_orders() {
        // A rank-2 matrix padded to 5 columns: three zero singular values.
        let low = sample(7, 2, 5).matmul(&sample(2, 5, 6));
        for m in [sample(7, 5, 4), sample(3, 5, 8), low] {
            let (u, s, v) = svd(&m);
            let mut us = u.clone();
            for i in 0..us.rows {
                for (k, sk) in s.iter().enumerate() {
                    us.set(i, k, u.at(i, k) * sk);
                }
            }
            assert!(max_diff(&us.matmul(&v.transpose()), &m) < 1e-12);
            assert!(s.windows(2).all(|w| w[0] >= w[1]));
            assert!(max_diff(&v.transpose().matmul(&v), &identity(m.cols)) < 1e-12);
        }
    }
}
