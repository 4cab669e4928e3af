//! A haproxy.cfg read as HAProxy reads it — lines, words, sections, `.if` blocks — kept
//! byte for byte, so that an edit rewrites only the lines it changes: comments, order,
//! indentation, blank lines and line endings elsewhere stay exactly as they were. (HAProxy's
//! Data Plane API re-renders whole files from a model and loses comments and order; no crate
//! parses haproxy.cfg losslessly, hence this module.)

use std::ops::Range;

/// Keywords that open a section.
const SECTIONS: &[&str] = &[
    "global",
    "defaults",
    "frontend",
    "backend",
    "listen",
    "userlist",
    "peers",
    "resolvers",
    "mailers",
    "program",
    "http-errors",
    "ring",
    "cache",
    "log-forward",
    "crt-store",
    "traces",
    "fcgi-app",
    "acme",
];

/// Whether a keyword opens a section.
pub(crate) fn is_section_keyword(word: &str) -> bool {
    SECTIONS.contains(&word)
}

/// One line of the file.
#[derive(Debug, Clone)]
pub(crate) struct Line<'a> {
    /// The line without its ending.
    pub(crate) text: &'a str,
    /// `"\n"`, `"\r\n"`, or `""` for a last line without one.
    pub(crate) eol: &'a str,
    /// Its words as HAProxy splits them (empty for a blank or comment line).
    pub(crate) words: Vec<String>,
    /// Inside a `.if` block.
    pub(crate) conditional: bool,
}

/// A section: its header line and the lines up to the next header.
#[derive(Debug, Clone)]
pub(crate) struct Section {
    /// `frontend`, `backend`, `global` ...
    pub(crate) kind: String,
    /// Its name (`defaults` may have one; `global` has none).
    pub(crate) name: Option<String>,
    /// The header's line index.
    pub(crate) header: usize,
    /// The lines after the header, to the next header (or the end).
    pub(crate) body: Range<usize>,
}

/// A parsed configuration.
#[derive(Debug)]
pub(crate) struct Cfg<'a> {
    pub(crate) lines: Vec<Line<'a>>,
    pub(crate) sections: Vec<Section>,
    /// The line ending new lines get: the file's first.
    pub(crate) eol: &'static str,
}

