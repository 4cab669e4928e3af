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
