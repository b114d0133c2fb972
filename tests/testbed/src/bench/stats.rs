//! Percentiles and the number formats the report uses.

/// Nearest-rank percentile (`p` in 0..=100); NaN for no values.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * s.len() as f64).ceil().max(1.0) as usize;
    s[rank.min(s.len()) - 1]
}

pub fn median(v: &[f64]) -> f64 {
    percentile(v, 50.0)
}

/// `(min, max)`; `(inf, -inf)` for no values.
pub fn min_max(v: &[f64]) -> (f64, f64) {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (min, max)
}

/// Seconds as milliseconds with one decimal, `–` for NaN.
pub fn ms(x: f64) -> String {
    if x.is_nan() {
        "–".into()
    } else {
        format!("{:.1} ms", x * 1000.0)
    }
}

/// Seconds with one decimal, `–` for NaN.
pub fn secs(x: f64) -> String {
    if x.is_nan() {
        "–".into()
    } else {
        format!("{x:.1} s")
    }
}

pub fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 10.0);
        assert_eq!(percentile(&v, 99.0), 20.0);
        assert_eq!(percentile(&[3.0], 99.0), 3.0);
        assert!(percentile(&[], 50.0).is_nan());
    }
}
