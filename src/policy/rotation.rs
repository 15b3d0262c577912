//! Rotation policy (`policies/rotation.toml`): when the rotation job plans
//! (a cron schedule, UTC) and, per key purpose, a maximum age and the margin
//! before it at which a rotation starts. Without the file the documented
//! defaults apply ([`RotationPolicy::default`], the values of the shipped
//! file). The planner (`crate::rotation::plan`) reads it; reload swaps it
//! without a restart.

use super::{CaPolicy, POLICY_VERSION, PolicyError, ProfilePolicy};
use crate::model::{CaKind, KeyPurpose};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::BTreeMap;
use std::path::Path;
use time::OffsetDateTime;

/// The file's name in the policies directory.
pub const ROTATION_FILE: &str = "rotation.toml";

/// The purposes `[keys.PURPOSE]` accepts. `audit` and `token-signing` are
/// accepted for keys keyward will hold later.
pub const ROTATABLE: [KeyPurpose; 5] = [
    KeyPurpose::IssuingCa,
    KeyPurpose::OcspSigning,
    KeyPurpose::TlsServer,
    KeyPurpose::Audit,
    KeyPurpose::TokenSigning,
];

const DAY: i64 = 86_400;

/// A standard 5-field cron expression (minute hour day-of-month month
/// day-of-week), evaluated in UTC. Keeps the text it was written as.
#[derive(Debug, Clone)]
pub struct Schedule {
    source: String,
    /// `None` only for a constant that failed to parse (never fires; the
    /// unit tests check the default parses).
    cron: Option<croner::Cron>,
}

impl PartialEq for Schedule {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Eq for Schedule {}

impl Schedule {
    /// Parses a 5-field expression (no seconds, no year field; `@daily`
    /// and the like are accepted). An expression that never fires (`0 0 30
    /// 2 *`) is refused.
    pub fn parse(expr: &str) -> Result<Self, String> {
        use croner::parser::{CronParser, Seconds, Year};
        let cron = CronParser::builder()
            .seconds(Seconds::Disallowed)
            .year(Year::Disallowed)
            .build()
            .parse(expr)
            .map_err(|e| format!("`{expr}` is not a 5-field cron expression: {e}"))?;
        let schedule = Self {
            source: expr.trim().to_string(),
            cron: Some(cron),
        };
        if schedule
            .next_after(OffsetDateTime::UNIX_EPOCH + time::Duration::days(10_957))
            .is_none()
        {
            return Err(format!("`{expr}` never fires"));
        }
        Ok(schedule)
    }

    /// The expression as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The first firing strictly after `t` (UTC, whole seconds: a firing at
    /// 03:00:00 is not "after" 03:00:00.5). `None` when it never fires again.
    pub fn next_after(&self, t: OffsetDateTime) -> Option<OffsetDateTime> {
        let from = chrono::DateTime::<chrono::Utc>::from_timestamp(t.unix_timestamp(), 0)?;
        let next = self
            .cron
            .as_ref()?
            .find_next_occurrence(&from, false)
            .ok()?;
        OffsetDateTime::from_unix_timestamp(next.timestamp()).ok()
    }

    /// True iff the schedule fired at some `f` with `last < f <= now`.
    /// False when `now <= last` (the clock went backwards, or no time passed).
    pub fn fired_between(&self, last: OffsetDateTime, now: OffsetDateTime) -> bool {
        if now <= last {
            return false;
        }
        self.next_after(last).is_some_and(|f| f <= now)
    }
}

impl std::fmt::Display for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.source)
    }
}

impl Serialize for Schedule {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.source)
    }
}

impl<'de> Deserialize<'de> for Schedule {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Schedule::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// `[keys.PURPOSE]`: a key of this purpose is rotated from
/// `min(activated + max_age_days, certificate notAfter) - rotate_before_days` on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRotation {
    pub max_age_days: u32,
    pub rotate_before_days: u32,
    /// `false`: the plan reports the key as due but never rotates it; an
    /// operator runs the rotation.
    #[serde(default = "yes")]
    pub automatic: bool,
}

fn yes() -> bool {
    true
}

