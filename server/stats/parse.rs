//! Parses HAProxy's `show stat` CSV by column name, from the header line, so other HAProxy
//! versions (more, fewer or reordered columns) work: the `# ` header prefix, the trailing comma,
//! the `-` column before per-module fields and the `* ` on a running check are all handled.
//! Missing columns are absent, not zero; malformed or truncated output is an error, never a panic.

use std::collections::HashMap;

/// What kind of line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RowType {
    /// A frontend.
    Frontend,
    /// A backend's aggregate line.
    Backend,
    /// A server of a backend.
    Server,
    /// A listener (bind line) of a frontend.
    Listener,
}

/// The state part of HAProxy's status column.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// UP (or UP n/m, going down).
    Up,
    /// DOWN (or DOWN n/m, coming up).
    Down,
    /// In maintenance (MAINT, MAINT (via …), MAINT (resolution)).
    Maint,
    /// Draining.
    Drain,
    /// Not load-balanced.
    Nolb,
    /// No health check configured.
    NoCheck,
    /// A frontend or listener accepting.
    Open,
    /// A frontend at its limit.
    Full,
    /// A stopped proxy.
    Stopped,
    /// Anything else (`raw` says what).
    Other,
}

/// HAProxy's status column, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    /// The state.
    pub state: State,
    /// The column as written.
    pub raw: Text,
    /// For "UP 2/3" and "DOWN 1/2": (2, 3) and (1, 2).
    pub checks: Option<(u32, u32)>,
}

impl Status {
    /// Parses a status column.
    pub fn parse(raw: &str) -> Status {
        let (word, rest) = raw.split_once(' ').unwrap_or((raw, ""));
        let state = match word {
            "UP" => State::Up,
            "DOWN" => State::Down,
            "MAINT" => State::Maint,
            "DRAIN" => State::Drain,
            "NOLB" => State::Nolb,
            "no" if rest == "check" => State::NoCheck,
            "OPEN" => State::Open,
            "FULL" => State::Full,
            "STOP" => State::Stopped,
            _ => State::Other,
        };
        let checks = matches!(state, State::Up | State::Down)
            .then(|| rest.split_once('/'))
            .flatten()
            .and_then(|(a, b)| Some((a.trim().parse().ok()?, b.trim().parse().ok()?)));
        Status {
            state,
            raw: Text::from(raw),
            checks,
        }
    }

    /// Whether it is in a transition ("UP 2/3", "DOWN 1/2").
    pub fn transitional(&self) -> bool {
        self.checks.is_some()
    }
}

/// A text field of a row: inline up to 24 bytes (every name, status, check and address of a
/// usual config), so a 5000-server poll makes no allocation per field.
pub type Text = compact_str::CompactString;

/// One line of `show stat`, typed. `None` where HAProxy gave no value or no such column.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    /// pxname.
    pub proxy: Text,
    /// svname (FRONTEND and BACKEND for the aggregate lines).
    pub server: Text,
    /// type.
    pub kind: RowType,
    /// status.
    pub status: Status,
    /// scur.
    pub current_sessions: Option<u64>,
    /// smax.
    pub max_sessions: Option<u64>,
    /// slim.
    pub session_limit: Option<u64>,
    /// stot.
    pub total_sessions: Option<u64>,
    /// rate.
    pub session_rate: Option<u64>,
    /// req_rate.
    pub request_rate: Option<u64>,
    /// check_status, without the "* " prefix.
    pub check_status: Option<Text>,
    /// Whether check_status had the "* " prefix (a check is running).
    pub check_in_progress: bool,
    /// check_code.
    pub check_code: Option<u32>,
    /// check_desc.
    pub check_description: Option<Text>,
    /// lastchg, seconds.
    pub last_change: Option<u64>,
    /// downtime, seconds.
    pub downtime: Option<u64>,
    /// hrsp_5xx.
    pub http_5xx: Option<u64>,
    /// weight.
    pub weight: Option<u64>,
    /// addr.
    pub address: Option<Text>,
    /// cookie.
    pub cookie: Option<Text>,
}

impl Row {
    /// Whether what an operator watches (not the counters) differs from `before`. While a
    /// check runs HAProxy blanks its description, so check fields are compared only between
    /// finished checks.
    pub fn state_differs(&self, before: &Row) -> bool {
        let checks_settled = !self.check_in_progress && !before.check_in_progress;
        self.status != before.status
            || (checks_settled
                && (self.check_status != before.check_status
                    || self.check_code != before.check_code
                    || self.check_description != before.check_description))
            || self.weight != before.weight
            || self.address != before.address
            || self.cookie != before.cookie
            || self.session_limit != before.session_limit
    }
}

/// Why output could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The first line is not a `# pxname,...` header.
    #[error("no `# pxname,svname,...` header line (got {0:?})")]
    NoHeader(String),
    /// A column every row needs is missing from the header.
    #[error("the header has no `{0}` column")]
    MissingColumn(&'static str),
    /// The output does not end with the blank line that ends every CLI answer: cut short.
    #[error("the output is truncated (it does not end with the blank line that ends an answer)")]
    Truncated,
    /// A line is malformed.
    #[error("line {line}: {reason}")]
    BadLine {
        /// 1-based, counting the header.
        line: u64,
        /// What is wrong.
        reason: String,
    },
}

