//! Runbooks: operator-defined sequences of built-in steps, as the daemon's configuration
//! declares them (`[[runbook]]`, and files named by `include`), and the `{param}` templates
//! their strings hold. The `runbook` kind runs them.

use crate::fsops::{is_normal, is_safe_name};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A file named by `include`: runbooks only.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RunbookFile {
    #[serde(rename = "runbook", default)]
    pub(crate) runbooks: Vec<Runbook>,
}

/// A named, operator-defined sequence of steps.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Runbook {
    /// What clients call it by.
    pub name: String,
    /// One line for listings.
    #[serde(default)]
    pub description: String,
    /// Every path a file step touches must lie under one of these.
    #[serde(default)]
    pub roots: Vec<PathBuf>,
    /// Resources the job holds (templates allowed); default `runbook:<name>`.
    pub resources: Option<Vec<String>>,
    /// Declared parameters: nothing else may be passed.
    #[serde(default)]
    pub params: BTreeMap<String, ParamSpec>,
    /// The steps, in order.
    #[serde(rename = "step", default)]
    pub steps: Vec<StepSpec>,
}

/// A declared runbook parameter.
#[derive(Clone, Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ParamSpec {
    /// For people.
    #[serde(default)]
    pub description: String,
    /// The value when the client passes none; without one, the parameter is required.
    pub default: Option<String>,
    /// A regular expression the whole value must match.
    pub pattern: Option<String>,
    /// `pattern`, anchored and compiled once when the config is loaded.
    #[serde(skip)]
    pub(crate) compiled: Option<regex::Regex>,
}

/// One step of a runbook, as written in the config. Strings may hold `{param}` templates.
/// (Unknown keys are refused by `Action`, which sees every key but `name`.)
#[derive(Clone, Debug, Deserialize)]
pub struct StepSpec {
    /// Shown in progress and in the job's steps.
    pub name: Option<String>,
    /// What the step does, with its own settings.
    #[serde(flatten)]
    pub action: Action,
}

impl Action {
    /// The step type's name, as the configuration writes it.
    pub fn type_name(&self) -> &'static str {
        match self {
            Action::Command { .. } => "command",
            Action::Check { .. } => "check",
            Action::BackupFile { .. } => "backup_file",
            Action::WriteFile { .. } => "write_file",
            Action::Download { .. } => "download",
            Action::Chown { .. } => "chown",
            Action::Chmod { .. } => "chmod",
        }
    }
}

/// The built-in step actions.
#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Action {
    /// Run a program; `undo` is run when the step is unwound.
    Command {
        /// Program and arguments (no shell).
        argv: Vec<String>,
        /// Program and arguments that reverse it.
        undo: Option<Vec<String>>,
        /// Working directory.
        cwd: Option<String>,
        /// Environment, on top of a clean one with only PATH and LANG.
        #[serde(default)]
        env: BTreeMap<String, String>,
        /// Killed (and the step failed) after this long; default 5 minutes.
        timeout: Option<String>,
    },
    /// Run a program whose failure fails the job; it changes nothing, so it has no undo.
    Check {
        /// Program and arguments (no shell).
        argv: Vec<String>,
        /// Working directory.
        cwd: Option<String>,
        /// Environment, on top of a clean one.
        #[serde(default)]
        env: BTreeMap<String, String>,
        /// Killed (and the step failed) after this long; default 5 minutes.
        timeout: Option<String>,
    },
    /// Keep a copy of a file so that unwinding puts it back as it is now.
    BackupFile {
        /// The file.
        path: String,
    },
    /// Write a file atomically from a template.
    WriteFile {
        /// The file.
        path: String,
        /// Its content; usually `{some_param}`.
        content: String,
        /// Octal mode, e.g. "0640"; default 0644.
        mode: Option<String>,
        /// Owner user name.
        owner: Option<String>,
        /// Owner group name.
        group: Option<String>,
    },
    /// Fetch a URL into a file atomically, with a size limit.
    Download {
        /// HTTP(S) URL.
        url: String,
        /// The file.
        path: String,
        /// Bytes at most; default 10 MiB.
        max_bytes: Option<u64>,
        /// Default 5 minutes.
        timeout: Option<String>,
        /// Octal mode; default 0644.
        mode: Option<String>,
    },
    /// Change a file's owner and/or group.
    Chown {
        /// The file.
        path: String,
        /// User name.
        owner: Option<String>,
        /// Group name.
        group: Option<String>,
    },
    /// Change a file's mode.
    Chmod {
        /// The file.
        path: String,
        /// Octal mode, e.g. "0600".
        mode: String,
    },
}

