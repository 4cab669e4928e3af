//! The rules of an alert watch: from each stats snapshot to the transitions worth a mail.
//! The memory of what was last reported is plain data, saved with every alert, so a restarted
//! daemon neither repeats nor loses one.

use crate::stats::parse::{Row, RowType, State};
use crate::stats::{Filter, Snapshot};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// What a watch alerts on, beyond servers leaving UP and backends left with none.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rules {
    /// How often the stats are read, milliseconds.
    pub interval_ms: u64,
    /// How long a server may look transitional (`INI` after a reload, `UP 1/3` from DOWN)
    /// before that look is believed, milliseconds.
    pub hold_ms: u64,
    /// Backends (globs) watched; empty: all.
    #[serde(default)]
    pub proxies: Vec<String>,
    /// Alert when a frontend's or backend's session rate (per second) exceeds this.
    #[serde(default)]
    pub max_session_rate: Option<u64>,
    /// Alert when current sessions reach this share of the limit (percent), where there is one.
    #[serde(default)]
    pub max_sessions_percent: Option<u32>,
    /// Alert when a backend answers more than this many 5xx in one interval.
    #[serde(default)]
    pub max_5xx: Option<u64>,
}

/// The default stats interval of a watch.
pub const DEFAULT_INTERVAL_MS: u64 = 1000;
/// The default hold time for transitional states.
pub const DEFAULT_HOLD_MS: u64 = 10_000;

impl Rules {
    /// Checks the numbers a client gave.
    pub fn check(&self) -> Result<(), String> {
        if !(100..=3_600_000).contains(&self.interval_ms) {
            return Err(format!(
                "interval {} ms: between 100 ms and 1 h",
                self.interval_ms
            ));
        }
        if self.hold_ms > 3_600_000 {
            return Err(format!("hold {} ms: at most 1 h", self.hold_ms));
        }
        if self.max_sessions_percent.is_some_and(|p| p == 0 || p > 100) {
            return Err("max_sessions_percent: 1 to 100".into());
        }
        if self.max_session_rate == Some(0) || self.max_5xx == Some(0) {
            return Err("a threshold of 0 would fire at once; leave it out instead".into());
        }
        if self.max_session_rate.is_some_and(|n| n > 1_000_000_000)
            || self.max_5xx.is_some_and(|n| n > 1_000_000_000)
        {
            return Err("thresholds are at most 1000000000".into());
        }
        if self.proxies.len() > 100 || self.proxies.iter().any(|p| p.is_empty() || p.len() > 200) {
            return Err("proxies: at most 100 non-empty names or globs".into());
        }
        Ok(())
    }
}

/// A server's health as alerts see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Health {
    /// Serving (UP, DRAIN, NOLB, no check).
    Up,
    /// Failing its checks.
    Down,
    /// Put in maintenance.
    Maint,
}

impl Health {
    fn word(self) -> &'static str {
        match self {
            Health::Up => "UP",
            Health::Down => "DOWN",
            Health::Maint => "MAINT",
        }
    }
}

/// How bad a transition is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// Something came back.
    Recovery,
    /// Something left UP or crossed a threshold.
    Warning,
    /// A backend has no server UP, or the stats cannot be read.
    Critical,
}

impl Severity {
    /// The severity as a word (the metrics' label).
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Recovery => "recovery",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

/// One change worth telling.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    /// How bad.
    pub severity: Severity,
    /// A word: DOWN, UP, MAINT, CRITICAL, RESOLVED, OVER, NORMAL, UNREACHABLE, REACHABLE.
    pub tag: &'static str,
    /// What: "app/s1", "backend app", "frontend fe".
    pub what: String,
    /// The rest of the line: the reason, the figures.
    pub detail: String,
}