#[derive(Debug)]
struct Columns {
    pxname: usize,
    svname: usize,
    kind: usize,
    status: Option<usize>,
    scur: Option<usize>,
    smax: Option<usize>,
    slim: Option<usize>,
    stot: Option<usize>,
    rate: Option<usize>,
    req_rate: Option<usize>,
    check_status: Option<usize>,
    check_code: Option<usize>,
    check_desc: Option<usize>,
    lastchg: Option<usize>,
    downtime: Option<usize>,
    hrsp_5xx: Option<usize>,
    weight: Option<usize>,
    addr: Option<usize>,
    cookie: Option<usize>,
    count: usize,
}

impl Columns {
    /// Every column a row reads, once each, in order.
    fn read(&self) -> Vec<usize> {
        let mut v: Vec<usize> = [
            Some(self.pxname),
            Some(self.svname),
            Some(self.kind),
            self.status,
            self.scur,
            self.smax,
            self.slim,
            self.stot,
            self.rate,
            self.req_rate,
            self.check_status,
            self.check_code,
            self.check_desc,
            self.lastchg,
            self.downtime,
            self.hrsp_5xx,
            self.weight,
            self.addr,
            self.cookie,
        ]
        .into_iter()
        .flatten()
        .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// The same columns renumbered as places in `read()`'s list (where a line's fields are
    /// kept), and that list.
    fn slots(&self) -> (Columns, Vec<usize>) {
        let read = self.read();
        let at = |c: usize| read.binary_search(&c).expect("a column read");
        let opt = |c: Option<usize>| c.map(at);
        let slots = Columns {
            pxname: at(self.pxname),
            svname: at(self.svname),
            kind: at(self.kind),
            status: opt(self.status),
            scur: opt(self.scur),
            smax: opt(self.smax),
            slim: opt(self.slim),
            stot: opt(self.stot),
            rate: opt(self.rate),
            req_rate: opt(self.req_rate),
            check_status: opt(self.check_status),
            check_code: opt(self.check_code),
            check_desc: opt(self.check_desc),
            lastchg: opt(self.lastchg),
            downtime: opt(self.downtime),
            hrsp_5xx: opt(self.hrsp_5xx),
            weight: opt(self.weight),
            addr: opt(self.addr),
            cookie: opt(self.cookie),
            count: self.count,
        };
        (slots, read)
    }

    fn from_header(names: &[&str]) -> Result<Columns, ParseError> {
        // Only the base fields, before the `-` separator, are looked up by these names.
        let base = names.iter().position(|n| *n == "-").unwrap_or(names.len());
        let index: HashMap<&str, usize> = names[..base]
            .iter()
            .enumerate()
            .map(|(i, n)| (*n, i))
            .collect();
        let get = |n: &str| index.get(n).copied();
        let need = |n: &'static str| get(n).ok_or(ParseError::MissingColumn(n));
        Ok(Columns {
            pxname: need("pxname")?,
            svname: need("svname")?,
            kind: need("type")?,
            status: get("status"),
            scur: get("scur"),
            smax: get("smax"),
            slim: get("slim"),
            stot: get("stot"),
            rate: get("rate"),
            req_rate: get("req_rate"),
            check_status: get("check_status"),
            check_code: get("check_code"),
            check_desc: get("check_desc"),
            lastchg: get("lastchg"),
            downtime: get("downtime"),
            hrsp_5xx: get("hrsp_5xx"),
            weight: get("weight"),
            addr: get("addr"),
            cookie: get("cookie"),
            count: names.len(),
        })
    }
}

/// Parses a whole `show stat` answer.
pub fn parse(text: &[u8]) -> Result<Vec<Row>, ParseError> {
    let mut parser = Parser::new(text.len() / 200);
    let used = parser.feed(text)?;
    parser.finish(&text[used..])
}

/// Where the columns a row reads are on a line, from the header.
#[derive(Debug)]
struct Layout {
    cols: Columns,
    /// The columns renumbered as places in `read` (see `Columns::slots`).
    slots: Columns,
    /// Every column a row reads, in order.
    read: Vec<usize>,
    /// One past the last column read.
    upto: usize,
    /// Column → place in a line's fields, or NONE for a column no row reads.
    slot_of: Vec<u8>,
    /// Column → the first column read at or after it: a word of the line whose commas all end
    /// fields before that one is skipped whole.
    next_read: Vec<usize>,
}

/// Column not read.
const NONE: u8 = u8::MAX;

impl Layout {
    fn new(header: &[u8]) -> Result<Layout, ParseError> {
        let header =
            std::str::from_utf8(header).map_err(|_| ParseError::NoHeader("not UTF-8".into()))?;
        let header = header
            .strip_prefix("# ")
            .ok_or_else(|| ParseError::NoHeader(header.chars().take(40).collect()))?;
        let names: Vec<&str> = header.split(',').collect();
        let cols = Columns::from_header(&names)?;
        let (slots, read) = cols.slots();
        let upto = read.last().copied().unwrap_or(0) + 1;
        let mut slot_of = vec![NONE; upto];
        for (i, c) in read.iter().enumerate() {
            slot_of[*c] = u8::try_from(i).expect("fewer than 255 columns read");
        }
        let mut next_read = vec![upto; upto + 1];
        for c in (0..upto).rev() {
            next_read[c] = if slot_of[c] != NONE {
                c
            } else {
                next_read[c + 1]
            };
        }
        Ok(Layout {
            cols,
            slots,
            read,
            upto,
            slot_of,
            next_read,
        })
    }
}

/// A `show stat` answer's lines, kept by a poller for the next poll: a line equal to its
/// counterpart there but for `lastchg` (seconds since the last change, different at every
/// poll) is that row again, with the new `lastchg`, and is not parsed. An edge's servers
/// that took no request since the last poll keep the same line.
#[derive(Debug, Default)]
pub struct Memory {
    header: Vec<u8>,
    text: Vec<u8>,
    /// The rows' lines, in order.
    lines: Vec<Span>,
}

impl Memory {
    fn clear(&mut self) {
        self.header.clear();
        self.text.clear();
        self.lines.clear();
    }
}

/// What a remembering parse gives besides the rows.
#[derive(Debug)]
pub struct Recalled {
    /// This answer's lines, for the next.
    pub memory: Memory,
    /// Per row: whether it is the row at the same place in the answer before (its line the
    /// same but for `lastchg`), so no diff of the two needs to look at it.
    pub taken: Vec<bool>,
}

/// Where a line is in `Memory::text`, and where its `lastchg` field is in the line (both
/// ends at the line's length when it has none, or it was not sliced in place).
#[derive(Debug, Clone, Copy)]
struct Span {
    start: usize,
    end: usize,
    mark: (usize, usize),
}

/// Parses a `show stat` answer as it arrives, line by line: each chunk read from the socket
/// is parsed while it is still in the cache (an answer of 5000 servers is 1.1 MB, more than
/// a core's L2 here: read whole first, it was parsed from memory, 1.9 ms against 1.3 warm).
#[derive(Debug)]
pub struct Parser<'p> {
    layout: Option<Layout>,
    rows: Vec<Row>,
    /// Lines seen, the header included.
    line: u64,
    /// Whether the last line seen was empty (the answer ends with an empty line).
    ended: bool,
    owned: csv::ByteRecord,
    /// The previous answer's lines and rows, when a poller kept them.
    before: Option<(&'p Memory, &'p [Row])>,
    /// This answer's lines, when they are to be kept.
    memory: Option<Memory>,
    /// Per row: whether it was taken from `before` (when remembering).
    taken: Vec<bool>,
    /// Rows taken from `before`.
    reused: usize,
}

