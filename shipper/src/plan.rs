//! Plans (docs/DESIGN.md, "Plans"): in what order a policy's targets are
//! served, when a segment may go to a target, and how many uploads (and
//! adoptions of lagging VMs) run at once. Pure functions: the shipper and
//! the agent call them, the tests check them.

use std::time::Duration;

/// The order a policy's targets are served in, as indexes into them: the
/// primary (index 0) first, then the secondaries with the most free space
/// first; a target that cannot tell its free space (`None`) comes after
/// every one that can; ties keep the policy's order. Segments (under
/// `cascade`) and baselines both follow it.
pub fn order(free: &[Option<u64>]) -> Vec<usize> {
    if free.is_empty() {
        return Vec::new();
    }
    let mut rest: Vec<usize> = (1..free.len()).collect();
    // Stable: equal keys keep the policy's order.
    rest.sort_by_key(|&i| (free[i].is_none(), std::cmp::Reverse(free[i].unwrap_or(0))));
    std::iter::once(0).chain(rest).collect()
}

/// A target's free space: what its filesystem reports (`file://`), and/or
/// its configured `capacity` minus what the repository holds (S3); the
/// smaller when both are known; `None` when neither is.
pub fn free_space(reported: Option<u64>, capacity: Option<u64>, used: Option<u64>) -> Option<u64> {
    let by_capacity = match (capacity, used) {
        (Some(c), Some(u)) => Some(c.saturating_sub(u)),
        _ => None,
    };
    match (reported, by_capacity) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Where a secondary of a cascading policy stands with one segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cascade {
    /// The primary has recorded the segment as shipped.
    pub primary_has: bool,
    /// How long the segment waits for a primary that lacks it.
    pub wait: Duration,
}

/// May a segment go to a target now?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// Yes.
    Now,
    /// Yes, although the primary lacks it: it waited `cascade_wait` for the
    /// primary (down or refusing) and goes to the secondary anyway.
    WithoutPrimary,
    /// Not yet: the target's own delay is not over.
    Delay,
    /// Not yet: the primary does not have it (cascade).
    Primary,
}

impl Due {
    pub fn ships(self) -> bool {
        matches!(self, Due::Now | Due::WithoutPrimary)
    }
}

/// May a segment whose newest record was written at `last_ts_ns` go, at
/// `now_ns`, to a target of delay `delay`? `cascade` is `Some` for a
/// secondary of a cascading policy: it then also needs the primary to have
/// the segment, or the segment to be `wait` old (a primary that is down
/// never stops a VM's history from leaving the host).
pub fn due(last_ts_ns: u64, delay: Duration, now_ns: u64, cascade: Option<Cascade>) -> Due {
    let age = now_ns.saturating_sub(last_ts_ns);
    if u128::from(age) < delay.as_nanos() {
        return Due::Delay;
    }
    match cascade {
        None => Due::Now,
        Some(c) if c.primary_has => Due::Now,
        Some(c) if u128::from(age) >= c.wait.as_nanos() => Due::WithoutPrimary,
        Some(_) => Due::Primary,
    }
}

/// The bytes one upload in flight is given: a backlog of large segments
/// gets more uploads than its count alone would (docs/DESIGN.md, "Plans").
pub const BYTES_PER_UPLOAD: u64 = 16 << 20;

/// Uploads in flight for a backlog of `segments` segments of `bytes` bytes
/// in all: one when caught up; more when behind, one per two segments or
/// one per [`BYTES_PER_UPLOAD`] bytes, whichever is more; never more than
/// there are segments, never over `max` (at least 1).
pub fn upload_parallelism(segments: usize, bytes: u64, max: usize) -> usize {
    let by_count = segments.div_ceil(2);
    let by_bytes = usize::try_from(bytes.div_ceil(BYTES_PER_UPLOAD)).unwrap_or(usize::MAX);
    by_count.max(by_bytes).min(segments).clamp(1, max.max(1))
}

/// The backlog one adoption (one lagging VM) is given before a second runs
/// beside it: segments, and bytes.
pub const SEGMENTS_PER_ADOPTION: u64 = 8;
pub const BYTES_PER_ADOPTION: u64 = 64 << 20;
/// The most VMs the agent adopts at once by default.
pub const MAX_ADOPTIONS: usize = 4;