impl KeyRotation {
    pub fn max_age_seconds(&self) -> i64 {
        i64::from(self.max_age_days) * DAY
    }

    pub fn rotate_before_seconds(&self) -> i64 {
        i64::from(self.rotate_before_days) * DAY
    }
}

/// `policies/rotation.toml`, validated. Build it with [`RotationPolicy::from_text`]
/// and [`RotationPolicy::check_against`] (`Policies::load` does both);
/// deserializing it directly skips the checks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotationPolicy {
    pub version: u32,
    /// When the rotation job plans. Rotations that are due start at the
    /// next firing; running rotations are resumed without waiting for it.
    pub schedule: Schedule,
    #[serde(default)]
    pub keys: BTreeMap<KeyPurpose, KeyRotation>,
}

/// The schedule of the defaults: every day at 03:00 UTC.
pub const DEFAULT_SCHEDULE: &str = "0 3 * * *";

impl Default for RotationPolicy {
    /// The values of the shipped `policies/rotation.toml`: plan daily at
    /// 03:00 UTC; issuing CA 1095 d / 30 d, OCSP signing 30 d / 7 d, TLS
    /// server 90 d / 14 d, token signing 90 d / 7 d.
    fn default() -> Self {
        let rule = |max_age_days, rotate_before_days| KeyRotation {
            max_age_days,
            rotate_before_days,
            automatic: true,
        };
        Self {
            version: POLICY_VERSION,
            schedule: Schedule::constant(DEFAULT_SCHEDULE),
            keys: BTreeMap::from([
                (KeyPurpose::IssuingCa, rule(1095, 30)),
                (KeyPurpose::OcspSigning, rule(30, 7)),
                (KeyPurpose::TlsServer, rule(90, 14)),
                (KeyPurpose::TokenSigning, rule(90, 7)),
            ]),
        }
    }
}