impl Action {
    /// The step name used when the config gives none.
    pub fn default_name(&self) -> String {
        match self {
            Action::Command { argv, .. } => format!("run {}", argv.join(" ")),
            Action::Check { argv, .. } => format!("check {}", argv.join(" ")),
            Action::BackupFile { path } => format!("back up {path}"),
            Action::WriteFile { path, .. } => format!("write {path}"),
            Action::Download { path, .. } => format!("download {path}"),
            Action::Chown { path, .. } => format!("chown {path}"),
            Action::Chmod { path, .. } => format!("chmod {path}"),
        }
    }

    /// Every template string in the action, for validation.
    pub(crate) fn templates(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        match self {
            Action::Command {
                argv,
                undo,
                cwd,
                env,
                ..
            } => {
                out.extend(argv.iter().map(String::as_str));
                out.extend(undo.iter().flatten().map(String::as_str));
                out.extend(cwd.as_deref());
                out.extend(env.values().map(String::as_str));
            }
            Action::Check { argv, cwd, env, .. } => {
                out.extend(argv.iter().map(String::as_str));
                out.extend(cwd.as_deref());
                out.extend(env.values().map(String::as_str));
            }
            Action::BackupFile { path } | Action::Chmod { path, .. } => out.push(path),
            Action::WriteFile {
                path,
                content,
                owner,
                group,
                ..
            } => {
                out.extend([path.as_str(), content.as_str()]);
                out.extend(owner.as_deref());
                out.extend(group.as_deref());
            }
            Action::Download { url, path, .. } => out.extend([url.as_str(), path.as_str()]),
            Action::Chown { path, owner, group } => {
                out.push(path);
                out.extend(owner.as_deref());
                out.extend(group.as_deref());
            }
        }
        out
    }
}

/// Checks what the schema alone cannot: names, templates, roots, modes, timeouts.
pub(crate) fn check(runbooks: &[Runbook]) -> Result<(), String> {
    let mut names = std::collections::HashSet::new();
    for rb in runbooks {
        let at = format!("runbook '{}'", rb.name);
        if !is_safe_name(&rb.name) {
            return Err(format!("{at}: a name is letters, digits, '-', '_' and '.'"));
        }
        if !names.insert(rb.name.as_str()) {
            return Err(format!("{at} is defined twice"));
        }
        if rb.steps.is_empty() {
            return Err(format!("{at} has no steps"));
        }
        for root in &rb.roots {
            if !root.is_absolute() || !is_normal(root) {
                return Err(format!(
                    "{at}: root {} must be an absolute path without '..'",
                    root.display()
                ));
            }
        }
        for (name, spec) in &rb.params {
            if !is_safe_name(name) {
                return Err(format!("{at}: parameter name '{name}' is not a plain name"));
            }
            if let Some(p) = &spec.pattern {
                regex::Regex::new(&format!("^(?:{p})$"))
                    .map_err(|e| format!("{at}: parameter '{name}': bad pattern: {e}"))?;
            }
        }
        let check_template = |s: &str, what: &str| -> Result<(), String> {
            for used in template_names(s).map_err(|e| format!("{at}, {what}: {e}"))? {
                if !rb.params.contains_key(&used) {
                    return Err(format!(
                        "{at}, {what}: {{{used}}} is not a declared parameter"
                    ));
                }
            }
            Ok(())
        };
        for r in rb.resources.iter().flatten() {
            check_template(r, "resources")?;
        }
        for (i, step) in rb.steps.iter().enumerate() {
            let what = format!("step {}", i + 1);
            for t in step.action.templates() {
                check_template(t, &what)?;
            }
            let needs_roots = !matches!(step.action, Action::Command { .. } | Action::Check { .. });
            if needs_roots && rb.roots.is_empty() {
                return Err(format!("{at}, {what}: file steps need `roots`"));
            }
            match &step.action {
                Action::Command { argv, timeout, .. } | Action::Check { argv, timeout, .. } => {
                    if argv.is_empty() {
                        return Err(format!("{at}, {what}: argv is empty"));
                    }
                    if let Some(t) = timeout {
                        humantime::parse_duration(t)
                            .map_err(|e| format!("{at}, {what}: timeout '{t}': {e}"))?;
                    }
                }
                Action::WriteFile { mode: Some(m), .. }
                | Action::Download { mode: Some(m), .. }
                | Action::Chmod { mode: m, .. } => {
                    parse_mode(m).map_err(|e| format!("{at}, {what}: {e}"))?;
                }
                _ => {}
            }
            if let Action::Download {
                timeout: Some(t), ..
            } = &step.action
            {
                humantime::parse_duration(t)
                    .map_err(|e| format!("{at}, {what}: timeout '{t}': {e}"))?;
            }
        }
    }
    Ok(())
}