impl<'a> Cfg<'a> {
    /// Reads `text`; the error names the line HAProxy could not split either.
    pub(crate) fn parse(text: &'a str) -> Result<Cfg<'a>, String> {
        let mut lines = Vec::new();
        let mut depth = 0usize;
        for (i, raw) in text.split_inclusive('\n').enumerate() {
            let (body, eol) = match raw.strip_suffix("\r\n") {
                Some(b) => (b, "\r\n"),
                None => match raw.strip_suffix('\n') {
                    Some(b) => (b, "\n"),
                    None => (raw, ""),
                },
            };
            let words = words(body).map_err(|why| format!("line {}: {why}", i + 1))?;
            let first = words.first().map(String::as_str);
            // The `.if` line itself and `.endif` count as inside, so nothing is placed
            // between a condition and its block.
            let conditional = match first {
                Some(".if") => {
                    depth += 1;
                    true
                }
                Some(".endif") => {
                    depth = depth.saturating_sub(1);
                    true
                }
                _ => depth > 0,
            };
            lines.push(Line {
                text: body,
                eol,
                words,
                conditional,
            });
        }
        let eol = match lines.iter().map(|l| l.eol).find(|e| !e.is_empty()) {
            Some("\r\n") => "\r\n",
            _ => "\n",
        };
        let mut sections: Vec<Section> = Vec::new();
        for (i, l) in lines.iter().enumerate() {
            let Some(first) = l.words.first() else {
                continue;
            };
            if SECTIONS.contains(&first.as_str()) {
                if let Some(prev) = sections.last_mut() {
                    prev.body.end = i;
                }
                sections.push(Section {
                    kind: first.clone(),
                    name: l.words.get(1).cloned(),
                    header: i,
                    body: i + 1..lines.len(),
                });
            }
        }
        Ok(Cfg {
            lines,
            sections,
            eol,
        })
    }

    /// The one section of that kind and name; none, or (refused) several.
    pub(crate) fn section(&self, kind: &str, name: &str) -> Result<Option<&Section>, String> {
        let found: Vec<&Section> = self
            .sections
            .iter()
            .filter(|s| s.kind == kind && s.name.as_deref() == Some(name))
            .collect();
        match found.as_slice() {
            [] => Ok(None),
            [one] => {
                if self.lines[one.header].conditional {
                    return Err(format!(
                        "{kind} {name} (line {}) is inside a .if block: stately does not edit conditional sections",
                        one.header + 1
                    ));
                }
                Ok(Some(one))
            }
            many => Err(format!(
                "{kind} {name} is defined {} times (lines {}): edit it by hand",
                many.len(),
                many.iter()
                    .map(|s| (s.header + 1).to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }

    /// The keyword lines of a section, with their indices.
    pub(crate) fn keyword_lines<'s>(
        &'s self,
        s: &Section,
    ) -> impl Iterator<Item = (usize, &'s Line<'a>)> + 's {
        let range = s.body.clone();
        range
            .map(move |i| (i, &self.lines[i]))
            .filter(|(_, l)| !l.words.is_empty())
    }

    /// The indentation of a section's keyword lines (its first), or four spaces.
    pub(crate) fn indent(&self, s: &Section) -> String {
        self.keyword_lines(s)
            .find(|(_, l)| !l.conditional)
            .map(|(_, l)| l.text[..l.text.len() - l.text.trim_start().len()].to_owned())
            .filter(|i| !i.is_empty())
            .unwrap_or_else(|| "    ".to_owned())
    }

    /// Where a line appended to a section goes: after its last keyword line.
    pub(crate) fn end_of(&self, s: &Section) -> usize {
        self.keyword_lines(s)
            .last()
            .map_or(s.header + 1, |(i, _)| i + 1)
    }
}

/// Changes to a configuration, made at once: each names lines of the original.
#[derive(Debug, Default)]
pub(crate) struct Rewrite {
    /// Lines to insert before original line `at` (`lines.len()`: at the end), in order.
    inserts: Vec<(usize, String)>,
    /// Original lines replaced (by None: removed).
    replaced: std::collections::BTreeMap<usize, Option<String>>,
    /// Sections appended at the end of the file.
    appended: Vec<String>,
}

impl Rewrite {
    /// Inserts `line` (without its ending) before original line `at`.
    pub(crate) fn insert(&mut self, at: usize, line: String) {
        self.inserts.push((at, line));
    }

    /// Replaces original line `at`.
    pub(crate) fn replace(&mut self, at: usize, line: String) {
        self.replaced.insert(at, Some(line));
    }

    /// Removes original line `at`.
    pub(crate) fn remove(&mut self, at: usize) {
        self.replaced.insert(at, None);
    }

    /// Appends a line at the end of the file.
    pub(crate) fn append(&mut self, line: String) {
        self.appended.push(line);
    }

    /// Whether nothing is changed.
    pub(crate) fn is_empty(&self) -> bool {
        self.inserts.is_empty() && self.replaced.is_empty() && self.appended.is_empty()
    }

    /// The new text: original lines and their endings as they were, except those changed.
    pub(crate) fn render(&self, cfg: &Cfg<'_>) -> String {
        let mut out = String::new();
        let eol = cfg.eol;
        let mut inserts = self.inserts.clone();
        // Stable: lines inserted at one place keep the order they were given in.
        inserts.sort_by_key(|(at, _)| *at);
        let mut next = inserts.into_iter().peekable();
        let n = cfg.lines.len();
        for (i, line) in cfg.lines.iter().enumerate() {
            while let Some((_, new)) = next.next_if(|(at, _)| *at == i) {
                out.push_str(&new);
                out.push_str(eol);
            }
            match self.replaced.get(&i) {
                None => {
                    out.push_str(line.text);
                    out.push_str(line.eol);
                }
                Some(Some(new)) => {
                    out.push_str(new);
                    out.push_str(if line.eol.is_empty() && i + 1 < n {
                        eol
                    } else {
                        line.eol
                    });
                }
                Some(None) => {}
            }
        }
        let tail: Vec<String> = next
            .map(|(_, l)| l)
            .chain(self.appended.iter().cloned())
            .collect();
        if !tail.is_empty() {
            // A last line without an ending gets one, so what follows starts a line.
            if !out.is_empty() && !out.ends_with('\n') {
                out.push_str(eol);
            }
            for l in tail {
                out.push_str(&l);
                out.push_str(eol);
            }
        }
        out
    }
}

/// Appends words to a line, before any comment it ends with, keeping the rest as written.
pub(crate) fn with_words(line: &str, extra: &str) -> String {
    let code_end = comment_start(line).unwrap_or(line.len());
    let code = line[..code_end].trim_end();
    let rest = &line[code.len()..];
    format!("{code} {extra}{rest}")
}

/// The `# comment` a line ends with, if any (outside quotes and escapes).
pub(crate) fn trailing_comment(line: &str) -> Option<&str> {
    comment_start(line).map(|i| &line[i..])
}

/// Where a `#` comment starts outside quotes and escapes, if there is one.
fn comment_start(line: &str) -> Option<usize> {
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for (i, c) in line.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        match (quote, c) {
            (Some('\''), '\'') => quote = None,
            (Some('\''), _) => {}
            (_, '\\') => escaped = true,
            (None, '#') => return Some(i),
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            _ => {}
        }
    }
    None
}

/// Splits a line into words as HAProxy does: blanks separate, `#` outside quotes starts a
/// comment, double and single quotes group, a backslash escapes the next character.
pub(crate) fn words(line: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (None, '#') => break,
            (None, c) if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            (None, '"' | '\'') => {
                quote = Some(c);
                in_word = true;
            }
            (Some(q), c) if c == q => quote = None,
            (Some('\''), c) => cur.push(c),
            (_, '\\') => {
                in_word = true;
                // HAProxy's escapes, decoded as it decodes them, so `lua-loa\x64` is seen as
                // `lua-load`; any other pair is kept as written, as HAProxy keeps it.
                match chars.next() {
                    Some(n @ (' ' | '\\' | '#' | '\'' | '"' | '$')) => cur.push(n),
                    Some('t') => cur.push('\t'),
                    Some('n') => cur.push('\n'),
                    Some('r') => cur.push('\r'),
                    Some('x') => {
                        let hex: String = chars.by_ref().take(2).collect();
                        let byte = u8::from_str_radix(&hex, 16).map_err(|_| {
                            format!("a \\x escape needs two hex digits, not {hex:?}")
                        })?;
                        if !byte.is_ascii() {
                            return Err("a \\x escape outside ASCII".into());
                        }
                        cur.push(byte as char);
                    }
                    Some(n) => {
                        // HAProxy keeps any other pair as written (`\.` in a regex, `\1`).
                        cur.push('\\');
                        cur.push(n);
                    }
                    None => return Err("a line ends with a backslash".into()),
                }
            }
            (_, c) => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if quote.is_some() {
        return Err("a quote is not closed".into());
    }
    if in_word {
        out.push(cur);
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Files as people write them: CRLF, tabs, no final newline, comments everywhere, a
    /// quoted `#`, `.if` blocks, named defaults, listen/userlist/peers sections.
    pub(crate) const CORPUS: &[&str] = &[
        "global\n    daemon\n\ndefaults\n    mode http\n",
        "global\r\n\tdaemon\r\n# comment\r\nfrontend web\r\n\tbind :80\r\n",
        "frontend web\n    bind :80\n    default_backend app",
        "# top comment\n\nglobal # trailing\n  log stdout format raw local0 # inline\n\n\n# between\nbackend app\n  http-request set-header X-Note \"a # not a comment\"\n  server s1 127.0.0.1:8080 check # first\n",
        "global\n.if defined(DEBUG)\n    log stdout local0 debug\n.else\n    log stdout local0\n.endif\n",
        "defaults web\n  mode http\ndefaults tcp\n  mode tcp\nlisten stats from web\n  bind :8404\nuserlist admins\n  user admin insecure-password x\npeers mypeers\n  peer a 127.0.0.1:10000\n",
        "",
        "\n\n\n",
        "frontend   web   # spaced\n\t  bind\t:80  \n",
    ];

    #[test]
    fn an_empty_rewrite_gives_every_byte_back() {
        for text in CORPUS {
            let cfg = Cfg::parse(text).unwrap();
            assert_eq!(Rewrite::default().render(&cfg), *text, "{text:?}");
        }
    }

    #[test]
    fn sections_are_found_with_their_bodies() {
        let text = CORPUS[5];
        let cfg = Cfg::parse(text).unwrap();
        let kinds: Vec<(&str, Option<&str>)> = cfg
            .sections
            .iter()
            .map(|s| (s.kind.as_str(), s.name.as_deref()))
            .collect();
        assert_eq!(
            kinds,
            [
                ("defaults", Some("web")),
                ("defaults", Some("tcp")),
                ("listen", Some("stats")),
                ("userlist", Some("admins")),
                ("peers", Some("mypeers"))
            ]
        );
        let listen = cfg.section("listen", "stats").unwrap().unwrap();
        assert_eq!(cfg.lines[listen.body.start].words, ["bind", ":8404"]);
    }

    #[test]
    fn a_line_inserted_takes_the_sections_indent_and_the_files_line_ending() {
        let text = CORPUS[1];
        let cfg = Cfg::parse(text).unwrap();
        let web = cfg.section("frontend", "web").unwrap().unwrap();
        let mut r = Rewrite::default();
        r.insert(cfg.end_of(web), format!("{}mode http", cfg.indent(web)));
        assert_eq!(
            r.render(&cfg),
            "global\r\n\tdaemon\r\n# comment\r\nfrontend web\r\n\tbind :80\r\n\tmode http\r\n"
        );
    }

    #[test]
    fn a_file_without_a_final_newline_gets_one_only_where_a_line_follows() {
        let text = CORPUS[2];
        let cfg = Cfg::parse(text).unwrap();
        let web = cfg.section("frontend", "web").unwrap().unwrap();
        let mut r = Rewrite::default();
        r.insert(cfg.end_of(web), "    mode http".into());
        assert_eq!(
            r.render(&cfg),
            "frontend web\n    bind :80\n    default_backend app\n    mode http\n"
        );
        let mut r = Rewrite::default();
        r.insert(1, "    mode http".into());
        assert_eq!(
            r.render(&cfg),
            "frontend web\n    mode http\n    bind :80\n    default_backend app"
        );
    }

    #[test]
    fn words_are_appended_before_a_trailing_comment() {
        assert_eq!(
            with_words("  server s1 127.0.0.1:8080 # first", "check"),
            "  server s1 127.0.0.1:8080 check # first"
        );
        assert_eq!(
            with_words("  server s1 a:1", "cookie s1"),
            "  server s1 a:1 cookie s1"
        );
        assert_eq!(
            with_words("  server s1 \"a#b\" # c", "check"),
            "  server s1 \"a#b\" check # c"
        );
    }

    #[test]
    fn conditional_and_duplicate_sections_are_refused() {
        let cfg = Cfg::parse(".if defined(X)\nfrontend a\n  bind :1\n.endif\n").unwrap();
        assert!(cfg.section("frontend", "a").unwrap_err().contains(".if"));
        let cfg = Cfg::parse("backend a\n  server s 1:1\nbackend a\n  server t 1:2\n").unwrap();
        let e = cfg.section("backend", "a").unwrap_err();
        assert!(e.contains("2 times") && e.contains("lines 1, 3"), "{e}");
    }
}
