//! Man pages and shell completions generated from a binary's clap definition, so they always
//! say what the binary accepts.
//!
//! Every vback binary parses its arguments through [`parse`]. With `VBACK_GENERATE_DOCS=DIR` in
//! the environment it instead writes, and exits:
//!
//! - `DIR/man/manS/NAME.S` (S: 8 for the daemons, 1 for the tools), and one page per
//!   subcommand, `NAME-SUB.S` (as `git-commit.1`), named in the main page's SEE ALSO;
//! - `DIR/completions/bash/NAME`, `DIR/completions/zsh/_NAME`, `DIR/completions/fish/NAME.fish`.
//!
//! `scripts/install.sh` runs each installed binary this way and installs what it wrote.

use std::path::{Path, PathBuf};

use clap::{Command, Parser};
use clap_complete::Shell;
use thiserror::Error;

/// The environment variable that asks a binary to write its man pages and completions.
pub const ENV: &str = "VBACK_GENERATE_DOCS";

/// Why the pages or completions could not be written.
#[derive(Debug, Error)]
pub enum DocgenError {
    /// A file or directory could not be written.
    #[error("cannot write {path}: {source} (is {ENV} a writable directory?)", path = path.display())]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Parses the arguments as `P::parse()` does, unless [`ENV`] is set: then writes the man pages
/// (section `section`) and completions into that directory and exits (status 0, or 1 with a
/// message).
pub fn parse<P: Parser>(section: &str) -> P {
    if let Some(dir) = std::env::var_os(ENV) {
        let cmd = P::command();
        let name = cmd.get_name().to_owned();
        match generate(cmd, section, Path::new(&dir)) {
            Ok(files) => {
                for f in files {
                    println!("{}", f.display());
                }
                std::process::exit(0);
            }
            Err(e) => {
                eprintln!("{name}: {e}");
                std::process::exit(1);
            }
        }
    }
    P::parse()
}

/// Writes `cmd`'s man pages and completions under `dir`; returns the files written.
pub fn generate(cmd: Command, section: &str, dir: &Path) -> Result<Vec<PathBuf>, DocgenError> {
    // No `help` subcommand: it would be a page of its own that says less than --help.
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let name = cmd.get_name().to_owned();
    let mut written = Vec::new();
    let man_dir = dir.join("man").join(format!("man{section}"));
    mkdir(&man_dir)?;

    // Subcommands get a page each (`vbctl-status.1`); the main page refers to them.
    let subs: Vec<Command> = cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
        .cloned()
        .collect();
    let mut main = cmd.clone();
    if !subs.is_empty() {
        let refs: Vec<String> = subs
            .iter()
            .map(|s| format!("{name}-{}({section})", s.get_name()))
            .collect();
        let after = main
            .get_after_long_help()
            .or(main.get_after_help())
            .map(|s| s.to_string())
            .unwrap_or_default();
        main = main.after_long_help(format!("{after}\n\nSee also: {}.", refs.join(", ")));
    }
    let page = man_dir.join(format!("{name}.{section}"));
    write(&page, &render(main, section, &name)?)?;
    written.push(page);
    for sub in subs {
        let sub_name = format!("{name}-{}", sub.get_name());
        let sub = sub
            .name(sub_name.clone())
            .version(cmd.get_version().unwrap_or_default().to_owned());
        let page = man_dir.join(format!("{sub_name}.{section}"));
        write(&page, &render(sub, section, &sub_name)?)?;
        written.push(page);
    }

    for (shell, sub, file) in [
        (Shell::Bash, "bash", name.clone()),
        (Shell::Zsh, "zsh", format!("_{name}")),
        (Shell::Fish, "fish", format!("{name}.fish")),
    ] {
        let d = dir.join("completions").join(sub);
        mkdir(&d)?;
        let mut buf = Vec::new();
        clap_complete::generate(shell, &mut cmd.clone(), name.clone(), &mut buf);
        let path = d.join(file);
        write(&path, &buf)?;
        written.push(path);
    }
    Ok(written)
}

fn render(cmd: Command, section: &str, name: &str) -> Result<Vec<u8>, DocgenError> {
    let mut buf = Vec::new();
    clap_mangen::Man::new(cmd)
        .section(section)
        .manual("vback")
        .source(format!("vback {}", env!("CARGO_PKG_VERSION")))
        // A fixed date keeps the pages the same from one build to the next.
        .date("")
        .render(&mut buf)
        .map_err(|source| DocgenError::Write {
            path: PathBuf::from(format!("{name}.{section}")),
            source,
        })?;
    Ok(buf)
}

fn mkdir(path: &Path) -> Result<(), DocgenError> {
    std::fs::create_dir_all(path).map_err(|source| DocgenError::Write {
        path: path.to_owned(),
        source,
    })
}

fn write(path: &Path, data: &[u8]) -> Result<(), DocgenError> {
    std::fs::write(path, data).map_err(|source| DocgenError::Write {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// A tool with a subcommand.
    #[derive(Debug, Parser)]
    #[command(name = "vbtool", version, about = "Does things to vback daemons.")]
    struct Tool {
        /// How long to wait.
        #[arg(long, default_value_t = 5)]
        timeout: u32,
        #[command(subcommand)]
        cmd: Sub,
    }

    #[derive(Debug, clap::Subcommand)]
    enum Sub {
        /// Show a daemon's state.
        Status {
            /// The control socket.
            control: PathBuf,
        },
    }

    #[test]
    fn pages_and_completions_for_a_command_and_its_subcommands() {
        let d = tempfile::tempdir().unwrap();
        let files = generate(Tool::command(), "1", d.path()).unwrap();
        let rel: Vec<String> = files
            .iter()
            .map(|f| f.strip_prefix(d.path()).unwrap().display().to_string())
            .collect();
        assert_eq!(
            rel,
            [
                "man/man1/vbtool.1",
                "man/man1/vbtool-status.1",
                "completions/bash/vbtool",
                "completions/zsh/_vbtool",
                "completions/fish/vbtool.fish"
            ]
        );
        let main = std::fs::read_to_string(d.path().join("man/man1/vbtool.1")).unwrap();
        assert!(main.starts_with(".ie"), "roff: {main}");
        assert!(main.contains("vbtool\\-status(1)"), "{main}");
        assert!(main.contains("How long to wait"), "{main}");
        let sub = std::fs::read_to_string(d.path().join("man/man1/vbtool-status.1")).unwrap();
        assert!(sub.contains("The control socket"), "{sub}");
        let bash = std::fs::read_to_string(d.path().join("completions/bash/vbtool")).unwrap();
        assert!(bash.contains("--timeout"), "{bash}");
        // The same input gives the same files (install.sh is idempotent).
        let again = tempfile::tempdir().unwrap();
        generate(Tool::command(), "1", again.path()).unwrap();
        for f in &rel {
            assert_eq!(
                std::fs::read(d.path().join(f)).unwrap(),
                std::fs::read(again.path().join(f)).unwrap(),
                "{f}"
            );
        }
    }

    #[test]
    fn an_unwritable_directory_is_named() {
        let e = generate(Tool::command(), "1", Path::new("/proc/vback-nowhere")).unwrap_err();
        assert!(e.to_string().contains("/proc/vback-nowhere"), "{e}");
    }
}