/// What a runbook's configuration allows but will fail at run time, for `--check-config`: a
/// literal file-step path outside the runbook's roots (every run is refused), a command whose
/// program does not exist.
pub(crate) fn warnings(rb: &Runbook) -> Vec<String> {
    let mut out = Vec::new();
    for (i, step) in rb.steps.iter().enumerate() {
        let at = format!("runbook '{}', step {}", rb.name, i + 1);
        let path = match &step.action {
            Action::BackupFile { path }
            | Action::Chmod { path, .. }
            | Action::WriteFile { path, .. }
            | Action::Download { path, .. }
            | Action::Chown { path, .. } => Some(path),
            Action::Command { argv, .. } | Action::Check { argv, .. } => {
                if let Some(program) = argv.first().filter(|p| !p.contains('{'))
                    && crate::command::find_program(program).is_none()
                {
                    out.push(format!(
                        "{at}: the program {program} is not found (nor is it on PATH): the step will fail"
                    ));
                }
                None
            }
        };
        if let Some(path) = path.filter(|p| !p.contains('{')) {
            let p = Path::new(path);
            if !rb
                .roots
                .iter()
                .any(|r| p.starts_with(r) && p != r.as_path())
            {
                out.push(format!(
                    "{at}: the path {path} is outside the runbook's roots: every run will be refused"
                ));
            }
        }
    }
    out
}

/// Compiles each parameter's pattern once, anchored (after [`check`] accepted it).
pub(crate) fn compile(runbooks: &mut [Runbook]) {
    for spec in runbooks.iter_mut().flat_map(|r| r.params.values_mut()) {
        spec.compiled = spec
            .pattern
            .as_deref()
            .and_then(|p| regex::Regex::new(&format!("^(?:{p})$")).ok());
    }
}

/// Parses an octal file mode such as "0644".
pub(crate) fn parse_mode(s: &str) -> Result<u32, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o7777 => Ok(m),
        _ => Err(format!("mode '{s}' is not an octal mode like \"0644\"")),
    }
}

/// The parameter names a template uses: `{name}`; `{{` and `}}` are literal braces.
pub(crate) fn template_names(s: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    render(s, |name| {
        out.push(name.to_owned());
        Some(String::new())
    })?;
    Ok(out)
}

/// Expands `{name}` with `lookup`; `{{`/`}}` are literal braces.
pub(crate) fn render(
    s: &str,
    mut lookup: impl FnMut(&str) -> Option<String>,
) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                out.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                out.push('}');
            }
            '{' => {
                let mut name = String::new();
                loop {
                    match chars.next() {
                        Some('}') => break,
                        Some(c) => name.push(c),
                        None => return Err(format!("unclosed '{{' in \"{s}\"")),
                    }
                }
                match lookup(&name) {
                    Some(v) => out.push_str(&v),
                    None => return Err(format!("{{{name}}} is not a declared parameter")),
                }
            }
            '}' => return Err(format!("lone '}}' in \"{s}\" (write '}}}}')")),
            c => out.push(c),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_expand_and_escape() {
        let out = render("a{x}b{{c}}", |n| (n == "x").then(|| "X".to_owned())).unwrap();
        assert_eq!(out, "aXb{c}");
        assert!(render("{y}", |_| None).is_err());
        assert!(render("{open", |_| Some(String::new())).is_err());
    }
}