impl<'p> Parser<'p> {
    /// A parser expecting about `rows` rows.
    pub fn new(rows: usize) -> Parser<'static> {
        Parser {
            layout: None,
            rows: Vec::with_capacity(rows),
            line: 0,
            ended: false,
            owned: csv::ByteRecord::new(),
            before: None,
            memory: None,
            taken: Vec::new(),
            reused: 0,
        }
    }

    /// A parser that takes from `before` (the previous answer's lines and the rows parsed
    /// from them) each row whose line has not changed, and keeps this answer's lines in
    /// `into` (its buffers reused) for the next.
    pub fn remembering(before: Option<(&'p Memory, &'p [Row])>, mut into: Memory) -> Parser<'p> {
        into.clear();
        let rows = before.map_or(0, |(_, rows)| rows.len());
        Parser {
            before,
            memory: Some(into),
            ..Parser::new(rows)
        }
    }

    /// Parses the complete lines at the start of `bytes` and says how many bytes they were
    /// (up to the last line end): the rest is the start of a line still to come, to be given
    /// again with what follows it.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<usize, ParseError> {
        let Some(last) = memchr::memrchr(b'\n', bytes) else {
            return Ok(0);
        };
        let mut rest = &bytes[..last + 1];
        if self.layout.is_none() {
            let end = memchr::memchr(b'\n', rest).expect("a line end");
            let header = &rest[..end];
            self.layout = Some(Layout::new(header)?);
            self.line = 1;
            rest = &rest[end + 1..];
            if self.before.is_some_and(|(m, _)| m.header != header) {
                self.before = None;
            }
            if let Some(m) = &mut self.memory {
                m.header.extend_from_slice(header);
            }
        }
        let layout = self.layout.as_ref().expect("the header was read");
        let lastchg = layout.slots.lastchg;
        let mut fields: Vec<&str> = vec![""; layout.read.len()];
        while !rest.is_empty() {
            let end = memchr::memchr(b'\n', rest).expect("complete lines");
            let l = &rest[..end];
            rest = &rest[end + 1..];
            self.line += 1;
            self.ended = l.is_empty();
            if l.is_empty() {
                continue;
            }
            let i = self.rows.len();
            let again = self.before.and_then(|(m, rows)| {
                let before = rows.get(i)?;
                Some((before, unchanged(l, m, i, before)?))
            });
            let mark = match again {
                Some((before, (mark, last_change))) => {
                    // Cloned in place: a row is a few hundred bytes, and moving it through
                    // return values was a tenth of a poll.
                    self.rows.push(before.clone());
                    self.rows.last_mut().expect("just pushed").last_change = last_change;
                    self.reused += 1;
                    if self.memory.is_some() {
                        self.taken.push(true);
                    }
                    mark
                }
                None => {
                    let (row, sliced) = line(layout, l, self.line, &mut fields, &mut self.owned)?;
                    self.rows.push(row);
                    if self.memory.is_some() {
                        self.taken.push(false);
                    }
                    match (sliced, lastchg) {
                        (true, Some(slot)) => {
                            let at = fields[slot].as_ptr() as usize - l.as_ptr() as usize;
                            (at, at + fields[slot].len())
                        }
                        _ => (l.len(), l.len()),
                    }
                }
            };
            if let Some(m) = &mut self.memory {
                let start = m.text.len();
                m.text.extend_from_slice(l);
                m.lines.push(Span {
                    start,
                    end: m.text.len(),
                    mark,
                });
            }
        }
        Ok(last + 1)
    }

    /// Whether the lines so far end as a whole answer does (with its empty line).
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// The rows, once the answer has ended; `rest` is what `feed` left of the last bytes.
    pub fn finish(self, rest: &[u8]) -> Result<Vec<Row>, ParseError> {
        Ok(self.finish_remembering(rest)?.0)
    }

    /// The rows and, when `remembering`, this answer's lines and which rows were taken from
    /// the answer before, once the answer has ended.
    pub fn finish_remembering(
        self,
        rest: &[u8],
    ) -> Result<(Vec<Row>, Option<Recalled>), ParseError> {
        // HAProxy ends its answer with an empty line: without it, or with a line cut short,
        // the answer is truncated.
        if self.layout.is_none() || !rest.is_empty() || !self.ended {
            return Err(ParseError::Truncated);
        }
        let taken = self.taken;
        Ok((
            self.rows,
            self.memory.map(|memory| Recalled { memory, taken }),
        ))
    }
}