impl Schedule {
    /// A schedule from a constant known to parse; were it not, the schedule
    /// would never fire (the unit tests check the default).
    fn constant(expr: &str) -> Self {
        Schedule::parse(expr).unwrap_or_else(|_| Self {
            source: expr.to_string(),
            cron: None,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RotationFile {
    version: u32,
    schedule: String,
    #[serde(default)]
    keys: BTreeMap<String, KeyRotation>,
}

impl RotationPolicy {
    /// Parses `rotation.toml` and checks what needs no other file: the
    /// version, the schedule, the purposes and each key's ages.
    pub fn from_text(path: &Path, text: &str) -> Result<Self, PolicyError> {
        let file: RotationFile = super::parse(path, text)?;
        let bad = |key: String, reason: String| PolicyError::Invalid {
            path: path.to_path_buf(),
            key,
            reason,
        };
        if file.version != POLICY_VERSION {
            return Err(bad(
                "version".into(),
                format!(
                    "unsupported version {} (this keyward reads {POLICY_VERSION})",
                    file.version
                ),
            ));
        }
        let schedule = Schedule::parse(&file.schedule).map_err(|e| bad("schedule".into(), e))?;
        let mut keys = BTreeMap::new();
        for (name, rule) in file.keys {
            let key = format!("keys.{name}");
            let purpose = match KeyPurpose::parse(&name) {
                Some(KeyPurpose::RootCa) => {
                    return Err(bad(
                        key,
                        "root CA keys are never rotated automatically: an operator rotates a root"
                            .into(),
                    ));
                }
                Some(KeyPurpose::Device) => {
                    return Err(bad(
                        key,
                        "device keys are renewed by the devices (see renewal_window_days in ca.toml)"
                            .into(),
                    ));
                }
                Some(p) if ROTATABLE.contains(&p) => p,
                _ => {
                    return Err(bad(
                        key,
                        format!(
                            "not a key purpose rotation.toml plans (one of: {})",
                            ROTATABLE.map(KeyPurpose::as_str).join(", ")
                        ),
                    ));
                }
            };
            check_rule(&rule).map_err(|(k, reason)| bad(format!("{key}.{k}"), reason))?;
            keys.insert(purpose, rule);
        }
        Ok(Self {
            version: file.version,
            schedule,
            keys,
        })
    }

    /// The checks against `ca.toml`: every issuing CA outlives the last
    /// certificates its key can issue before rotation
    /// (`validity_days >= max_age_days + longest profile validity_days`),
    /// and no issuing CA outlives its parent. `path` names the rotation
    /// file in errors; `note` is appended to every reason (empty, or why
    /// the defaults are in force).
    pub fn check_against(
        &self,
        path: &Path,
        cas: &[CaPolicy],
        profiles: &BTreeMap<String, ProfilePolicy>,
        note: &str,
    ) -> Result<(), PolicyError> {
        let bad = |key: String, reason: String| PolicyError::Invalid {
            path: path.to_path_buf(),
            key,
            reason: format!("{reason}{note}"),
        };
        for ca in cas.iter().filter(|c| c.kind == CaKind::Issuing) {
            if let Some(parent) = cas
                .iter()
                .find(|p| Some(&p.name) == ca.parent.as_ref())
                .filter(|p| ca.validity_days > p.validity_days)
            {
                return Err(bad(
                    format!("ca ({})", ca.name),
                    format!(
                        "an issuing CA outliving its parent: validity_days {} exceeds `{}`'s {}",
                        ca.validity_days, parent.name, parent.validity_days
                    ),
                ));
            }
            let Some(rule) = self.keys.get(&KeyPurpose::IssuingCa) else {
                continue;
            };
            let longest = profiles
                .values()
                .filter(|p| p.issuer == ca.name)
                .max_by_key(|p| p.validity_days);
            let longest_days = longest.map_or(0, |p| p.validity_days);
            let needed = u64::from(rule.max_age_days) + u64::from(longest_days);
            if u64::from(ca.validity_days) < needed {
                return Err(bad(
                    "keys.issuing-ca.max_age_days".into(),
                    format!(
                        "issuing CA `{}` (validity_days {}) would be outlived by its last certificates: a key used up to {} d{} needs validity_days >= {needed}",
                        ca.name,
                        ca.validity_days,
                        rule.max_age_days,
                        match longest {
                            Some(p) => format!(
                                " issuing profile `{}` ({} d certificates)",
                                p.name, p.validity_days
                            ),
                            None => String::new(),
                        },
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The rule for `purpose`, if the policy has one.
    pub fn key(&self, purpose: KeyPurpose) -> Option<&KeyRotation> {
        self.keys.get(&purpose)
    }
}

/// Checks of one `[keys.PURPOSE]`; `(field, reason)`.
fn check_rule(r: &KeyRotation) -> Result<(), (&'static str, String)> {
    if r.max_age_days == 0 {
        return Err(("max_age_days", "must be positive".into()));
    }
    if r.rotate_before_days >= r.max_age_days {
        return Err((
            "rotate_before_days",
            format!(
                "a maximum age shorter than the margin: max_age_days {} must exceed rotate_before_days {}",
                r.max_age_days, r.rotate_before_days
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    const SHIPPED: &str = include_str!("../../policies/rotation.toml");
    const CA: &str = include_str!("../../policies/ca.toml");

    fn load(text: &str) -> Result<RotationPolicy, PolicyError> {
        RotationPolicy::from_text(Path::new("policies/rotation.toml"), text)
    }

    fn err(text: &str) -> String {
        load(text).unwrap_err().to_string()
    }

    fn sched(expr: &str) -> Schedule {
        Schedule::parse(expr).unwrap()
    }

    const HEAD: &str = "version = 1\nschedule = \"0 3 * * *\"\n";

    #[test]
    fn shipped_file_is_the_defaults() {
        let p = load(SHIPPED).unwrap();
        assert_eq!(p, RotationPolicy::default());
        assert_eq!(p.schedule.as_str(), "0 3 * * *");
        assert_eq!(p.key(KeyPurpose::IssuingCa).unwrap().max_age_days, 1095);
        assert!(p.key(KeyPurpose::TlsServer).unwrap().automatic);
        assert!(p.key(KeyPurpose::Audit).is_none());
        // The default schedule really parsed (not the placeholder).
        assert_eq!(
            RotationPolicy::default()
                .schedule
                .next_after(datetime!(2027-01-01 00:00 UTC)),
            Some(datetime!(2027-01-01 03:00 UTC))
        );
    }

    #[test]
    fn wrong_version_is_refused() {
        let e = err(&SHIPPED.replacen("version = 1", "version = 2", 1));
        assert!(
            e.contains("policies/rotation.toml") && e.contains("version") && e.contains("2"),
            "{e}"
        );
    }

    #[test]
    fn bad_cron_is_refused_with_the_key() {
        for expr in [
            "0 3 * *",
            "0 0 3 * * *",
            "61 3 * * *",
            "0 25 * * *",
            "every day",
            "",
            "0 0 30 2 *",
        ] {
            let e = err(&format!("version = 1\nschedule = \"{expr}\"\n"));
            assert!(
                e.contains("policies/rotation.toml: schedule:"),
                "{expr}: {e}"
            );
        }
        assert!(err("version = 1\nschedule = \"0 0 30 2 *\"\n").contains("never fires"));
    }

    #[test]
    fn zero_max_age_is_refused() {
        let e = err(&format!(
            "{HEAD}[keys.tls-server]\nmax_age_days = 0\nrotate_before_days = 0\n"
        ));
        assert!(e.contains("keys.tls-server.max_age_days"), "{e}");
    }

    #[test]
    fn margin_not_shorter_than_max_age_is_refused() {
        for before in [30, 31] {
            let e = err(&format!(
                "{HEAD}[keys.ocsp-signing]\nmax_age_days = 30\nrotate_before_days = {before}\n"
            ));
            assert!(
                e.contains("keys.ocsp-signing.rotate_before_days")
                    && e.contains("a maximum age shorter than the margin"),
                "{e}"
            );
        }
        assert!(
            load(&format!(
                "{HEAD}[keys.ocsp-signing]\nmax_age_days = 30\nrotate_before_days = 29\n"
            ))
            .is_ok()
        );
    }

    #[test]
    fn roots_devices_and_unknown_purposes_are_refused() {
        let rule = "max_age_days = 30\nrotate_before_days = 7\n";
        let e = err(&format!("{HEAD}[keys.root-ca]\n{rule}"));
        assert!(e.contains("keys.root-ca") && e.contains("operator"), "{e}");
        let e = err(&format!("{HEAD}[keys.device]\n{rule}"));
        assert!(e.contains("keys.device") && e.contains("devices"), "{e}");
        for name in ["backup-wrap", "issuing_ca", "nope"] {
            let e = err(&format!("{HEAD}[keys.{name}]\n{rule}"));
            assert!(
                e.contains(&format!("keys.{name}"))
                    && e.contains("not a key purpose rotation.toml plans"),
                "{e}"
            );
        }
        let p = load(&format!(
            "{HEAD}[keys.audit]\n{rule}[keys.token-signing]\n{rule}automatic = false\n"
        ))
        .unwrap();
        assert!(p.key(KeyPurpose::Audit).unwrap().automatic);
        assert!(!p.key(KeyPurpose::TokenSigning).unwrap().automatic);
    }

    #[test]
    fn unknown_fields_are_refused() {
        let e = err(&format!("{HEAD}shedule = \"x\"\n"));
        assert!(e.contains("shedule"), "{e}");
        let e = err(&format!(
            "{HEAD}[keys.tls-server]\nmax_age_days = 9\nrotate_before_days = 1\nmax_age = 3\n"
        ));
        assert!(e.contains("max_age"), "{e}");
        let e = err("version = 1\n");
        assert!(e.contains("schedule"), "{e}");
    }

    fn ca_file() -> (Vec<CaPolicy>, BTreeMap<String, ProfilePolicy>) {
        let p = crate::policy::Policies::from_texts(
            Path::new("ca.toml"),
            CA,
            Path::new("enrollment.toml"),
            "version = 1\n",
        )
        .unwrap();
        (p.cas, p.profiles)
    }

    fn check(max_age: u32, cas: &[CaPolicy], profiles: &BTreeMap<String, ProfilePolicy>) -> String {
        let p = load(&format!(
            "{HEAD}[keys.issuing-ca]\nmax_age_days = {max_age}\nrotate_before_days = 30\n"
        ))
        .unwrap();
        match p.check_against(Path::new("policies/rotation.toml"), cas, profiles, "") {
            Ok(()) => "ok".into(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn issuing_ca_must_outlive_its_last_certificates() {
        let (cas, profiles) = ca_file();
        // devices: 1825 d, profile `device` 365 d: up to 1460 d is fine.
        assert_eq!(check(1460, &cas, &profiles), "ok");
        let e = check(1461, &cas, &profiles);
        assert!(
            e.contains("policies/rotation.toml: keys.issuing-ca.max_age_days")
                && e.contains("`devices`")
                && e.contains("`device`")
                && e.contains(">= 1826"),
            "{e}"
        );
        // The longest profile counts.
        let mut longer = profiles.clone();
        let mut p = longer["device"].clone();
        p.name = "long".into();
        p.validity_days = 800;
        longer.insert("long".into(), p);
        assert_eq!(check(1025, &cas, &longer), "ok");
        assert!(check(1026, &cas, &longer).contains("`long`"));
        // A profile of another CA does not.
        let mut other = profiles.clone();
        let mut p = other["device"].clone();
        p.issuer = "root".into();
        p.validity_days = 5000;
        other.insert("root-issued".into(), p);
        assert_eq!(check(1460, &cas, &other), "ok");
        // Without an issuing-ca rule there is nothing to check.
        let p = load(HEAD).unwrap();
        assert!(p.check_against(Path::new("r"), &cas, &longer, "").is_ok());
    }

    #[test]
    fn issuing_ca_outliving_its_parent_is_refused() {
        let (mut cas, profiles) = ca_file();
        cas[1].validity_days = cas[0].validity_days + 1;
        let e = check(1000, &cas, &profiles);
        assert!(
            e.contains("ca (devices)") && e.contains("an issuing CA outliving its parent"),
            "{e}"
        );
        cas[1].validity_days = cas[0].validity_days;
        assert_eq!(check(1000, &cas, &profiles), "ok");
    }

    #[test]
    fn note_is_appended() {
        let (cas, profiles) = ca_file();
        let p = load(&format!(
            "{HEAD}[keys.issuing-ca]\nmax_age_days = 2000\nrotate_before_days = 30\n"
        ))
        .unwrap();
        let e = p
            .check_against(Path::new("r"), &cas, &profiles, " (NOTE)")
            .unwrap_err()
            .to_string();
        assert!(e.ends_with(" (NOTE)"), "{e}");
    }

    #[test]
    fn serializes_for_display_and_round_trips() {
        let p = RotationPolicy::default();
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(v["schedule"], "0 3 * * *");
        assert_eq!(v["keys"]["issuing-ca"]["max_age_days"], 1095);
        assert_eq!(v["keys"]["tls-server"]["automatic"], true);
        let text = toml::to_string(&p).unwrap();
        assert_eq!(load(&text).unwrap(), p);
        let custom = load(&format!(
            "{HEAD}[keys.audit]\nmax_age_days = 9\nrotate_before_days = 2\nautomatic = false\n"
        ))
        .unwrap();
        assert_eq!(load(&toml::to_string(&custom).unwrap()).unwrap(), custom);
    }

    #[test]
    fn next_after_is_strict_and_whole_seconds() {
        let s = sched("0 3 * * *");
        let at = datetime!(2027-06-01 03:00 UTC);
        assert_eq!(s.next_after(at - time::Duration::SECOND), Some(at));
        assert_eq!(s.next_after(at), Some(datetime!(2027-06-02 03:00 UTC)));
        assert_eq!(
            s.next_after(at + time::Duration::milliseconds(500)),
            Some(datetime!(2027-06-02 03:00 UTC))
        );
        assert_eq!(
            s.next_after(at - time::Duration::milliseconds(500)),
            Some(at)
        );
    }

    #[test]
    fn fired_between_boundaries() {
        let s = sched("0 3 * * *");
        let f = datetime!(2027-06-01 03:00 UTC);
        let sec = time::Duration::SECOND;
        // last < f <= now
        assert!(s.fired_between(f - sec, f));
        assert!(!s.fired_between(f - 2 * sec, f - sec));
        assert!(!s.fired_between(f, f + sec), "f is not after last = f");
        assert!(s.fired_between(f - time::Duration::days(3), f + sec));
        // No time passed, or the clock went backwards.
        assert!(!s.fired_between(f + sec, f + sec));
        assert!(!s.fired_between(f + sec, f - time::Duration::days(2)));
    }

    #[test]
    fn fired_between_across_the_year_boundary() {
        let s = sched("0 3 * * *");
        assert!(s.fired_between(
            datetime!(2026-12-31 03:00 UTC),
            datetime!(2027-01-01 03:00 UTC)
        ));
        assert!(!s.fired_between(
            datetime!(2026-12-31 03:00 UTC),
            datetime!(2027-01-01 02:59:59 UTC)
        ));
        // Midnight on New Year's Day.
        let ny = sched("0 0 1 1 *");
        assert_eq!(
            ny.next_after(datetime!(2026-12-31 23:59:59 UTC)),
            Some(datetime!(2027-01-01 00:00 UTC))
        );
        assert!(ny.fired_between(
            datetime!(2026-12-31 23:59:59 UTC),
            datetime!(2027-01-01 00:00 UTC)
        ));
        assert!(!ny.fired_between(
            datetime!(2027-01-01 00:00 UTC),
            datetime!(2027-12-31 23:59:59 UTC)
        ));
    }

    #[test]
    fn fired_between_on_leap_days() {
        let leap = sched("0 12 29 2 *");
        assert_eq!(
            leap.next_after(datetime!(2027-03-01 00:00 UTC)),
            Some(datetime!(2028-02-29 12:00 UTC))
        );
        assert_eq!(
            leap.next_after(datetime!(2028-02-29 12:00 UTC)),
            Some(datetime!(2032-02-29 12:00 UTC))
        );
        assert!(!leap.fired_between(
            datetime!(2028-03-01 00:00 UTC),
            datetime!(2032-02-29 11:59:59 UTC)
        ));
        assert!(leap.fired_between(
            datetime!(2028-02-28 12:00 UTC),
            datetime!(2028-02-29 12:00 UTC)
        ));
        // A daily schedule fires on Feb 29 and then on Mar 1.
        let daily = sched("0 3 * * *");
        assert_eq!(
            daily.next_after(datetime!(2028-02-28 03:00 UTC)),
            Some(datetime!(2028-02-29 03:00 UTC))
        );
        assert_eq!(
            daily.next_after(datetime!(2028-02-29 03:00 UTC)),
            Some(datetime!(2028-03-01 03:00 UTC))
        );
    }

    #[test]
    fn schedule_is_utc_whatever_the_dst_of_any_zone() {
        // Europe and the US change clocks on these dates; UTC does not:
        // every day has exactly one 02:30 firing, 24 h apart.
        let s = sched("30 2 * * *");
        for (a, b) in [
            (
                datetime!(2027-03-27 02:30 UTC),
                datetime!(2027-03-28 02:30 UTC),
            ),
            (
                datetime!(2027-10-30 02:30 UTC),
                datetime!(2027-10-31 02:30 UTC),
            ),
            (
                datetime!(2027-03-13 02:30 UTC),
                datetime!(2027-03-14 02:30 UTC),
            ),
        ] {
            assert_eq!(s.next_after(a), Some(b));
            assert_eq!(b - a, time::Duration::hours(24));
        }
        // An input with an offset is the same instant: 04:30+02:00 = 02:30 UTC.
        assert_eq!(
            s.next_after(datetime!(2027-03-28 04:29:59 +02:00)),
            Some(datetime!(2027-03-28 02:30 UTC))
        );
    }

    #[test]
    fn weekly_and_stepped_schedules() {
        // Sundays at 04:15: 2027-01-03 is a Sunday.
        let s = sched("15 4 * * 0");
        assert_eq!(
            s.next_after(datetime!(2026-12-30 00:00 UTC)),
            Some(datetime!(2027-01-03 04:15 UTC))
        );
        let s = sched("*/15 * * * *");
        assert_eq!(
            s.next_after(datetime!(2027-01-01 00:14:59 UTC)),
            Some(datetime!(2027-01-01 00:15 UTC))
        );
        assert_eq!(sched("@daily").as_str(), "@daily");
    }
}
