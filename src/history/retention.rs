//! How long earlier versions stay: the retention policies and [`prune`], the
//! pure function that picks which versions of a folder's history to drop.
//!
//! The rules, applied in order:
//! 1. Nothing superseded less than [`PROTECTED_SECS`] (an hour) ago is ever
//!    pruned, by any rule: a burst of edits can always be undone.
//! 2. Versions at least the maximum age old are pruned (no maximum: forever).
//! 3. `staggered` thins each path's versions independently, as Syncthing does:
//!    by age, a version falls in an hour, day or week; these are calendar
//!    buckets (Unix time divided by the bucket length, so a bucket keeps its
//!    members as time passes), and the newest version of each bucket is kept
//!    (ties: the higher id). Up to a day old, one per hour; up to 30 days, one
//!    per day; then one per week.
//! 4. With a size cap, while the versions kept add up to more than it, the
//!    oldest (ties: the lower id) are pruned first, whatever their path.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::relpath::RelPath;

/// Versions younger than this (seconds) are never pruned.
pub const PROTECTED_SECS: i64 = 3600;
const HOUR: i64 = 3600;
const DAY: i64 = 86_400;
const WEEK: i64 = 7 * DAY;
/// Up to this age (seconds) `staggered` keeps one version per day, then one per week.
pub const DAILY_UNTIL_SECS: i64 = 30 * DAY;

/// How a folder's earlier versions are thinned out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Retention {
    /// Every version, until the maximum age.
    KeepAll,
    /// Every version for an hour, then one per hour for a day, one per day for
    /// 30 days, one per week until the maximum age.
    #[default]
    Staggered,
}

impl Retention {
    /// The name used in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            Retention::KeepAll => "keep-all",
            Retention::Staggered => "staggered",
        }
    }
}

/// A folder's history settings, resolved from the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// How versions are thinned out.
    pub retention: Retention,
    /// Versions this old are pruned; `None` keeps them forever.
    pub max_age: Option<Duration>,
    /// Cap on the folder's history in bytes; `None` for no cap.
    pub max_bytes: Option<u64>,
    /// Whether versions replaced by local edits are kept too (for the scanner;
    /// [`prune`] ignores it).
    pub keep_local: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            retention: Retention::Staggered,
            max_age: Some(Duration::from_secs(365 * DAY as u64)),
            max_bytes: None,
            keep_local: false,
        }
    }
}

/// What [`prune`] needs to know of a version in the history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionInfo {
    /// Its row id.
    pub id: i64,
    /// The path it was at.
    pub path: RelPath,
    /// When it was replaced or deleted (Unix seconds).
    pub superseded_at: i64,
    /// Its size in bytes.
    pub size: u64,
}

/// The staggered bucket of a version superseded at `at`, `age` seconds ago:
/// (bucket length, bucket number). `None` for the first hour, which is kept.
fn bucket(age: i64, at: i64) -> Option<(i64, i64)> {
    let len = match age {
        a if a < PROTECTED_SECS => return None,
        a if a < DAY => HOUR,
        a if a < DAILY_UNTIL_SECS => DAY,
        _ => WEEK,
    };
    Some((len, at.div_euclid(len)))
}