impl Transition {
    /// The line of the mail.
    pub fn line(&self) -> String {
        format!("{:<11} {}  {}", self.tag, self.what, self.detail)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct ServerMemo {
    /// The health last reported (None until one is believed).
    health: Option<Health>,
    /// Since when (unix ms).
    since: i64,
    /// Since when it has looked different but transitional.
    unsettled_since: Option<i64>,
}

/// What a watch remembers between snapshots (and restarts).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Memory {
    servers: BTreeMap<String, ServerMemo>,
    critical: BTreeSet<String>,
    over: BTreeSet<String>,
    unreachable_since: Option<i64>,
    unreachable_reported: bool,
    /// The next alert's number.
    pub next_alert: u64,
    /// The watch was asked to stop (kept, so a crash before it ended does not resume it).
    #[serde(default)]
    pub stopped: bool,
    /// The first snapshot has been seen (later, a new server is "new", not "already so").
    #[serde(default)]
    started: bool,
    /// Something worth saving changed since `take_changed` was last called (timers and
    /// counters are not: a restart times them afresh).
    #[serde(skip)]
    changed: bool,
    /// 5xx counters at the start of the current interval: (value, unix ms).
    #[serde(skip)]
    base_5xx: HashMap<String, (u64, i64)>,
}

impl Memory {
    /// Whether anything worth saving changed since the last call.
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    /// After a restart: transitional looks and an unreported outage are timed afresh (the
    /// daemon was away for an unknown time; the hold counts from what it sees now).
    pub fn restarted(&mut self) {
        for m in self.servers.values_mut() {
            m.unsettled_since = None;
        }
        if !self.unreachable_reported {
            self.unreachable_since = None;
        }
    }

