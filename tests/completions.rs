//! `promptmill completions SHELL`: a script each shell accepts, naming every command.

use crate::util::*;

#[test]
fn completion_scripts_name_every_command_for_bash_zsh_and_fish() {
    let f = Fixture::new();
    for shell in ["bash", "zsh", "fish"] {
        let r = f.run(&["completions", shell]);
        assert_eq!(r.code, 0, "{shell}: {}", r.stderr);
        for word in [
            "promptmill",
            "run",
            "estimate",
            "validate",
            "report",
            "completions",
        ] {
            assert!(r.stdout.contains(word), "{shell}: no `{word}`");
        }
        // The shell itself parses it, where it is installed.
        let check: &[&str] = match shell {
            "bash" => &["bash", "-n"],
            "zsh" => &["zsh", "-n"],
            _ => &["fish", "--no-execute"],
        };
        let script = f.write(&format!("promptmill.{shell}"), &r.stdout);
        match std::process::Command::new(check[0])
            .args(&check[1..])
            .arg(&script)
            .output()
        {
            Ok(o) => assert!(
                o.status.success(),
                "{shell} rejects the script: {}",
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(_) => eprintln!("{shell} is not installed: its script is not parsed"),
        }
    }
    let r = f.run(&["completions", "tcsh"]);
    assert_eq!(r.code, 2, "an unknown shell is a usage error");
}
