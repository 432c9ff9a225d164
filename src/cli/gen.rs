//! Files generated from the command-line definition for the Debian package (`make deb`): man
//! pages (clap_mangen) and shell completions (clap_complete), so neither can drift from the
//! real options.

use std::path::Path;

use clap::CommandFactory;
use clap_complete::Shell;

use super::Cli;

/// Writes `understudy.1` and one page per visible subcommand (`understudy-status.1`,
/// `understudy-profile-show.1`, ...) into `dir`, creating it.
pub fn man_pages(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    clap_mangen::generate_to(Cli::command(), dir)
}

/// Writes completion scripts for bash (`understudy.bash`), zsh (`_understudy`) and fish
/// (`understudy.fish`) into `dir`, creating it.
pub fn completions(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut cmd = Cli::command();
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut cmd, "understudy", dir)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn man_pages_cover_every_visible_subcommand() {
        let dir = tempfile::tempdir().unwrap();
        man_pages(dir.path()).unwrap();
        for page in [
            "understudy.1",
            "understudy-run.1",
            "understudy-status.1",
            "understudy-profile-show.1",
            "understudy-shadow-rebuild.1",
        ] {
            let text = std::fs::read_to_string(dir.path().join(page))
                .unwrap_or_else(|e| panic!("{page}: {e}"));
            assert!(text.starts_with(".ie \\n(.g .ds Aq"), "{page} is not roff");
            assert!(text.contains(".SH NAME"), "{page}");
        }
        // The generators themselves stay out of the manual.
        assert!(!dir.path().join("understudy-gen-man.1").exists());
        let main = std::fs::read_to_string(dir.path().join("understudy.1")).unwrap();
        assert!(main.contains("check\\-config"), "{main}");
    }

    #[test]
    fn completions_for_three_shells() {
        let dir = tempfile::tempdir().unwrap();
        completions(dir.path()).unwrap();
        for (file, needle) in [
            ("understudy.bash", "_understudy()"),
            ("_understudy", "#compdef understudy"),
            ("understudy.fish", "complete -c understudy"),
        ] {
            let text = std::fs::read_to_string(dir.path().join(file))
                .unwrap_or_else(|e| panic!("{file}: {e}"));
            assert!(text.contains(needle), "{file}: {needle} missing");
            assert!(text.contains("rollback"), "{file} misses a subcommand");
        }
    }
}