/// How many lagging VMs to adopt at once, for `vms` lagging VMs whose
/// backlogs add up to `segments` segments of `bytes` bytes: one per
/// [`SEGMENTS_PER_ADOPTION`] segments or [`BYTES_PER_ADOPTION`] bytes,
/// whichever is more; never more than there are VMs, never over `max`
/// (at least 1).
pub fn adoption_parallelism(vms: usize, segments: u64, bytes: u64, max: usize) -> usize {
    let by_count = segments.div_ceil(SEGMENTS_PER_ADOPTION);
    let by_bytes = bytes.div_ceil(BYTES_PER_ADOPTION);
    let n = usize::try_from(by_count.max(by_bytes)).unwrap_or(usize::MAX);
    n.min(vms).clamp(1, max.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn the_primary_first_then_most_free_space_unknown_last() {
        assert_eq!(order(&[]), Vec::<usize>::new());
        assert_eq!(order(&[None]), [0]);
        // The primary stays first even with the least room.
        assert_eq!(order(&[Some(1), Some(5), Some(9)]), [0, 2, 1]);
        // S3 without capacity (None) after every file:// target.
        assert_eq!(order(&[Some(0), None, Some(3), Some(7)]), [0, 3, 2, 1]);
        // Ties, and several unknown, keep the policy's order.
        assert_eq!(
            order(&[None, None, Some(4), None, Some(4)]),
            [0, 2, 4, 1, 3]
        );
    }

    /// Property, over every vector of up to 6 targets with free space in
    /// {unknown, 0, 1, 2}: a permutation, the primary first, then never a
    /// target with less (or unknown) room before one with more, and equal
    /// room in policy order.
    #[test]
    fn order_is_a_sorted_permutation_for_every_small_input() {
        let values = [None, Some(0), Some(1), Some(2)];
        for len in 0..=6u32 {
            for code in 0..4usize.pow(len) {
                let free: Vec<Option<u64>> = (0..len)
                    .map(|k| values[(code / 4usize.pow(k)) % 4])
                    .collect();
                let o = order(&free);
                let mut sorted = o.clone();
                sorted.sort_unstable();
                assert_eq!(sorted, (0..free.len()).collect::<Vec<_>>(), "{free:?}");
                if let Some(first) = o.first() {
                    assert_eq!(*first, 0, "{free:?}");
                }
                for w in o.windows(2).skip(1) {
                    let key = |i: usize| (free[i].is_none(), std::cmp::Reverse(free[i]));
                    assert!(key(w[0]) <= key(w[1]), "{free:?} -> {o:?}");
                    if free[w[0]] == free[w[1]] {
                        assert!(w[0] < w[1], "ties keep policy order: {free:?} -> {o:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn free_space_from_the_filesystem_or_the_capacity() {
        assert_eq!(free_space(Some(10), None, None), Some(10));
        assert_eq!(free_space(None, Some(100), Some(30)), Some(70));
        assert_eq!(free_space(None, Some(100), Some(300)), Some(0));
        // Capacity without knowing the usage, or neither: unknown.
        assert_eq!(free_space(None, Some(100), None), None);
        assert_eq!(free_space(None, None, Some(1)), None);
        assert_eq!(free_space(Some(50), Some(100), Some(30)), Some(50));
        assert_eq!(free_space(Some(90), Some(100), Some(30)), Some(70));
    }

    #[test]
    fn a_secondary_waits_for_the_primary_then_for_its_delay() {
        let now = 1000 * S;
        let wait = Duration::from_secs(60);
        let lacks = Some(Cascade {
            primary_has: false,
            wait,
        });
        let has = Some(Cascade {
            primary_has: true,
            wait,
        });
        // Without cascade: the delay only.
        assert_eq!(due(now, Duration::ZERO, now, None), Due::Now);
        assert_eq!(due(now - S, Duration::from_secs(2), now, None), Due::Delay);
        // With: the primary first.
        assert_eq!(due(now - S, Duration::ZERO, now, lacks), Due::Primary);
        assert_eq!(due(now - S, Duration::ZERO, now, has), Due::Now);
        // And the delay still counts once the primary has it.
        assert_eq!(due(now - S, Duration::from_secs(5), now, has), Due::Delay);
        // A primary that never takes it: after `wait`, the secondary anyway.
        assert_eq!(
            due(now - 60 * S, Duration::ZERO, now, lacks),
            Due::WithoutPrimary
        );
        assert!(Due::WithoutPrimary.ships() && Due::Now.ships());
        assert!(!Due::Primary.ships() && !Due::Delay.ships());
        // A clock that went back (a record "from the future") is not due.
        assert_eq!(due(now + S, Duration::from_secs(1), now, None), Due::Delay);
    }

    /// Property over a grid: a secondary never ships what the primary lacks
    /// before `wait`, and always ships once both the wait and the delay are
    /// over.
    #[test]
    fn cascade_never_ships_ahead_of_the_primary_before_the_wait() {
        let now = 10_000 * S;
        for age_s in 0..40u64 {
            for delay_s in [0u64, 1, 5, 20] {
                for wait_s in [0u64, 3, 10, 30] {
                    for primary_has in [false, true] {
                        let c = Cascade {
                            primary_has,
                            wait: Duration::from_secs(wait_s),
                        };
                        let d = due(now - age_s * S, Duration::from_secs(delay_s), now, Some(c));
                        if !primary_has && age_s < wait_s {
                            assert!(!d.ships(), "{age_s} {delay_s} {wait_s}: {d:?}");
                        }
                        if age_s < delay_s {
                            assert_eq!(d, Due::Delay);
                        }
                        if age_s >= delay_s && (primary_has || age_s >= wait_s) {
                            assert!(d.ships(), "{age_s} {delay_s} {wait_s} {primary_has}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn parallelism_scales_with_count_and_bytes() {
        const M: u64 = 1 << 20;
        assert_eq!(upload_parallelism(0, 0, 8), 1);
        assert_eq!(upload_parallelism(1, 1, 8), 1);
        assert_eq!(upload_parallelism(2, 2 * M, 8), 1);
        assert_eq!(upload_parallelism(5, 5 * M, 8), 3);
        assert_eq!(upload_parallelism(100, 100 * M, 8), 8);
        assert_eq!(upload_parallelism(100, 0, 0), 1);
        // Few but large segments: one upload each, up to the bound.
        assert_eq!(upload_parallelism(4, 4 * 64 * M, 8), 4);
        assert_eq!(upload_parallelism(2, 2 * 64 * M, 8), 2);
        // Many small ones: by count.
        assert_eq!(upload_parallelism(12, 12 * 4096, 8), 6);
    }

    /// Property over a grid: at least 1, at most `max` (or 1), at most the
    /// segment count (or 1), and never fewer uploads for more work.
    #[test]
    fn parallelism_is_bounded_and_monotone() {
        for max in 0..10usize {
            for n in 0..40usize {
                for mib in [0u64, 1, 15, 16, 17, 100, 1000] {
                    let bytes = mib << 20;
                    let p = upload_parallelism(n, bytes, max);
                    assert!(
                        p >= 1 && p <= max.max(1) && p <= n.max(1),
                        "{n} {bytes} {max}: {p}"
                    );
                    assert!(upload_parallelism(n + 1, bytes, max) >= p);
                    assert!(upload_parallelism(n, bytes + (16 << 20), max) >= p);
                }
            }
        }
    }

    #[test]
    fn adoptions_scale_with_the_hosts_backlog() {
        assert_eq!(adoption_parallelism(0, 0, 0, 4), 1);
        assert_eq!(adoption_parallelism(3, 3, 3 << 20, 4), 1);
        assert_eq!(adoption_parallelism(3, 20, 1 << 20, 4), 3);
        assert_eq!(adoption_parallelism(10, 200, 0, 4), 4);
        assert_eq!(adoption_parallelism(2, 2, 1 << 30, 4), 2);
        for vms in 0..8usize {
            for segs in 0..50u64 {
                for mib in [0u64, 10, 64, 65, 500] {
                    let p = adoption_parallelism(vms, segs, mib << 20, 4);
                    assert!((1..=4).contains(&p) && p <= vms.max(1));
                    assert!(adoption_parallelism(vms, segs + 1, mib << 20, 4) >= p);
                    assert!(adoption_parallelism(vms + 1, segs, mib << 20, 4) >= p);
                }
            }
        }
    }
}