/// Whether line `l` is line `i` of the previous answer but for `lastchg`: where that field
/// is in `l`, and its value (as `row` reads it). `before` is the row of that line.
fn unchanged(
    l: &[u8],
    m: &Memory,
    i: usize,
    before: &Row,
) -> Option<((usize, usize), Option<u64>)> {
    let span = m.lines.get(i)?;
    let o = &m.text[span.start..span.end];
    let (a, b) = span.mark;
    if l.len() < a || l[..a] != o[..a] {
        return None;
    }
    if a == o.len() {
        // No lastchg sliced from that line: only the very same line is the same row.
        return (l.len() == a).then_some(((a, a), before.last_change));
    }
    let e = a + memchr::memchr(b',', &l[a..]).unwrap_or(l.len() - a);
    if l[e..] != o[b..] {
        return None;
    }
    let field = &l[a..e];
    // A number (-1 for unknown) or nothing; anything else is parsed the whole way.
    if !field.iter().all(|c| c.is_ascii_digit() || *c == b'-') {
        return None;
    }
    let value = std::str::from_utf8(field)
        .ok()
        .and_then(|v| v.parse::<i64>().ok())
        .and_then(|v| u64::try_from(v).ok());
    Some(((a, e), value))
}

/// One line's row. Each line's fields are sliced in place up to the last column a row reads
/// (the other ~110 are only counted), with no allocation per field and only the ~20 fields
/// read kept: this is most of a poll's CPU at 5000 servers. HAProxy quotes a field only when
/// it holds a comma, a quote or a line end (a check description may); such a line goes
/// through the csv crate instead.
fn line<'a>(
    layout: &Layout,
    l: &'a [u8],
    line: u64,
    fields: &mut Vec<&'a str>,
    owned: &mut csv::ByteRecord,
) -> Result<(Row, bool), ParseError> {
    let Layout {
        cols,
        slots,
        read,
        upto,
        slot_of,
        next_read,
    } = layout;
    let upto = *upto;
    // A line that is not all UTF-8 (a check's reply is copied verbatim into columns no row
    // reads) goes the careful way too: only the fields read must be text.
    let utf8 = std::str::from_utf8(l);
    if memchr::memchr(b'"', l).is_some() || utf8.is_err() {
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .from_reader(l);
        match reader.read_byte_record(owned) {
            Ok(true) => {}
            Ok(false) => owned.clear(),
            Err(e) => {
                return Err(ParseError::BadLine {
                    line,
                    reason: e.to_string(),
                });
            }
        }
        if owned.len() != cols.count {
            return Err(count_error(line, owned.len(), cols.count));
        }
        let f = read
            .iter()
            .map(|c| std::str::from_utf8(&owned[*c]).map_err(|_| not_utf8(line)))
            .collect::<Result<Vec<&str>, _>>()?;
        return Ok((row(slots, &f, line)?, false));
    }
    // One check for the line: a comma never splits a UTF-8 sequence, so every field is
    // then a slice of valid text.
    let Ok(l) = utf8 else {
        unreachable!("handled above")
    };
    let b = l.as_bytes();
    let mut n = 0usize;
    let mut start = 0usize;
    // Fields are a few bytes long, so a search per comma costs more than it saves; the
    // commas of eight bytes at a time are found at once instead. Past the last column
    // read, they are only counted.
    let mut k = 0usize;
    while n < upto && k + 8 <= b.len() {
        let mut m = commas(u64::from_le_bytes(b[k..k + 8].try_into().expect("8 bytes")));
        let c = m.count_ones() as usize;
        if c == 0 {
            k += 8;
            continue;
        }
        if n + c <= next_read[n] {
            // None of these commas ends a field that is read.
            n += c;
            start = k + (63 - m.leading_zeros() as usize) / 8 + 1;
            k += 8;
            continue;
        }
        while m != 0 && n < upto {
            let at = k + (m.trailing_zeros() / 8) as usize;
            let slot = slot_of[n];
            if slot != NONE {
                fields[slot as usize] = &l[start..at];
            }
            n += 1;
            start = at + 1;
            m &= m - 1;
        }
        // Past the last column read: the rest of this word's commas.
        n += m.count_ones() as usize;
        k += 8;
    }
    while n < upto && k < b.len() {
        if b[k] == b',' {
            let slot = slot_of[n];
            if slot != NONE {
                fields[slot as usize] = &l[start..k];
            }
            n += 1;
            start = k + 1;
        }
        k += 1;
    }
    if n < upto {
        let slot = slot_of[n];
        if slot != NONE {
            fields[slot as usize] = &l[start..];
        }
    } else {
        let mut chunks = b[k..].chunks_exact(8);
        for c in &mut chunks {
            n += commas(u64::from_le_bytes(c.try_into().expect("8 bytes"))).count_ones() as usize;
        }
        n += chunks.remainder().iter().filter(|b| **b == b',').count();
    }
    n += 1;
    if n != cols.count {
        return Err(count_error(line, n, cols.count));
    }
    Ok((row(slots, fields, line)?, true))
}

