//! The API keeps its promises: `proto/` passes buf's lint (buf.yaml says which naming rules
//! v1 cannot follow without breaking clients), breaks no client of the previous commit, and
//! the breaking-change check itself can fail (a renumbered field).

use std::path::{Path, PathBuf};
use std::process::Command;

/// buf, from the npm package @bufbuild/buf that scripts/test.sh installs under target/.
fn buf() -> Command {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let exe = std::env::current_exe().unwrap();
    let target = exe.ancestors().nth(3).unwrap().to_owned();
    let buf: PathBuf = target.join("buf/node_modules/.bin/buf");
    assert!(
        buf.exists(),
        "{} is missing: scripts/test.sh installs it (npm install --prefix target/buf @bufbuild/buf)",
        buf.display()
    );
    let mut c = Command::new(buf);
    c.current_dir(root);
    c
}

#[test]
fn the_protos_pass_buf_lint() {
    let out = buf().arg("lint").output().unwrap();
    assert!(
        out.status.success(),
        "buf lint:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_protos_break_no_client_of_the_previous_commit() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let previous = Command::new("git")
        .args(["rev-parse", "--verify", "HEAD~1"])
        .current_dir(root)
        .output()
        .unwrap();
    assert!(
        previous.status.success(),
        "the breaking-change check needs the previous commit (a clone with history): {}",
        String::from_utf8_lossy(&previous.stderr)
    );
    let out = buf()
        .args([
            "breaking",
            "proto",
            "--against",
            ".git#ref=HEAD~1,subdir=proto",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "a change to proto/ would break clients of the previous commit (make it a new version package instead):\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

#[test]
fn the_breaking_check_fails_on_a_renumbered_field() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let (before, after) = (dir.path().join("before"), dir.path().join("after"));
    copy_dir(&root.join("proto"), &before);
    copy_dir(&root.join("proto"), &after);
    let jobs = after.join("stately/v1/jobs.proto");
    let text = std::fs::read_to_string(&jobs).unwrap();
    let renumbered = text.replacen("string submitted_by = 21;", "string submitted_by = 99;", 1);
    assert_ne!(text, renumbered, "the field to renumber is there");
    std::fs::write(&jobs, renumbered).unwrap();
    let out = buf()
        .arg("breaking")
        .arg(&after)
        .arg("--against")
        .arg(&before)
        .output()
        .unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a renumbered field passed the check: {said}"
    );
    assert!(said.contains("submitted_by"), "{said}");
}

/// docs/API.md, made from the protos' descriptors and their comments (the descriptor set the
/// daemon's reflection serves). `STATELY_BLESS=1` writes it; otherwise the test fails when
/// the file is not what the protos say.
#[test]
fn the_api_reference_is_made_from_the_protos() {
    use prost::Message;
    let set = prost_types::FileDescriptorSet::decode(stately::pb::FILE_DESCRIPTOR_SET).unwrap();
    let mut out = String::from(
        "# The stately API\n\nMade from `proto/stately/v1/*.proto` by `tests/api.rs` (`STATELY_BLESS=1 cargo nextest run api::` \
         writes it again); a test fails when it differs from the protos. Roles: every RPC needs credentials \
         (a token, a client certificate a rule names, or a unix peer a rule names) but health and reflection.\n",
    );
    let mut files: Vec<&prost_types::FileDescriptorProto> = set
        .file
        .iter()
        .filter(|f| f.package() == "stately.v1")
        .collect();
    files.sort_by_key(|f| f.name().to_owned());
    for f in files {
        let comments: std::collections::HashMap<Vec<i32>, String> = f
            .source_code_info
            .iter()
            .flat_map(|s| &s.location)
            .filter_map(|l| {
                let c = l.leading_comments().trim();
                (!c.is_empty()).then(|| {
                    let text = c.lines().map(str::trim).collect::<Vec<_>>().join(" ");
                    (l.path.clone(), text)
                })
            })
            .collect();
        let doc = |path: &[i32]| comments.get(path).cloned().unwrap_or_default();
        out.push_str(&format!("\n## `{}`\n", f.name()));
        for (si, s) in f.service.iter().enumerate() {
            out.push_str(&format!(
                "\n### service `{}`\n\n{}\n\n| RPC | request | response | |\n|---|---|---|---|\n",
                s.name(),
                doc(&[6, si as i32])
            ));
            for (mi, m) in s.method.iter().enumerate() {
                let stream = |b: bool| if b { "stream " } else { "" };
                out.push_str(&format!(
                    "| `{}` | {}`{}` | {}`{}` | {} |\n",
                    m.name(),
                    stream(m.client_streaming()),
                    m.input_type().trim_start_matches(".stately.v1."),
                    stream(m.server_streaming()),
                    m.output_type().trim_start_matches(".stately.v1."),
                    doc(&[6, si as i32, 2, mi as i32]).replace('|', "\\|")
                ));
            }
        }
        fn message(
            out: &mut String,
            m: &prost_types::DescriptorProto,
            path: Vec<i32>,
            prefix: &str,
            doc: &dyn Fn(&[i32]) -> String,
        ) {
            let name = format!("{prefix}{}", m.name());
            out.push_str(&format!("\n### `{name}`\n\n{}\n", doc(&path)));
            if !m.field.is_empty() {
                out.push_str("\n| field | type | |\n|---|---|---|\n");
            }
            for (fi, fld) in m.field.iter().enumerate() {
                use prost_types::field_descriptor_proto::{Label, Type};
                let ty = match fld.r#type() {
                    Type::Message | Type::Enum => fld
                        .type_name()
                        .trim_start_matches(".stately.v1.")
                        .to_owned(),
                    t => format!("{t:?}").to_lowercase(),
                };
                let label = if fld.label() == Label::Repeated {
                    "repeated "
                } else {
                    ""
                };
                let mut p = path.clone();
                p.extend([2, fi as i32]);
                out.push_str(&format!(
                    "| `{}` = {} | {label}`{ty}` | {} |\n",
                    fld.name(),
                    fld.number(),
                    doc(&p).replace('|', "\\|")
                ));
            }
            for (ni, n) in m.nested_type.iter().enumerate() {
                if n.options.as_ref().is_some_and(|o| o.map_entry()) {
                    continue;
                }
                let mut p = path.clone();
                p.extend([3, ni as i32]);
                message(out, n, p, &format!("{name}."), doc);
            }
            for (ei, e) in m.enum_type.iter().enumerate() {
                let mut p = path.clone();
                p.extend([4, ei as i32]);
                enumeration(out, e, p, &format!("{name}."), doc);
            }
        }
        fn enumeration(
            out: &mut String,
            e: &prost_types::EnumDescriptorProto,
            path: Vec<i32>,
            prefix: &str,
            doc: &dyn Fn(&[i32]) -> String,
        ) {
            out.push_str(&format!(
                "\n### enum `{prefix}{}`\n\n{}\n\n| value | | |\n|---|---|---|\n",
                e.name(),
                doc(&path)
            ));
            for (vi, v) in e.value.iter().enumerate() {
                let mut p = path.clone();
                p.extend([2, vi as i32]);
                out.push_str(&format!(
                    "| `{}` | {} | {} |\n",
                    v.name(),
                    v.number(),
                    doc(&p)
                ));
            }
        }
        for (mi, m) in f.message_type.iter().enumerate() {
            message(&mut out, m, vec![4, mi as i32], "", &doc);
        }
        for (ei, e) in f.enum_type.iter().enumerate() {
            enumeration(&mut out, e, vec![5, ei as i32], "", &doc);
        }
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/API.md");
    if std::env::var_os("STATELY_BLESS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &out).unwrap();
    }
    let written = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        written == out,
        "docs/API.md is not what the protos say: STATELY_BLESS=1 cargo nextest run api:: writes it"
    );
}
