//! Configuration files (`-F`, re-read on SIGHUP, and `include FILE`): penctl
//! commands, one per line, as Pen's `read_cfg` reads them. Blank lines and
//! `#` comments are skipped; replies are discarded.
//!
//! Deviation from Pen, by design: Pen runs each line as it comes and says
//! nothing about a line it cannot use, so a typo leaves a half-applied
//! file. Here the whole file is applied to a copy of the state and the
//! first bad line refuses all of it: the running configuration stays as it
//! was and the error names the line.

use std::fmt;

use super::command::{self, Command, Effect, Live};
use super::state::ControlState;

/// Why a file was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileError {
    /// 1-based line number.
    pub line: usize,
    pub message: String,
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

impl std::error::Error for FileError {}

/// Applies the commands in `text` to a copy of `state`. On success returns
/// the new state and the effects to carry out, in order; on the first bad
/// line (one that does not parse, an unknown command, bad arguments, or a
/// command a file may not hold, such as `exit`) returns where and why, and
/// `state` is untouched. `include FILE` reads files through
/// [`Live::read_file`], at most [`command::INCLUDE_DEPTH_MAX`] deep.
pub fn apply(
    state: &ControlState,
    text: &str,
    live: &dyn Live,
) -> Result<(ControlState, Vec<Effect>), FileError> {
    apply_nested(state, text, live, 0)
}

/// [`apply`] for a file that `depth` levels of `include` lead to.
pub(crate) fn apply_nested(
    state: &ControlState,
    text: &str,
    live: &dyn Live,
    depth: usize,
) -> Result<(ControlState, Vec<Effect>), FileError> {
    let mut next = state.clone();
    let mut effects = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let error = |message: String| FileError {
            line: index + 1,
            message,
        };
        let command = command::parse(line).map_err(|e| error(e.to_string()))?;
        if command == Command::Nothing {
            continue;
        }
        if !command.allowed_in_file() {
            let word = line.split(' ').find(|w| !w.is_empty()).unwrap_or_default();
            return Err(error(format!("'{word}' is not allowed in a configuration file")));
        }
        let outcome = command::run(&mut next, command, live, depth).map_err(error)?;
        effects.extend(outcome.effects);
    }
    Ok((next, effects))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::command::tests::{pen_state, FakeLive};
    use crate::select::acl::AclEntry;

    #[test]
    fn applies_commands_skipping_comments_and_blank_lines() {
        let base = pen_state();
        let text =
            "# a comment\n\n   \nhash\r\nblacklist 5\n  # indented comment\nacl 3 deny 10.0.0.0 255.0.0.0\n\
                    server 2 address 10.0.0.2 port 3306 max 10\nlog /var/log/pen.log\nservers\n";
        let (state, effects) = apply(&base, text, &FakeLive::default()).unwrap();
        assert!(state.mode.hash);
        assert_eq!(state.blacklist_secs, 5);
        assert_eq!(
            state.acls[3],
            vec![AclEntry::V4 {
                permit: false,
                addr: "10.0.0.0".parse().unwrap(),
                mask: "255.0.0.0".parse().unwrap(),
            }]
        );
        assert_eq!(state.servers.len(), 3);
        assert_eq!(state.servers[2].spec.max, 10);
        assert_eq!(effects, vec![Effect::ReopenLog]);
        assert_eq!(base, pen_state(), "the original is untouched");
    }

    #[test]
    fn the_first_bad_line_refuses_the_whole_file() {
        let base = pen_state();
        let live = FakeLive::default();
        for (text, line, message) in [
            ("hash\nfrobnicate 3\n", 2, "unknown command 'frobnicate'"),
            (
                "hash\n\n# x\nserver 0 max abc\n",
                4,
                "server 0: max 'abc' is not a valid number",
            ),
            (
                "server 0 address nosuch.invalid\n",
                1,
                "server 0: cannot resolve host 'nosuch.invalid'",
            ),
            (
                "acl 12 permit 1.2.3.4",
                1,
                "acl: access list '12' is not one of 0 to 9",
            ),
            ("hash\nexit\n", 2, "'exit' is not allowed in a configuration file"),
            ("close 1\n", 1, "'close' is not allowed in a configuration file"),
            (
                "write /tmp/x\n",
                1,
                "'write' is not allowed in a configuration file",
            ),
            ("status\n", 1, "'status' is not allowed in a configuration file"),
            ("ssl_ciphers HIGH\n", 1, "TLS is not available in this version"),
            ("include /missing\n", 1, "include /missing: entity not found"),
            (
                "tcp_fastclose\n",
                1,
                "do_cmd: ignoring tcp_fastclose without argument",
            ),
        ] {
            let err = apply(&base, text, &live).unwrap_err();
            assert_eq!(
                err,
                FileError {
                    line,
                    message: message.into()
                },
                "{text:?}"
            );
        }
        let err = apply(&base, "hash\nno such\n", &live).unwrap_err();
        assert_eq!(err.to_string(), "line 2: no: unknown setting 'such'");
    }

    #[test]
    fn nested_includes_report_the_inner_line() {
        let mut live = FakeLive::default();
        live.files.insert("/inner".into(), "weight\n\ntimeout 0\n".into());
        let err = apply(&pen_state(), "hash\ninclude /inner\n", &live).unwrap_err();
        assert_eq!(
            err.to_string(),
            "line 2: include /inner: line 3: timeout: seconds must be at least 1"
        );
        live.files
            .insert("/inner".into(), "weight\nlisten 18009\n".into());
        let (state, effects) = apply(&pen_state(), "hash\ninclude /inner\n", &live).unwrap();
        assert!(state.mode.hash && state.mode.weight);
        assert_eq!(effects, vec![Effect::Relisten]);
    }

    #[test]
    fn queries_and_obsolete_commands_are_accepted() {
        let text = "servers\nmode\nblock\nno delayed_forward\nepoll\nabort_on_error\nidlers 0\n";
        let (state, effects) = apply(&pen_state(), text, &FakeLive::default()).unwrap();
        assert_eq!(state, pen_state());
        assert!(effects.is_empty());
    }
}
