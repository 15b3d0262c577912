//! Backup retention: which backups a "keep N daily, M weekly" policy lets go (pure, no I/O).

use std::collections::HashSet;
use time::OffsetDateTime;
use uuid::Uuid;

/// The backups that the retention policy does not keep, oldest first.
///
/// `backups` holds `(id, created_at)` with `created_at` in Unix seconds, read
/// as UTC. The rules, in the manner of restic's `forget --keep-daily/--keep-weekly`:
///
/// - the newest backup is always kept, whatever the policy (`0/0` keeps it alone);
/// - `keep_daily = N`: of the N most recent UTC calendar days *that have a
///   backup* (days without one do not use up a slot), the newest backup of
///   each day is kept;
/// - `keep_weekly = M`: the same per ISO 8601 week (ISO year and week number,
///   so 2027-01-01 belongs to 2026-W53), for the M most recent weeks with a backup;
/// - the two rules are applied independently to the whole list: a week whose
///   newest backup the daily rule already keeps still uses one weekly slot,
///   and a backup kept by both rules is simply kept;
/// - everything else is prunable.
///
/// "Newest" orders by `created_at`, then by id (keyward's backup ids are
/// UUIDv7, so among equal seconds the larger id is the later one). The input
/// order does not matter. The result is in ascending `created_at` (then id).
/// A `created_at` that `time` cannot represent as a date (beyond year ±9999)
/// is never pruned: deleting a backup on a guess is worse than keeping it.
/// An id listed twice is pruned only if none of its entries is kept.
pub fn prunable(backups: &[(Uuid, i64)], keep_daily: u32, keep_weekly: u32) -> Vec<Uuid> {
    // Newest first.
    let mut newest_first: Vec<(Uuid, i64)> = backups.to_vec();
    newest_first.sort_by_key(|(id, created_at)| std::cmp::Reverse((*created_at, *id)));

    let mut kept: HashSet<Uuid> = HashSet::new();
    if let Some((id, _)) = newest_first.first() {
        kept.insert(*id);
    }
    let mut days = HashSet::new();
    let mut weeks = HashSet::new();
    for (id, created_at) in &newest_first {
        let Ok(when) = OffsetDateTime::from_unix_timestamp(*created_at) else {
            kept.insert(*id);
            continue;
        };
        let date = when.date();
        // The first backup met of a day (or week) is its newest.
        if days.len() < keep_daily as usize && days.insert(date) {
            kept.insert(*id);
        }
        let (iso_year, iso_week, _) = date.to_iso_week_date();
        if weeks.len() < keep_weekly as usize && weeks.insert((iso_year, iso_week)) {
            kept.insert(*id);
        }
    }

    let mut out: Vec<(Uuid, i64)> = newest_first
        .into_iter()
        .filter(|(id, _)| !kept.contains(id))
        .collect();
    out.sort_by_key(|(id, created_at)| (*created_at, *id));
    let mut listed = HashSet::new();
    out.into_iter()
        .filter(|(id, _)| listed.insert(*id))
        .map(|(id, _)| id)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn at(t: OffsetDateTime) -> i64 {
        t.unix_timestamp()
    }

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    /// Ids of the entries whose index is not in `kept`, in input order
    /// (inputs below are built in ascending time).
    fn all_but(backups: &[(Uuid, i64)], kept: &[usize]) -> Vec<Uuid> {
        backups
            .iter()
            .enumerate()
            .filter(|(i, _)| !kept.contains(i))
            .map(|(_, (id, _))| *id)
            .collect()
    }

    /// A deterministic xorshift shuffle (no test-only RNG dependency).
    fn shuffled(v: &[(Uuid, i64)], seed: u64) -> Vec<(Uuid, i64)> {
        let mut v = v.to_vec();
        let mut s = seed | 1;
        for i in (1..v.len()).rev() {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let j = (s % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
        v
    }

    #[test]
    fn empty_and_single() {
        assert!(prunable(&[], 7, 4).is_empty());
        assert!(prunable(&[], 0, 0).is_empty());
        let one = [(id(1), at(datetime!(2026-03-01 10:00 UTC)))];
        assert!(prunable(&one, 7, 4).is_empty());
        assert!(prunable(&one, 0, 0).is_empty());
    }

    #[test]
    fn zero_zero_keeps_only_the_newest() {
        let b: Vec<_> = (0..5)
            .map(|i| {
                (
                    id(i + 1),
                    at(datetime!(2026-03-01 00:00 UTC)) + 86_400 * i as i64,
                )
            })
            .collect();
        assert_eq!(prunable(&b, 0, 0), all_but(&b, &[4]));
    }

    #[test]
    fn three_a_day_for_ten_days_daily_seven() {
        let start = at(datetime!(2026-05-01 00:00 UTC));
        let mut b = Vec::new();
        for day in 0..10i64 {
            for (k, hour) in [1i64, 9, 17].into_iter().enumerate() {
                let n = (day * 3 + k as i64 + 1) as u128;
                b.push((id(n), start + day * 86_400 + hour * 3_600));
            }
        }
        // The 17:00 backup (index 3*day+2) of each of days 3..=9 is kept.
        let kept: Vec<usize> = (3..10).map(|d| d * 3 + 2).collect();
        let got = prunable(&b, 7, 0);
        assert_eq!(got, all_but(&b, &kept));
        assert_eq!(got.len(), 30 - 7);
    }

    #[test]
    fn days_without_backups_use_no_slot() {
        // Backups on March 1, 2, 10, 11 and 20 (gaps); keep 3 days: the
        // three most recent days that have a backup, however far back.
        let days = [1u8, 2, 10, 11, 20];
        let b: Vec<_> = days
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let t = time::Date::from_calendar_date(2026, time::Month::March, *d)
                    .unwrap()
                    .midnight()
                    .assume_utc();
                (id(i as u128 + 1), at(t) + 3_600)
            })
            .collect();
        assert_eq!(prunable(&b, 3, 0), all_but(&b, &[2, 3, 4]));
        // More days asked than exist: nothing is pruned.
        assert!(prunable(&b, 30, 0).is_empty());
    }

    #[test]
    fn iso_week_spans_the_year_end() {
        // 2026-12-28 (Mon) .. 2027-01-03 (Sun) is ISO week 2026-W53.
        let b = vec![
            (id(1), at(datetime!(2026-12-21 12:00 UTC))), // 2026-W52
            (id(2), at(datetime!(2026-12-28 12:00 UTC))), // 2026-W53
            (id(3), at(datetime!(2026-12-31 12:00 UTC))), // 2026-W53
            (id(4), at(datetime!(2027-01-01 12:00 UTC))), // 2026-W53, newest of it
            (id(5), at(datetime!(2027-01-04 12:00 UTC))), // 2027-W01
        ];
        assert_eq!(
            datetime!(2027-01-01 12:00 UTC).date().to_iso_week_date(),
            (2026, 53, time::Weekday::Friday)
        );
        // Two weeks: 2027-W01 (id 5) and 2026-W53, whose newest is Jan 1 —
        // not Dec 31, which a calendar-year week would have picked.
        assert_eq!(prunable(&b, 0, 2), vec![id(1), id(2), id(3)]);
        assert_eq!(prunable(&b, 0, 3), vec![id(2), id(3)]);
    }

    #[test]
    fn leap_day_is_its_own_day() {
        let b = vec![
            (id(1), at(datetime!(2028-02-28 23:00 UTC))),
            (id(2), at(datetime!(2028-02-29 01:00 UTC))),
            (id(3), at(datetime!(2028-02-29 22:00 UTC))),
            (id(4), at(datetime!(2028-03-01 00:30 UTC))),
        ];
        // Three days: Mar 1, Feb 29 (its newest is 22:00), Feb 28.
        assert_eq!(prunable(&b, 3, 0), vec![id(2)]);
        assert_eq!(prunable(&b, 2, 0), vec![id(1), id(2)]);
    }

    #[test]
    fn days_are_utc_days() {
        // 23:59:59 and 00:00:00 UTC are different days.
        let b = vec![
            (id(1), at(datetime!(2026-06-01 23:59:59 UTC))),
            (id(2), at(datetime!(2026-06-02 00:00:00 UTC))),
        ];
        assert!(prunable(&b, 2, 0).is_empty());
        assert_eq!(prunable(&b, 1, 0), vec![id(1)]);
    }

    #[test]
    fn all_on_one_day() {
        let base = at(datetime!(2026-07-07 00:00 UTC));
        let b: Vec<_> = (0..6).map(|i| (id(i + 1), base + 600 * i as i64)).collect();
        let expect = all_but(&b, &[5]);
        assert_eq!(prunable(&b, 7, 4), expect);
        assert_eq!(prunable(&b, 1, 1), expect);
        assert_eq!(prunable(&b, 0, 0), expect);
    }

    #[test]
    fn equal_times_tie_break_by_id() {
        let t = at(datetime!(2026-07-07 12:00 UTC));
        let b = vec![(id(9), t), (id(3), t), (id(5), t)];
        // The largest id is the newest: kept; the rest ascend by id.
        assert_eq!(prunable(&b, 1, 0), vec![id(3), id(5)]);
        assert_eq!(prunable(&b, 0, 0), vec![id(3), id(5)]);
        // Across days the tie-break only picks within a day.
        let b = vec![(id(9), t - 86_400), (id(1), t), (id(2), t)];
        assert_eq!(prunable(&b, 2, 0), vec![id(1)]);
    }

    #[test]
    fn weekly_counts_weeks_already_kept_by_daily() {
        // Daily backups Mon 2026-06-01 .. Sun 2026-06-21 (three ISO weeks).
        let start = at(datetime!(2026-06-01 06:00 UTC));
        let b: Vec<_> = (0..21)
            .map(|d| (id(d as u128 + 1), start + 86_400 * d))
            .collect();
        // Daily 3 keeps Jun 19, 20, 21; weekly 2 keeps the newest of W25
        // (Jun 21, already kept) and of W24 (Jun 14): W25 uses a weekly slot
        // although daily kept its newest, so W23 is not reached.
        let kept = [20usize, 19, 18, 13];
        assert_eq!(prunable(&b, 3, 2), all_but(&b, &kept));
        // Weekly 3 reaches W23 (its Sunday, Jun 7).
        assert_eq!(prunable(&b, 3, 3), all_but(&b, &[20, 19, 18, 13, 6]));
        // Nothing kept twice or lost: kept + prunable = all.
        let p = prunable(&b, 3, 3);
        assert_eq!(p.len() + 5, b.len());
    }

    #[test]
    fn weekly_alone_keeps_the_newest_of_each_week() {
        // Two backups a week for five weeks, Tuesdays and Thursdays.
        let tue = at(datetime!(2026-09-01 08:00 UTC)); // 2026-W36, a Tuesday
        let mut b = Vec::new();
        for w in 0..5i64 {
            b.push((id((w * 2 + 1) as u128), tue + w * 7 * 86_400));
            b.push((id((w * 2 + 2) as u128), tue + w * 7 * 86_400 + 2 * 86_400));
        }
        // Four weeks: the Thursday of weeks 1..=4.
        assert_eq!(prunable(&b, 0, 4), all_but(&b, &[3, 5, 7, 9]));
    }

    #[test]
    fn input_order_does_not_matter() {
        let start = at(datetime!(2026-11-20 00:00 UTC));
        let mut b = Vec::new();
        for i in 0..60i64 {
            // Irregular spacing, some equal times.
            b.push((
                id(i as u128 + 1),
                start + (i * 7_919) % 2_000_000 + (i % 3) * 11,
            ));
        }
        b.push((id(1000), b[10].1));
        let expect = prunable(&b, 5, 3);
        assert!(!expect.is_empty() && expect.len() < b.len());
        let mut reversed = b.clone();
        reversed.reverse();
        assert_eq!(prunable(&reversed, 5, 3), expect);
        for seed in [1u64, 42, 0xdead_beef, 7_777_777] {
            assert_eq!(prunable(&shuffled(&b, seed), 5, 3), expect, "seed {seed}");
        }
        // The answer ascends in time.
        let times: Vec<(i64, Uuid)> = expect
            .iter()
            .map(|p| (b.iter().find(|(id, _)| id == p).unwrap().1, *p))
            .collect();
        assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    }

    #[test]
    fn undatable_times_are_never_pruned() {
        let b = vec![
            (id(1), i64::MIN),
            (id(2), at(datetime!(2026-01-01 00:00 UTC))),
            (id(3), at(datetime!(2026-01-02 00:00 UTC))),
        ];
        assert_eq!(prunable(&b, 0, 0), vec![id(2)]);
    }
}