/// The ids of the versions of one folder's history to prune at `now` (Unix
/// seconds) under `policy`, in ascending order. See the module doc for the rules.
pub fn prune(versions: &[VersionInfo], now: i64, policy: &Policy) -> Vec<i64> {
    let max_age = policy
        .max_age
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let age = |v: &VersionInfo| now.saturating_sub(v.superseded_at).max(0);
    let mut pruned = BTreeSet::new();
    // Per (path, bucket), the newest version so far.
    let mut newest: HashMap<(&RelPath, (i64, i64)), &VersionInfo> = HashMap::new();
    for v in versions {
        let a = age(v);
        if a < PROTECTED_SECS {
            continue;
        }
        if max_age.is_some_and(|m| a >= m) {
            pruned.insert(v.id);
            continue;
        }
        if policy.retention == Retention::KeepAll {
            continue;
        }
        let Some(b) = bucket(a, v.superseded_at) else {
            continue;
        };
        match newest.get_mut(&(&v.path, b)) {
            None => {
                newest.insert((&v.path, b), v);
            }
            Some(kept) => {
                if (v.superseded_at, v.id) > (kept.superseded_at, kept.id) {
                    pruned.insert(kept.id);
                    *kept = v;
                } else {
                    pruned.insert(v.id);
                }
            }
        }
    }
    if let Some(cap) = policy.max_bytes {
        let mut kept: Vec<&VersionInfo> = versions
            .iter()
            .filter(|v| !pruned.contains(&v.id))
            .collect();
        let mut total: u64 = kept.iter().map(|v| v.size).fold(0, u64::saturating_add);
        kept.sort_by_key(|v| (v.superseded_at, v.id));
        for v in kept {
            if total <= cap {
                break;
            }
            if age(v) >= PROTECTED_SECS {
                pruned.insert(v.id);
                total -= v.size;
            }
        }
    }
    pruned.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NOW: i64 = 1_800_000_000;

    fn v(id: i64, path: &str, superseded_at: i64, size: u64) -> VersionInfo {
        VersionInfo {
            id,
            path: RelPath::new(path).unwrap(),
            superseded_at,
            size,
        }
    }

    fn policy(retention: Retention, max_age_days: u64, max_bytes: Option<u64>) -> Policy {
        Policy {
            retention,
            max_age: (max_age_days > 0).then(|| Duration::from_secs(max_age_days * DAY as u64)),
            max_bytes,
            keep_local: false,
        }
    }

    fn kept<'a>(versions: &'a [VersionInfo], pruned: &[i64]) -> Vec<&'a VersionInfo> {
        versions
            .iter()
            .filter(|v| !pruned.contains(&v.id))
            .collect()
    }

    #[test]
    fn staggered_keeps_every_version_of_the_last_hour_then_one_per_hour_day_and_week() {
        // One version every 10 minutes for 90 days.
        let versions: Vec<_> = (0..90 * 144)
            .map(|i| v(i, "a.txt", NOW - i * 600, 1))
            .collect();
        let pruned = prune(&versions, NOW, &Policy::default());
        let ages: Vec<i64> = kept(&versions, &pruned)
            .iter()
            .map(|v| NOW - v.superseded_at)
            .collect();
        let count = |lo: i64, hi: i64| ages.iter().filter(|a| (lo..hi).contains(a)).count();
        assert_eq!(count(0, HOUR), 6);
        // Hour buckets are calendar hours, so the partial ones at both ends of
        // the range each keep a version too.
        assert!(
            (23..=24).contains(&count(HOUR, DAY)),
            "{}",
            count(HOUR, DAY)
        );
        assert!((29..=30).contains(&count(DAY, 30 * DAY)));
        assert!((8..=10).contains(&count(30 * DAY, 90 * DAY)));
    }

    #[test]
    fn versions_past_the_maximum_age_are_pruned_under_either_policy() {
        let versions = [v(1, "a", NOW - 10 * DAY, 1), v(2, "a", NOW - 2 * DAY, 1)];
        for r in [Retention::KeepAll, Retention::Staggered] {
            assert_eq!(prune(&versions, NOW, &policy(r, 5, None)), vec![1]);
            assert!(prune(&versions, NOW, &policy(r, 0, None)).is_empty());
        }
    }

    #[test]
    fn the_size_cap_prunes_the_oldest_first_across_paths() {
        let versions = [
            v(1, "a", NOW - 5 * DAY, 100),
            v(2, "b", NOW - 4 * DAY, 100),
            v(3, "a", NOW - 3 * DAY, 100),
            v(4, "b", NOW - 60, 100),
        ];
        let p = policy(Retention::KeepAll, 0, Some(250));
        assert_eq!(prune(&versions, NOW, &p), vec![1, 2]);
        // The last hour is kept even over the cap.
        let p = policy(Retention::KeepAll, 0, Some(0));
        assert_eq!(prune(&versions, NOW, &p), vec![1, 2, 3]);
    }

    #[test]
    fn paths_are_thinned_independently() {
        let versions = [
            v(1, "a", NOW - 3 * DAY, 1),
            v(2, "b", NOW - 3 * DAY, 1),
            v(3, "a", NOW - 3 * DAY + 1, 1),
        ];
        assert_eq!(prune(&versions, NOW, &Policy::default()), vec![1]);
    }

    fn versions() -> impl Strategy<Value = Vec<VersionInfo>> {
        let one = (
            prop::sample::select(vec!["a", "b", "dir/c"]),
            // Ages up to 400 days, some in the future (clock changes).
            -3600i64..400 * DAY,
            0u64..10_000,
        );
        prop::collection::vec(one, 0..80).prop_map(|vs| {
            vs.into_iter()
                .enumerate()
                .map(|(i, (path, age, size))| v(i as i64 + 1, path, NOW - age, size))
                .collect()
        })
    }

    fn any_policy() -> impl Strategy<Value = Policy> {
        (
            prop::sample::select(vec![Retention::KeepAll, Retention::Staggered]),
            0u64..500,
            prop::option::of(0u64..200_000),
        )
            .prop_map(|(r, days, cap)| policy(r, days, cap))
    }

    /// The bucket a version must share with no other kept version of its path.
    fn expected_bucket(v: &VersionInfo) -> Option<(i64, i64)> {
        let age = NOW - v.superseded_at;
        let len = if age < HOUR {
            return None;
        } else if age < DAY {
            HOUR
        } else if age < 30 * DAY {
            DAY
        } else {
            WEEK
        };
        Some((len, v.superseded_at.div_euclid(len)))
    }

    proptest! {
        #[test]
        fn nothing_younger_than_an_hour_is_pruned(vs in versions(), p in any_policy()) {
            let pruned = prune(&vs, NOW, &p);
            for v in &vs {
                if NOW - v.superseded_at < HOUR {
                    prop_assert!(!pruned.contains(&v.id), "{v:?}");
                }
            }
        }

        #[test]
        fn the_result_does_not_depend_on_the_order_of_the_input(
            vs in versions(), p in any_policy(), seed in any::<u64>()
        ) {
            let mut shuffled = vs.clone();
            // A deterministic shuffle.
            let n = shuffled.len();
            for i in 0..n {
                let j = (seed.wrapping_mul(i as u64 + 7) % n as u64) as usize;
                shuffled.swap(i, j);
            }
            prop_assert_eq!(prune(&vs, NOW, &p), prune(&shuffled, NOW, &p));
        }

        #[test]
        fn staggered_keeps_at_most_one_version_per_path_and_bucket(
            vs in versions(), days in 0u64..500, cap in prop::option::of(0u64..200_000)
        ) {
            let p = policy(Retention::Staggered, days, cap);
            let pruned = prune(&vs, NOW, &p);
            let mut seen = std::collections::HashSet::new();
            for v in kept(&vs, &pruned) {
                if let Some(b) = expected_bucket(v) {
                    prop_assert!(seen.insert((v.path.clone(), b)), "two kept in {b:?}: {v:?}");
                }
            }
        }

        #[test]
        fn the_size_cap_holds_unless_only_the_last_hour_is_left(
            vs in versions(), p in any_policy()
        ) {
            let pruned = prune(&vs, NOW, &p);
            if let Some(cap) = p.max_bytes {
                let k = kept(&vs, &pruned);
                let total: u64 = k.iter().map(|v| v.size).sum();
                let all_protected = k.iter().all(|v| NOW - v.superseded_at < HOUR);
                prop_assert!(total <= cap || all_protected, "{total} > {cap}");
            }
        }

        #[test]
        fn the_size_cap_takes_the_oldest_and_no_more_than_needed(
            vs in versions(), cap in 0u64..200_000
        ) {
            let p = policy(Retention::KeepAll, 0, Some(cap));
            let pruned = prune(&vs, NOW, &p);
            let mut old: Vec<&VersionInfo> =
                vs.iter().filter(|v| NOW - v.superseded_at >= HOUR).collect();
            old.sort_by_key(|v| (v.superseded_at, v.id));
            let mut total: u64 = vs.iter().map(|v| v.size).sum();
            let mut expected: Vec<i64> = Vec::new();
            for v in old {
                if total <= cap {
                    break;
                }
                expected.push(v.id);
                total -= v.size;
            }
            expected.sort();
            prop_assert_eq!(pruned, expected);
        }

        #[test]
        fn keep_all_without_maximum_age_or_cap_prunes_nothing(vs in versions()) {
            prop_assert!(prune(&vs, NOW, &policy(Retention::KeepAll, 0, None)).is_empty());
        }

        #[test]
        fn pruning_again_at_the_same_time_prunes_nothing(vs in versions(), p in any_policy()) {
            let pruned = prune(&vs, NOW, &p);
            let rest: Vec<VersionInfo> = kept(&vs, &pruned).into_iter().cloned().collect();
            prop_assert!(prune(&rest, NOW, &p).is_empty());
        }
    }
}