/// The high bit of each byte of `w` that is a comma, and no other bit (exact: no carries
/// between bytes).
fn commas(w: u64) -> u64 {
    const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    let x = w ^ 0x2c2c_2c2c_2c2c_2c2c;
    // High bit set in each byte of x that is not zero.
    let nonzero = ((x & LOW7).wrapping_add(LOW7)) | x;
    !nonzero & !LOW7
}

fn count_error(line: u64, got: usize, want: usize) -> ParseError {
    ParseError::BadLine {
        line,
        reason: format!("{got} fields where the header has {want}"),
    }
}

fn not_utf8(line: u64) -> ParseError {
    ParseError::BadLine {
        line,
        reason: "not UTF-8".into(),
    }
}

/// A row from the fields read, `r[c.x]` being column x (as renumbered by `Columns::slots`).
fn row(c: &Columns, r: &[&str], line: u64) -> Result<Row, ParseError> {
    let bad = |reason: String| ParseError::BadLine { line, reason };
    let text = |i: usize| -> Result<&str, ParseError> { Ok(r[i]) };
    let opt_str = |i: Option<usize>| -> Result<Option<&str>, ParseError> {
        Ok(i.map(|i| r[i]).filter(|s| !s.is_empty()))
    };
    let opt_text =
        |i: Option<usize>| -> Result<Option<Text>, ParseError> { Ok(opt_str(i)?.map(Text::from)) };
    let num = |i: Option<usize>| -> Result<Option<u64>, ParseError> {
        match i.map(|i| r[i]) {
            None | Some("") => Ok(None),
            Some(v) => v.parse().map(Some).map_err(|_| {
                bad(format!(
                    "{:?} is not a number",
                    v.chars().take(40).collect::<String>()
                ))
            }),
        }
    };
    let kind = match text(c.kind)? {
        "0" => RowType::Frontend,
        "1" => RowType::Backend,
        "2" => RowType::Server,
        "3" => RowType::Listener,
        other => return Err(bad(format!("unknown row type {other:?}"))),
    };
    let proxy = text(c.pxname)?;
    if proxy.is_empty() {
        return Err(bad("empty proxy name".into()));
    }
    let (check_status, check_in_progress) = match opt_str(c.check_status)? {
        Some(s) => match s.strip_prefix("* ") {
            Some(rest) => (Some(Text::from(rest)), true),
            None => (Some(Text::from(s)), false),
        },
        None => (None, false),
    };
    // HAProxy writes -1 for an unknown last change.
    let signed = |i: Option<usize>| -> Option<u64> {
        i.and_then(|i| r[i].parse::<i64>().ok())
            .and_then(|v| u64::try_from(v).ok())
    };
    Ok(Row {
        proxy: Text::from(proxy),
        server: Text::from(text(c.svname)?),
        kind,
        status: Status::parse(opt_str(c.status)?.unwrap_or_default()),
        current_sessions: num(c.scur)?,
        max_sessions: num(c.smax)?,
        session_limit: num(c.slim)?,
        total_sessions: num(c.stot)?,
        session_rate: num(c.rate)?,
        request_rate: num(c.req_rate)?,
        check_status,
        check_in_progress,
        check_code: num(c.check_code)?
            .map(|v| u32::try_from(v).map_err(|_| bad(format!("check_code {v} is out of range"))))
            .transpose()?,
        check_description: opt_text(c.check_desc)?,
        last_change: signed(c.lastchg),
        downtime: num(c.downtime)?,
        http_5xx: num(c.hrsp_5xx)?,
        weight: num(c.weight)?,
        address: opt_text(c.addr)?,
        cookie: opt_text(c.cookie)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Captured from HAProxy 2.6.12 (Debian 12): a frontend, three servers, a backend.
    const CAPTURED: &str = include_str!("testdata/show-stat-2.6.csv");

    #[test]
    fn real_output_parses_by_column_name() {
        let rows = parse(CAPTURED.as_bytes()).unwrap();
        assert_eq!(rows.len(), 5);
        let fe = &rows[0];
        assert_eq!(
            (fe.proxy.as_str(), fe.server.as_str(), fe.kind),
            ("fe", "FRONTEND", RowType::Frontend)
        );
        assert_eq!(fe.status.state, State::Open);
        assert_eq!(fe.session_limit, Some(9979));
        let s1 = &rows[1];
        assert_eq!((s1.kind, s1.status.state), (RowType::Server, State::Down));
        assert_eq!(s1.check_status.as_deref(), Some("L4CON"));
        assert_eq!(
            s1.check_description.as_deref(),
            Some("Layer4 connection problem")
        );
        assert_eq!(s1.address.as_deref(), Some("127.0.0.1:18081"));
        assert_eq!(
            s1.session_limit, None,
            "an empty column is absent, not zero"
        );
        assert_eq!(rows[2].cookie.as_deref(), Some("S2"));
        assert_eq!(rows[3].status.state, State::NoCheck);
        assert_eq!(rows[4].kind, RowType::Backend);
        assert_eq!(rows[4].status.state, State::Up);
    }

    #[test]
    fn transitional_statuses_keep_state_and_counts() {
        let s = Status::parse("UP 2/3");
        assert_eq!(
            (s.state, s.checks, s.transitional()),
            (State::Up, Some((2, 3)), true)
        );
        let s = Status::parse("DOWN 1/2");
        assert_eq!((s.state, s.checks), (State::Down, Some((1, 2))));
        assert_eq!(Status::parse("MAINT (via be/s1)").state, State::Maint);
        assert_eq!(Status::parse("no check").state, State::NoCheck);
        assert_eq!(Status::parse("DRAIN").state, State::Drain);
        assert_eq!(Status::parse("weird").state, State::Other);
    }

    #[test]
    fn a_running_check_loses_its_star_and_says_so() {
        let text = CAPTURED.replacen(",L4CON,", ",* L4CON,", 1);
        let rows = parse(text.as_bytes()).unwrap();
        assert_eq!(rows[1].check_status.as_deref(), Some("L4CON"));
        assert!(rows[1].check_in_progress);
    }

    #[test]
    fn commas_are_found_eight_bytes_at_a_time_exactly() {
        for text in [
            *b",,,,,,,,",
            *b"a,b,c,d,",
            *b"\x2d\x2b,\xac,\x00,\xff",
            *b"abcdefgh",
        ] {
            let m = commas(u64::from_le_bytes(text));
            for (i, b) in text.iter().enumerate() {
                assert_eq!(m >> (8 * i + 7) & 1 == 1, *b == b',', "{text:?} byte {i}");
            }
            assert_eq!(m & !0x8080_8080_8080_8080, 0);
        }
        // Lines of every length split as a plain split does (fields before and after the
        // last column read, lines shorter and longer than a word).
        let header = "# pxname,svname,type,status,a,b,c,d,e,f,g,h,i,j\n";
        for len in 0..40 {
            let tail: String = (0..len)
                .map(|i| if i % 3 == 0 { ',' } else { 'x' })
                .collect();
            let line = format!("be,s1,2,UP,1,2,3,4,5,6,7,8,9,{tail}");
            let fields = line.split(',').count();
            let text = format!(
                "{}{line}\n\n",
                header.replace(",j\n", &format!(",j{}\n", ",k".repeat(fields - 14)))
            );
            let rows = parse(text.as_bytes()).unwrap_or_else(|e| panic!("{len}: {e}"));
            assert_eq!(
                (rows[0].proxy.as_str(), rows[0].server.as_str()),
                ("be", "s1")
            );
            let short = format!("{}{}\n\n", text.lines().next().unwrap(), "\nbe,s1,2,UP");
            assert!(parse(short.as_bytes()).is_err(), "{len}");
        }
    }

    #[test]
    fn bytes_that_are_not_text_matter_only_in_columns_read() {
        // HAProxy copies a check's reply verbatim into columns no row reads.
        let ok = b"# pxname,svname,type,status,last_chk\nbe,s1,2,UP,\xff\xfe reply\n\n";
        let rows = parse(ok).unwrap();
        assert_eq!(
            (rows[0].server.as_str(), rows[0].status.state),
            ("s1", State::Up)
        );
        let bad = b"# pxname,svname,type,status,last_chk\nbe,s\xff,2,UP,x\n\n";
        assert!(parse(bad).unwrap_err().to_string().contains("not UTF-8"));
    }

    #[test]
    fn random_lines_split_as_a_plain_split_does() {
        // The columns rows read, scattered at random among unread ones, in fields of random
        // widths: words skipped whole, fields across word edges, empty fields.
        let known = [
            "pxname",
            "svname",
            "type",
            "status",
            "scur",
            "smax",
            "slim",
            "stot",
            "rate",
            "req_rate",
            "check_status",
            "check_code",
            "check_desc",
            "lastchg",
            "downtime",
            "hrsp_5xx",
            "weight",
            "addr",
            "cookie",
        ];
        for trial in 0..300u64 {
            let mut rng = trial.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            let mut next = |n: u64| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng % n
            };
            let count = 19 + next(100) as usize;
            let mut names: Vec<String> = (0..count).map(|i| format!("x{i}")).collect();
            let mut places: Vec<usize> = (0..count).collect();
            for (i, k) in known.iter().enumerate() {
                let j = i + next((count - i) as u64) as usize;
                places.swap(i, j);
                names[places[i]] = (*k).to_owned();
            }
            let mut text = format!("# {}\n", names.join(","));
            let mut want = Vec::new();
            for _ in 0..5 {
                let fields: Vec<String> = names
                    .iter()
                    .map(|n| match n.as_str() {
                        "pxname" => format!("p{}", next(1000)),
                        "type" => "2".to_owned(),
                        n if known.contains(&n)
                            && n != "svname"
                            && !n.starts_with("check_")
                            && n != "status"
                            && n != "addr"
                            && n != "cookie" =>
                        {
                            if next(4) == 0 {
                                String::new()
                            } else {
                                {
                                    let bits = next(40);
                                    next(1 << bits).to_string()
                                }
                            }
                        }
                        "check_code" => next(600).to_string(),
                        _ => (0..next(12))
                            .map(|_| (b'a' + next(26) as u8) as char)
                            .collect(),
                    })
                    .collect();
                let line = fields.join(",");
                text.push_str(&line);
                text.push('\n');
                want.push(fields);
            }
            text.push('\n');
            let rows = parse(text.as_bytes()).unwrap_or_else(|e| panic!("trial {trial}: {e}"));
            let at = |n: &str| names.iter().position(|x| x == n).unwrap();
            for (r, f) in rows.iter().zip(&want) {
                assert_eq!(r.proxy, f[at("pxname")], "trial {trial}");
                assert_eq!(r.server, f[at("svname")], "trial {trial}");
                assert_eq!(r.status.raw, f[at("status")], "trial {trial}");
                assert_eq!(r.weight, f[at("weight")].parse().ok(), "trial {trial}");
                assert_eq!(
                    r.total_sessions,
                    f[at("stot")].parse().ok(),
                    "trial {trial}"
                );
                assert_eq!(
                    r.check_code,
                    f[at("check_code")].parse().ok(),
                    "trial {trial}"
                );
                assert_eq!(
                    r.address.as_deref().unwrap_or(""),
                    f[at("addr")],
                    "trial {trial}"
                );
                assert_eq!(
                    r.cookie.as_deref().unwrap_or(""),
                    f[at("cookie")],
                    "trial {trial}"
                );
                assert_eq!(
                    r.check_description.as_deref().unwrap_or(""),
                    f[at("check_desc")],
                    "trial {trial}"
                );
            }
            assert_eq!(rows.len(), 5);
        }
    }

    #[test]
    fn a_quoted_field_with_a_comma_is_one_field() {
        let text = CAPTURED.replacen(
            "Layer4 connection problem",
            "\"Layer4 connection problem, \"\"refused\"\"\"",
            1,
        );
        let rows = parse(text.as_bytes()).unwrap();
        assert_eq!(
            rows[1].check_description.as_deref(),
            Some("Layer4 connection problem, \"refused\"")
        );
        assert_eq!(rows[1].address.as_deref(), Some("127.0.0.1:18081"));
        assert_eq!(rows, {
            let mut want = parse(CAPTURED.as_bytes()).unwrap();
            want[1].check_description = Some("Layer4 connection problem, \"refused\"".into());
            want
        });
    }

    #[test]
    fn reordered_and_missing_columns_are_found_by_name() {
        let text = "# svname,type,pxname,status,extra\ns1,2,be,UP,x\n\n";
        let rows = parse(text.as_bytes()).unwrap();
        assert_eq!(
            (rows[0].proxy.as_str(), rows[0].server.as_str()),
            ("be", "s1")
        );
        assert_eq!(rows[0].weight, None);
        assert_eq!(rows[0].current_sessions, None);
    }

    /// Parses `text` fed in chunks of random sizes, remembering `before`.
    fn parse_remembering(
        text: &[u8],
        before: Option<(&Memory, &[Row])>,
        next: &mut impl FnMut(u64) -> u64,
    ) -> (Result<Vec<Row>, ParseError>, Option<Memory>, usize) {
        let mut p = Parser::remembering(before, Memory::default());
        let mut fed = 0;
        let mut cut = 0;
        while cut < text.len() {
            cut = (cut + 1 + next(300) as usize).min(text.len());
            match p.feed(&text[fed..cut]) {
                Ok(used) => fed += used,
                Err(e) => return (Err(e), None, p.reused),
            }
        }
        let reused = p.reused;
        match p.finish_remembering(&text[fed..]) {
            Ok((rows, recalled)) => {
                let recalled = recalled.expect("remembering");
                assert_eq!(recalled.taken.iter().filter(|t| **t).count(), reused);
                (Ok(rows), Some(recalled.memory), reused)
            }
            Err(e) => (Err(e), None, reused),
        }
    }

    #[test]
    fn rows_of_unchanged_lines_are_the_rows_a_full_parse_gives() {
        // A chain of answers, each the last with random changes: lastchg (as at every poll),
        // other fields, quoted fields, lines gone or repeated, now and then another header.
        // Each parsed remembering the one before must give what a parse from nothing gives.
        let lines: Vec<&str> = CAPTURED.lines().collect();
        let header = lines[0];
        let names: Vec<&str> = header.trim_start_matches("# ").split(',').collect();
        let col = |n: &str| names.iter().position(|c| *c == n).unwrap();
        let (lastchg, scur, status, desc) = (
            col("lastchg"),
            col("scur"),
            col("status"),
            col("check_desc"),
        );
        let mut rows: Vec<Vec<String>> = lines[1..]
            .iter()
            .filter(|l| !l.is_empty())
            .map(|l| l.split(',').map(str::to_owned).collect())
            .collect();
        let mut rng = 0x2545_F491_4F6C_DD1Du64;
        let mut next = |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let mut before: Option<(Memory, Vec<Row>)> = None;
        let (mut reused, mut changed_header) = (0, 0);
        for round in 0..400 {
            // Now and then the names of two columns read trade places while the lines stay
            // as they were: the same bytes mean other rows.
            let mut head = if next(10) == 0 {
                changed_header += 1;
                header.replacen(",scur,smax,", ",smax,scur,", 1)
            } else {
                header.to_owned()
            };
            for r in rows.iter_mut() {
                r[lastchg] = match next(10) {
                    0 => "-1".into(),
                    1 => String::new(),
                    // Not a number: a fresh parse reads a quoted one, and no number from this.
                    2 => "\"5\"".into(),
                    3 => "5x".into(),
                    _ => next(100_000).to_string(),
                };
                match next(12) {
                    0 => r[scur] = next(20).to_string(),
                    1 => {
                        r[status] =
                            ["UP", "DOWN", "MAINT", "UP 1/3", "no check"][next(5) as usize].into()
                    }
                    2 => r[desc] = "\"a, quoted\"".into(),
                    3 => r[desc] = String::new(),
                    _ => {}
                }
            }
            let mut answer: Vec<&Vec<String>> = rows.iter().collect();
            match next(10) {
                0 => {
                    answer.remove(next(answer.len() as u64) as usize);
                }
                1 => answer.insert(next(answer.len() as u64) as usize, &rows[0]),
                2 => {
                    head.push_str(",extra");
                    changed_header += 1;
                }
                3 => {}
                _ => {}
            }
            let mut text = format!("{head}\n");
            for r in &answer {
                text.push_str(&r.join(","));
                if head.ends_with(",extra") {
                    text.push(',');
                }
                text.push('\n');
            }
            text.push('\n');
            let plain = parse(text.as_bytes());
            let (got, memory, n) = parse_remembering(
                text.as_bytes(),
                before.as_ref().map(|(m, r)| (m, &r[..])),
                &mut next,
            );
            assert_eq!(got, plain, "round {round}");
            reused += n;
            before = got.ok().map(|rows| (memory.expect("remembering"), rows));
        }
        // Most lines were taken again; a changed header took none.
        assert!(reused > 200, "{reused} rows taken from the poll before");
        assert!(changed_header > 10);
    }

    #[test]
    fn truncated_output_is_an_error_at_every_cut() {
        let bytes = CAPTURED.as_bytes();
        for cut in 0..bytes.len() - 1 {
            // A cut at a line end looks complete but lacks the answer's closing blank line.
            assert!(
                parse(&bytes[..cut]).is_err(),
                "a cut at byte {cut} must not parse"
            );
        }
    }

    #[test]
    fn corrupted_output_is_an_error_never_a_panic() {
        let mut bytes = CAPTURED.as_bytes().to_vec();
        let mut seed = 0x2545F4914F6CDD1Du64;
        for _ in 0..2000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let i = (seed as usize) % bytes.len();
            let saved = bytes[i];
            bytes[i] = (seed >> 32) as u8;
            let _ = parse(&bytes);
            bytes[i] = saved;
        }
        assert!(parse(b"HTTP/1.1 400 Bad Request\n").is_err());
        assert!(parse(b"").is_err());
        assert!(matches!(
            parse(b"# svname,type\nx,2\n"),
            Err(ParseError::MissingColumn("pxname"))
        ));
        let short = CAPTURED.replacen(",L4CON,", ",", 1);
        assert!(matches!(
            parse(short.as_bytes()),
            Err(ParseError::BadLine { line: 3, .. })
        ));
    }
}
