//! README.md's commands run as written: every command line of its `sh` blocks
//! (the `cargo` steps aside, which this test's own build already did) runs in
//! order, from a directory that has the repository's fixtures, with the built
//! binary in place of `./target/release/flashpack`, and exits 0.

use std::path::Path;
use std::process::Command;

/// The command lines of README.md's `sh` blocks, split at `&&`, without the
/// cargo steps.
fn readme_commands(readme: &str) -> Vec<String> {
    let mut commands = Vec::new();
    let mut in_sh = false;
    for line in readme.lines() {
        match line.trim() {
            "```sh" => in_sh = true,
            "```" => in_sh = false,
            l if in_sh && !l.is_empty() => commands.extend(
                l.split(" && ")
                    .map(str::trim)
                    .filter(|c| !c.starts_with("cargo "))
                    .map(str::to_string),
            ),
            _ => {}
        }
    }
    commands
}

#[test]
fn every_readme_command_runs_as_written() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let commands = readme_commands(&readme);
    assert!(
        commands.len() >= 8,
        "README's sh blocks lost their commands: {commands:?}"
    );
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(root.join("fixtures"), dir.path().join("fixtures")).unwrap();
    let bin = env!("CARGO_BIN_EXE_flashpack");
    for command in &commands {
        assert!(
            command.starts_with("./target/release/flashpack "),
            "a README command that this test cannot run: {command}"
        );
        let line = command.replacen("./target/release/flashpack", bin, 1);
        let out = Command::new("bash")
            .args(["-c", &format!("set -o pipefail; {line}")])
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "README command failed ({}): {command}\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The first command's claim: it generated text from flash under the budget.
    assert!(dir.path().join("opt-relu.flashpack").is_file());
}
