//! The small statistics the detectors share: an EWMA of mean and variance, and time buckets.

use serde::{Deserialize, Serialize};

pub(crate) const HOUR_US: i64 = 3_600_000_000;

/// Exponentially weighted mean and variance (West's incremental form).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Ewma {
    pub mean: f64,
    pub var: f64,
    /// Updates seen (saturating).
    pub n: u32,
}

impl Ewma {
    pub fn update(&mut self, x: f64, alpha: f64) {
        if self.n == 0 {
            self.mean = x;
            self.var = 0.0;
        } else {
            let d = x - self.mean;
            self.mean += alpha * d;
            self.var = (1.0 - alpha) * (self.var + alpha * d * d);
        }
        self.n = self.n.saturating_add(1);
    }

    /// `k` updates with the value 0 at once (idle buckets), in closed form for the mean.
    pub fn update_zeros(&mut self, k: u64, alpha: f64) {
        if k == 0 {
            return;
        }
        if k <= 4 {
            for _ in 0..k {
                self.update(0.0, alpha);
            }
            return;
        }
        let keep = (1.0 - alpha).powf(k as f64);
        let before = self.mean;
        self.mean *= keep;
        // The variance decays too, and gains the spread of the drop towards zero.
        self.var = self.var * keep + (before - self.mean).powi(2) * alpha;
        self.n = self.n.saturating_add(u32::try_from(k).unwrap_or(u32::MAX));
    }
}

/// The bucket index of a time: `floor(at / width)`.
pub(crate) fn bucket_of(at_us: i64, width_us: i64) -> i64 {
    at_us.div_euclid(width_us.max(1))
}

/// Hour of the week in UTC, 0 = Monday 00:00–01:00 (the epoch was a Thursday).
pub(crate) fn hour_of_week(hour_index: i64) -> usize {
    usize::try_from((hour_index + 72).rem_euclid(168)).unwrap_or(0)
}

/// Pushes `id` onto `ids` while fewer than `max` are kept.
pub(crate) fn cite(ids: &mut Vec<String>, id: &str, max: usize) {
    if ids.len() < max {
        ids.push(id.to_owned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hour_of_week_starts_monday() {
        // 2024-01-01 00:00 UTC was a Monday: 1704067200 s.
        let monday = 1_704_067_200_i64 * 1_000_000 / HOUR_US;
        assert_eq!(hour_of_week(monday), 0);
        assert_eq!(hour_of_week(monday + 24 + 5), 29);
        assert_eq!(hour_of_week(monday - 1), 167);
    }

    #[test]
    fn ewma_converges_and_decays() {
        let mut e = Ewma::default();
        for _ in 0..200 {
            e.update(10.0, 0.1);
        }
        assert!((e.mean - 10.0).abs() < 1e-9 && e.var < 1e-9);
        let mut a = e;
        a.update_zeros(10, 0.1);
        let mut b = e;
        for _ in 0..10 {
            b.update(0.0, 0.1);
        }
        assert!((a.mean - b.mean).abs() < 1e-9);
    }
}

/// Serde for maps with tuple keys (JSON objects take only string keys): a list of pairs.
pub(crate) mod entries {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer, K: Serialize, V: Serialize>(map: &BTreeMap<K, V>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(map.iter())
    }

    pub fn deserialize<'de, D, K, V>(d: D) -> Result<BTreeMap<K, V>, D::Error>
    where
        D: Deserializer<'de>,
        K: Deserialize<'de> + Ord,
        V: Deserialize<'de>,
    {
        Ok(Vec::<(K, V)>::deserialize(d)?.into_iter().collect())
    }
}