    /// Servers currently reported not UP, for the job's log.
    pub fn not_up(&self) -> Vec<String> {
        self.servers
            .iter()
            .filter(|(_, m)| matches!(m.health, Some(Health::Down | Health::Maint)))
            .map(|(k, _)| k.clone())
            .collect()
    }
}

/// How a row looks right now.
enum Look {
    /// Believe it at once.
    Settled(Health),
    /// Transitional: believe it only once it has lasted the hold time.
    Unsettled(Health),
    /// Not a state alerts know.
    Unknown,
}

fn look(row: &Row) -> Look {
    let initial = row.check_status.as_deref() == Some("INI");
    let h = match row.status.state {
        State::Up | State::Drain | State::Nolb | State::NoCheck => Health::Up,
        State::Down => Health::Down,
        State::Maint => return Look::Settled(Health::Maint),
        _ => return Look::Unknown,
    };
    if initial || row.status.transitional() {
        Look::Unsettled(h)
    } else {
        Look::Settled(h)
    }
}

fn reason(row: &Row) -> String {
    let mut out = format!("status {}", row.status.raw);
    if let Some(cs) = &row.check_status {
        out.push_str(&format!(", check {cs}"));
        if let Some(code) = row.check_code {
            out.push_str(&format!(" {code}"));
        }
        if let Some(d) = row.check_description.as_deref().filter(|d| !d.is_empty()) {
            out.push_str(&format!(" ({d})"));
        }
    }
    out
}

/// "400ms", "12s 300ms", "3m 12s": tenths of a second under a minute, seconds above.
fn duration_words(ms: i64) -> String {
    let ms = ms.max(0) as u64;
    let d = if ms < 60_000 {
        std::time::Duration::from_millis(ms / 100 * 100)
    } else {
        std::time::Duration::from_secs(ms / 1000)
    };
    humantime::format_duration(d).to_string()
}

/// Evaluates one snapshot taken at `now` (unix ms); returns the transitions to report and
/// updates `mem`.
pub fn evaluate(rules: &Rules, mem: &mut Memory, snap: &Snapshot, now: i64) -> Vec<Transition> {
    let mut out = Vec::new();
    if mem.unreachable_since.take().is_some() && std::mem::take(&mut mem.unreachable_reported) {
        out.push(Transition {
            severity: Severity::Recovery,
            tag: "REACHABLE",
            what: "stats socket".into(),
            detail: "the stats can be read again".into(),
        });
    }
    let filter = Filter {
        proxies: rules.proxies.clone(),
        servers: Vec::new(),
        types: Vec::new(),
    };
    let mut seen = BTreeSet::new();
    let mut present = BTreeSet::new();
    let mut backends: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    let started = mem.started;
    // The backend filter chooses backends and their servers; frontends are always watched
    // (they only matter to thresholds).
    let watched =
        |r: &&Row| matches!(r.kind, RowType::Frontend | RowType::Listener) || filter.accepts(r);
    for row in snap.rows.iter().filter(watched) {
        present.insert(row_name(row));
        match row.kind {
            RowType::Server => server(rules, mem, row, now, started, &mut seen, &mut out),
            RowType::Backend => {
                backends.entry(row.proxy.as_str()).or_default();
            }
            _ => {}
        }
        thresholds(rules, mem, row, now, &mut out);
    }
    // Servers gone from the stats (a new configuration) are forgotten quietly.
    let known = mem.servers.len();
    mem.servers.retain(|k, _| seen.contains(k));
    mem.changed |= mem.servers.len() != known;
    for (key, m) in &mem.servers {
        let Some((backend, _)) = key.split_once('/') else {
            continue;
        };
        if let Some(h) = m.health {
            let e = backends.entry(backend).or_default();
            e.1 += 1;
            if h == Health::Up {
                e.0 += 1;
            }
        }
    }
    for (backend, (up, known)) in backends {
        let critical = known > 0 && up == 0;
        let was = mem.critical.contains(backend);
        if critical && !was {
            mem.critical.insert(backend.to_owned());
            out.push(Transition {
                severity: Severity::Critical,
                tag: "CRITICAL",
                what: format!("backend {backend}"),
                detail: format!("no server UP (0 of {known})"),
            });
        } else if !critical && was {
            mem.critical.remove(backend);
            out.push(Transition {
                severity: Severity::Recovery,
                tag: "RESOLVED",
                what: format!("backend {backend}"),
                detail: format!("{up} of {known} server(s) UP again"),
            });
        }
    }
    let (critical, over) = (mem.critical.len(), mem.over.len());
    mem.critical.retain(|b| {
        snap.rows
            .iter()
            .any(|r| r.kind == RowType::Backend && r.proxy == *b)
    });
    // Thresholds of proxies and servers that are gone start afresh if they come back.
    let known = |k: &String| {
        k.split_once(':')
            .is_some_and(|(_, what)| present.contains(what))
    };
    mem.over.retain(known);
    mem.base_5xx.retain(|k, _| known(k));
    mem.changed |=
        !out.is_empty() || !mem.started || mem.critical.len() != critical || mem.over.len() != over;
    mem.started = true;
    out
}

/// How a row is named in alerts: "frontend fe", "backend app", "app/s1".
fn row_name(row: &Row) -> String {
    match row.kind {
        RowType::Frontend => format!("frontend {}", row.proxy),
        RowType::Backend => format!("backend {}", row.proxy),
        RowType::Server => format!("{}/{}", row.proxy, row.server),
        RowType::Listener => format!("listener {}/{}", row.proxy, row.server),
    }
}

fn server(
    rules: &Rules,
    mem: &mut Memory,
    row: &Row,
    now: i64,
    started: bool,
    seen: &mut BTreeSet<String>,
    out: &mut Vec<Transition>,
) {
    let key = format!("{}/{}", row.proxy, row.server);
    seen.insert(key.clone());
    let m = mem.servers.entry(key.clone()).or_default();
    let (new, settled) = match look(row) {
        Look::Unknown => return,
        Look::Settled(h) => (h, true),
        Look::Unsettled(h) => (h, false),
    };
    if m.health == Some(new) {
        m.unsettled_since = None;
        return;
    }
    if !settled {
        let since = *m.unsettled_since.get_or_insert(now);
        if now - since < rules.hold_ms as i64 {
            return;
        }
    }
    let before = m.health;
    let lasted = now - m.since;
    m.health = Some(new);
    mem.changed = true;
    m.since = now;
    m.unsettled_since = None;
    let (severity, detail) = match (before, new) {
        // First sight: only what is not UP is worth a word.
        (None, Health::Up) => return,
        (None, _) => (
            Severity::Warning,
            format!(
                "{} ({})",
                reason(row),
                if started {
                    "new in the stats"
                } else {
                    "already so when the watch started"
                }
            ),
        ),
        (Some(_), Health::Up) => (
            Severity::Recovery,
            format!(
                "{}; was {} for {}",
                reason(row),
                before.map_or("?", Health::word),
                duration_words(lasted)
            ),
        ),
        (Some(b), _) => (
            Severity::Warning,
            format!("{}; was {}", reason(row), b.word()),
        ),
    };
    out.push(Transition {
        severity,
        tag: new.word(),
        what: key,
        detail,
    });
}

fn thresholds(rules: &Rules, mem: &mut Memory, row: &Row, now: i64, out: &mut Vec<Transition>) {
    if row.kind == RowType::Listener {
        return;
    }
    let what = row_name(row);
    let aggregate = matches!(row.kind, RowType::Frontend | RowType::Backend);
    if let (Some(max), Some(rate), true) = (rules.max_session_rate, row.session_rate, aggregate) {
        // Fires above the limit, clears below 90% of it, so a rate hovering at the limit
        // does not mail every second.
        let over = rate > max;
        let clear = u128::from(rate) * 10 < u128::from(max) * 9;
        flip(mem, format!("rate:{what}"), over, clear, out, || {
            (
                what.clone(),
                format!("session rate {rate}/s (limit {max}/s)"),
            )
        });
    }
    if let (Some(pct), Some(cur), Some(lim)) = (
        rules.max_sessions_percent,
        row.current_sessions,
        row.session_limit.filter(|l| *l > 0),
    ) {
        let share = (u128::from(cur) * 100 / u128::from(lim)) as u64;
        let over = share >= u64::from(pct);
        let clear = u128::from(share) * 10 < u128::from(pct) * 9;
        flip(mem, format!("sessions:{what}"), over, clear, out, || {
            (
                what.clone(),
                format!("{cur} sessions of {lim} ({share}%, limit {pct}%)"),
            )
        });
    }
    if let (Some(max), Some(count), RowType::Backend) = (rules.max_5xx, row.http_5xx, row.kind) {
        let key = format!("5xx:{what}");
        let (base, at) = *mem.base_5xx.entry(key.clone()).or_insert((count, now));
        if count < base {
            // The counter was reset (a reload): start again.
            mem.base_5xx.insert(key, (count, now));
        } else if now - at >= rules.interval_ms as i64 * 9 / 10 {
            let n = count - base;
            mem.base_5xx.insert(key.clone(), (count, now));
            flip(mem, key, n > max, n <= max, out, || {
                (
                    what.clone(),
                    format!("{n} responses 5xx in {} ms (limit {max})", now - at),
                )
            });
        }
    }
}

fn flip(
    mem: &mut Memory,
    key: String,
    over: bool,
    clear: bool,
    out: &mut Vec<Transition>,
    describe: impl FnOnce() -> (String, String),
) {
    let was = mem.over.contains(&key);
    if over && !was {
        let (what, detail) = describe();
        mem.over.insert(key);
        out.push(Transition {
            severity: Severity::Warning,
            tag: "OVER",
            what,
            detail,
        });
    } else if was && clear {
        let (what, detail) = describe();
        mem.over.remove(&key);
        out.push(Transition {
            severity: Severity::Recovery,
            tag: "NORMAL",
            what,
            detail,
        });
    }
}

/// Notes a failed read of the stats; past the hold time it is reported once.
pub fn unreachable(rules: &Rules, mem: &mut Memory, error: &str, now: i64) -> Vec<Transition> {
    let since = *mem.unreachable_since.get_or_insert(now);
    if mem.unreachable_reported || now - since < rules.hold_ms as i64 {
        return Vec::new();
    }
    mem.unreachable_reported = true;
    vec![Transition {
        severity: Severity::Critical,
        tag: "UNREACHABLE",
        what: "stats socket".into(),
        detail: format!(
            "cannot read the stats for {}: {error}",
            duration_words(now - since)
        ),
    }]
}

/// How many transitions a subject names before it counts the rest.
const NAMED_IN_SUBJECT: usize = 3;

/// The subject of the mail for one tick's transitions: what and where, the worst first
/// (`[stately] edge: backend app CRITICAL, app/s1 DOWN, app/s2 DOWN`); beyond a few, the rest
/// are counted (`and 48 more: 50 DOWN, 1 CRITICAL in all`).
pub fn subject(target: &str, ts: &[Transition]) -> String {
    let mut sorted: Vec<&Transition> = ts.iter().collect();
    // Stable: within a severity, the order the rules found them in.
    sorted.sort_by_key(|t| std::cmp::Reverse(t.severity));
    let named: Vec<String> = sorted
        .iter()
        .take(NAMED_IN_SUBJECT)
        .map(|t| format!("{} {}", t.what, t.tag))
        .collect();
    let mut s = format!("[stately] {target}: {}", named.join(", "));
    if ts.len() > NAMED_IN_SUBJECT {
        let mut counts: Vec<(&str, usize)> = Vec::new();
        for t in &sorted {
            match counts.iter_mut().find(|(tag, _)| *tag == t.tag) {
                Some((_, n)) => *n += 1,
                None => counts.push((t.tag, 1)),
            }
        }
        let parts: Vec<String> = counts.iter().map(|(t, n)| format!("{n} {t}")).collect();
        s.push_str(&format!(
            " and {} more ({} in all)",
            ts.len() - NAMED_IN_SUBJECT,
            parts.join(", ")
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::parse::Status;

    fn row(proxy: &str, server: &str, status: &str, check: &str) -> Row {
        Row {
            proxy: proxy.into(),
            server: server.into(),
            kind: match server {
                "BACKEND" => RowType::Backend,
                "FRONTEND" => RowType::Frontend,
                _ => RowType::Server,
            },
            status: Status::parse(status),
            current_sessions: Some(0),
            max_sessions: None,
            session_limit: None,
            total_sessions: None,
            session_rate: Some(0),
            request_rate: None,
            check_status: (!check.is_empty()).then(|| check.into()),
            check_in_progress: false,
            check_code: None,
            check_description: Some("Connection refused".into()),
            last_change: None,
            downtime: None,
            http_5xx: Some(0),
            weight: None,
            address: None,
            cookie: None,
        }
    }

    fn snap(rows: Vec<Row>) -> Snapshot {
        Snapshot::new(rows)
    }

    fn rules() -> Rules {
        Rules {
            interval_ms: 1000,
            hold_ms: 5000,
            proxies: vec![],
            max_session_rate: None,
            max_sessions_percent: None,
            max_5xx: None,
        }
    }

    fn tags(ts: &[Transition]) -> Vec<String> {
        ts.iter().map(|t| format!("{} {}", t.tag, t.what)).collect()
    }

    #[test]
    fn down_then_up_is_one_transition_each_and_transitional_states_wait() {
        let r = rules();
        let mut m = Memory::default();
        let up = || {
            vec![
                row("app", "BACKEND", "UP", ""),
                row("app", "s1", "UP", "L4OK"),
                row("app", "s2", "UP", "L4OK"),
            ]
        };
        assert!(evaluate(&r, &mut m, &snap(up()), 0).is_empty());
        assert!(m.take_changed(), "the first look is worth saving");
        assert!(evaluate(&r, &mut m, &snap(up()), 500).is_empty());
        assert!(!m.take_changed(), "a steady poll is not");
        let mut going = up();
        going[1] = row("app", "s1", "UP 2/3", "L4CON");
        assert!(evaluate(&r, &mut m, &snap(going.clone()), 1000).is_empty());
        let mut down = up();
        down[1] = row("app", "s1", "DOWN", "L4CON");
        let t = evaluate(&r, &mut m, &snap(down.clone()), 2000);
        assert_eq!(tags(&t), ["DOWN app/s1"]);
        assert!(t[0].detail.contains("L4CON") && t[0].detail.contains("Connection refused"));
        assert!(evaluate(&r, &mut m, &snap(down.clone()), 3000).is_empty());
        let t = evaluate(&r, &mut m, &snap(up()), 4000);
        assert_eq!(tags(&t), ["UP app/s1"]);
        assert!(evaluate(&r, &mut m, &snap(up()), 5000).is_empty());
    }

    #[test]
    fn ini_after_a_reload_is_held_then_believed() {
        let r = rules();
        let mut m = Memory::default();
        let down = vec![
            row("app", "BACKEND", "UP", ""),
            row("app", "s1", "DOWN", "L4CON"),
            row("app", "s2", "UP", "L4OK"),
        ];
        let t = evaluate(&r, &mut m, &snap(down.clone()), 0);
        assert_eq!(
            tags(&t),
            ["DOWN app/s1"],
            "a server down at start is told once"
        );
        // The reload: s1 looks UP with its first check not done, s2 too.
        let reloaded = vec![
            row("app", "BACKEND", "UP", ""),
            row("app", "s1", "UP 1/3", "INI"),
            row("app", "s2", "UP", "INI"),
        ];
        assert!(evaluate(&r, &mut m, &snap(reloaded.clone()), 1000).is_empty());
        assert!(
            evaluate(&r, &mut m, &snap(down.clone()), 2500).is_empty(),
            "back to DOWN: nothing to tell"
        );
        // A look that lasts beyond the hold time is believed.
        assert!(evaluate(&r, &mut m, &snap(reloaded.clone()), 3000).is_empty());
        let t = evaluate(&r, &mut m, &snap(reloaded), 8000);
        assert_eq!(tags(&t), ["UP app/s1"]);
    }

    #[test]
    fn a_whole_backend_down_is_grouped_with_its_critical_line() {
        let r = rules();
        let mut m = Memory::default();
        let mk = |st: &str, ck: &str| {
            let mut v = vec![row("app", "BACKEND", "UP", "")];
            v.extend((0..50).map(|i| row("app", &format!("s{i}"), st, ck)));
            v
        };
        assert!(evaluate(&r, &mut m, &snap(mk("UP", "L4OK")), 0).is_empty());
        let t = evaluate(&r, &mut m, &snap(mk("DOWN", "L4CON")), 1000);
        assert_eq!(t.len(), 51);
        assert_eq!(t.last().unwrap().tag, "CRITICAL");
        assert_eq!(
            subject("edge", &t),
            "[stately] edge: backend app CRITICAL, app/s0 DOWN, app/s1 DOWN and 48 more (1 CRITICAL, 50 DOWN in all)"
        );
        let t = evaluate(&r, &mut m, &snap(mk("UP", "L4OK")), 2000);
        assert_eq!(t.len(), 51);
        assert_eq!(t.last().unwrap().tag, "RESOLVED");
    }

    #[test]
    fn memory_survives_a_round_trip_so_a_restart_repeats_nothing() {
        let r = rules();
        let mut m = Memory::default();
        let down = vec![
            row("app", "BACKEND", "DOWN", ""),
            row("app", "s1", "DOWN", "L4CON"),
        ];
        assert_eq!(evaluate(&r, &mut m, &snap(down.clone()), 0).len(), 2);
        let mut back: Memory = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
        assert!(evaluate(&r, &mut back, &snap(down), 1000).is_empty());
    }

    #[test]
    fn thresholds_fire_once_and_clear_with_hysteresis() {
        let mut r = rules();
        r.max_session_rate = Some(100);
        let mut m = Memory::default();
        let fe = |rate| {
            let mut f = row("fe", "FRONTEND", "OPEN", "");
            f.session_rate = Some(rate);
            vec![f]
        };
        assert!(evaluate(&r, &mut m, &snap(fe(50)), 0).is_empty());
        assert_eq!(
            tags(&evaluate(&r, &mut m, &snap(fe(150)), 1000)),
            ["OVER frontend fe"]
        );
        assert!(evaluate(&r, &mut m, &snap(fe(95)), 2000).is_empty());
        assert_eq!(
            tags(&evaluate(&r, &mut m, &snap(fe(80)), 3000)),
            ["NORMAL frontend fe"]
        );
    }

    #[test]
    fn huge_thresholds_are_refused_and_a_restart_times_holds_afresh() {
        let mut r = rules();
        r.max_session_rate = Some(u64::MAX);
        assert!(r.check().is_err());
        let r = rules();
        let mut m = Memory::default();
        let down = vec![
            row("app", "BACKEND", "UP", ""),
            row("app", "s1", "DOWN", "L4CON"),
        ];
        evaluate(&r, &mut m, &snap(down), 0);
        let ini = vec![
            row("app", "BACKEND", "UP", ""),
            row("app", "s1", "UP 1/3", "INI"),
        ];
        assert!(evaluate(&r, &mut m, &snap(ini.clone()), 1000).is_empty());
        // The daemon was away an hour: the INI look is not believed at once.
        m.restarted();
        assert!(evaluate(&r, &mut m, &snap(ini.clone()), 3_600_000).is_empty());
        assert_eq!(
            tags(&evaluate(&r, &mut m, &snap(ini), 3_606_000)),
            ["UP app/s1", "RESOLVED backend app"]
        );
    }

    #[test]
    fn frontends_stay_watched_under_a_backend_filter_and_vanished_rows_start_afresh() {
        let mut r = rules();
        r.proxies = vec!["app".into()];
        r.max_session_rate = Some(100);
        let mut m = Memory::default();
        let fe = |rate, with: bool| {
            let mut f = row("fe", "FRONTEND", "OPEN", "");
            f.session_rate = Some(rate);
            let mut v = vec![
                row("app", "BACKEND", "UP", ""),
                row("app", "s1", "UP", "L4OK"),
            ];
            if with {
                v.push(f);
            }
            v
        };
        assert_eq!(
            tags(&evaluate(&r, &mut m, &snap(fe(150, true)), 0)),
            ["OVER frontend fe"]
        );
        // The frontend disappears (a new configuration) and comes back, still over.
        assert!(evaluate(&r, &mut m, &snap(fe(0, false)), 1000).is_empty());
        assert_eq!(
            tags(&evaluate(&r, &mut m, &snap(fe(150, true)), 2000)),
            ["OVER frontend fe"]
        );
        // A server that appears later DOWN is new, not "already so at the start".
        let mut v = fe(150, true);
        v.push(row("app", "s9", "DOWN", "L4CON"));
        let t = evaluate(&r, &mut m, &snap(v), 3000);
        assert_eq!(tags(&t), ["DOWN app/s9"]);
        assert!(t[0].detail.contains("new in the stats"), "{t:?}");
    }

    #[test]
    fn sessions_against_the_limit_and_5xx_per_interval_fire_once() {
        let mut r = rules();
        r.max_sessions_percent = Some(80);
        r.max_5xx = Some(10);
        let mut m = Memory::default();
        let be = |cur, errors| {
            let mut b = row("app", "BACKEND", "UP", "");
            b.current_sessions = Some(cur);
            b.session_limit = Some(100);
            b.http_5xx = Some(errors);
            vec![b]
        };
        assert!(evaluate(&r, &mut m, &snap(be(10, 0)), 0).is_empty());
        assert_eq!(
            tags(&evaluate(&r, &mut m, &snap(be(85, 5)), 1000)),
            ["OVER backend app"]
        );
        // 5xx counted per interval: 30 more in one second is over 10.
        let t = evaluate(&r, &mut m, &snap(be(85, 35)), 2000);
        assert_eq!(tags(&t), ["OVER backend app"]);
        assert!(t[0].detail.contains("30 responses 5xx"), "{t:?}");
        assert!(
            evaluate(&r, &mut m, &snap(be(85, 36)), 3000).len() == 1,
            "5xx back to normal"
        );
        let t = evaluate(&r, &mut m, &snap(be(50, 36)), 4000);
        assert_eq!(tags(&t), ["NORMAL backend app"]);
        // A counter reset (a reload) is not a negative count nor an alert.
        assert!(evaluate(&r, &mut m, &snap(be(50, 0)), 5000).is_empty());
    }

    #[test]
    fn unreachable_is_told_after_the_hold_and_once() {
        let r = rules();
        let mut m = Memory::default();
        assert!(unreachable(&r, &mut m, "refused", 0).is_empty());
        assert_eq!(unreachable(&r, &mut m, "refused", 6000).len(), 1);
        assert!(unreachable(&r, &mut m, "refused", 7000).is_empty());
        let t = evaluate(&r, &mut m, &snap(vec![]), 8000);
        assert_eq!(tags(&t), ["REACHABLE stats socket"]);
    }
}
